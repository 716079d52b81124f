"""One set of model weights in the engine's memory, with the LoRA adapters attached to it, and
the forward / scoring calls that route each batch row to its adapter."""

from __future__ import annotations

import json
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch

from tunehouse.serve import decoder, lora, scoring


def eos_ids(folder: Path, tokenizer) -> set[int]:
    """The ids that end a sequence, as transformers' generation reads them: generation_config.json's
    eos_token_id (else config.json's), plus the tokenizer's."""
    ids: list = []
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file() and (eos := json.loads(path.read_text()).get("eos_token_id")) is not None:
            ids = eos if isinstance(eos, list) else [eos]
            break
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


class LoadedWeights:
    """One set of weights in memory, with its LoRA adapters (adapter path → name)."""

    def __init__(self, path: Path, dtype: torch.dtype, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = str(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # the scheduler thread's own (decode)
        self.eos = eos_ids(path, self.tokenizer)
        self.routing = lora.Routing()
        # The lean decoding forward where the architecture has one (it fuses the projection weights
        # in place, before any adapter wraps them); None: decode with the transformers forward.
        self.decoder = decoder.LlamaDecoder(self.model) if decoder.supports(self.model.config) is None else None
        self.adapters: OrderedDict[str, str] = OrderedDict()  # least recently used first
        self.adapter_bytes: dict[str, int] = {}
        self._next_id = 0

    def attach(self, path: Path) -> None:
        name = f"a{self._next_id}"
        self._next_id += 1
        self.adapter_bytes[str(path)] = lora.load_adapter(self.model, self.routing, path, name)
        self.adapters[str(path)] = name
        if self.decoder is not None:
            self.decoder.add_adapter(name)

    def detach(self, path: str) -> None:
        name = self.adapters.pop(path)
        lora.remove_adapter(self.model, name)
        if self.decoder is not None:
            self.decoder.remove_adapter(name)
        self.adapter_bytes.pop(path, None)

    def names(self, adapters: list[str | None]) -> list[str | None]:
        """Adapter paths → the names they are attached under (None: the base alone)."""
        return [self.adapters[a] if a else None for a in adapters]

    @contextmanager
    def routed(self, adapters: list[str | None]):
        """Within the block, each batch row runs with its adapter (None: the base alone)."""
        names = self.names(adapters)
        if len(set(names)) == 1:
            self.routing.current = names[0]
        else:
            rows: dict[str, list[int]] = {}
            for i, n in enumerate(names):
                if n is not None:
                    rows.setdefault(n, []).append(i)
            self.routing.current = [(n, torch.tensor(r, device=self.model.device)) for n, r in rows.items()]
        try:
            yield
        finally:
            self.routing.current = None

    def forward(self, adapters: list[str | None], **kw):
        with self.routed(adapters):
            return self.model(**kw)

    def score(self, adapters: list[str | None], rows: list[list[int]], top: int) -> list[scoring.Scored]:
        with self.routed(adapters):
            return scoring.score(self.model, rows, top=top, pad_id=self.tokenizer.pad_token_id or 0)
