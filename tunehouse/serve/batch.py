"""The decoding batch the engine steps: its sequences in row order, their KV cache and last tokens.
Rows join (their prompts prefilled) and leave between steps.

Two kinds, one interface (`add`, `step`, `keep`):
- `SlotBatch`, for the models serve/decoder.py runs: a slot KV cache per row, one column written
  per step, prompts packed into one prefill;
- `PaddedBatch`, for any other causal LM: the transformers forward over a left-padded batch with
  an attention mask and explicit position ids; joining rows are padded to a common length.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from tunehouse.serve.decoder import KVCache
from tunehouse.serve.weights import LoadedWeights

PACK_TOKENS = 2048  # prompt tokens per packed prefill forward


class RunningBatch(ABC):
    """Sequences in row order (the engine's per-choice records) and each row's last token."""

    def __init__(self, loaded: LoadedWeights):
        self.loaded = loaded
        self.seqs: list = []
        self.last = torch.zeros(0, dtype=torch.long)

    @abstractmethod
    def add(self, seqs: list, adapters: list[str | None]) -> torch.Tensor:
        """Prefill `seqs` (choices of one request share their prompt) as new rows at the end;
        returns their next-token logits [len(seqs), vocab]. The caller appends their tokens to
        `last`."""

    @abstractmethod
    def step(self, adapters: list[str | None]) -> torch.Tensor:
        """Feed every row's last token; returns the next-token logits [rows, vocab]."""

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (ascending), in that order."""
        idx = torch.tensor(rows, dtype=torch.long)
        self.seqs = [self.seqs[i] for i in rows]
        self.last = self.last[idx]


def new_batch(loaded: LoadedWeights, slots: int) -> RunningBatch:
    return SlotBatch(loaded, slots) if loaded.decoder is not None else PaddedBatch(loaded)


class SlotBatch(RunningBatch):
    def __init__(self, loaded: LoadedWeights, slots: int):
        super().__init__(loaded)
        self.decoder = loaded.decoder
        self.cache: KVCache = self.decoder.new_cache(slots)

    def add(self, seqs: list, adapters: list[str | None]) -> torch.Tensor:
        groups: dict[int, list[int]] = {}  # one prefill per request, whatever its n
        for i, s in enumerate(seqs):
            groups.setdefault(id(s.gen), []).append(i)
        first, names = len(self.seqs), self.loaded.names(adapters)
        logits: list[torch.Tensor] = [None] * len(seqs)
        for members in _packs(list(groups.values()), [len(seqs[g[0]].prompt) for g in groups.values()]):
            out = self.decoder.prefill(self.cache, [seqs[g[0]].prompt for g in members],
                                       [[first + i for i in g] for g in members], [names[g[0]] for g in members])
            for row, g in zip(out, members):
                for i in g:
                    logits[i] = row
        self.seqs += seqs
        return torch.stack(logits)

    def step(self, adapters: list[str | None]) -> torch.Tensor:
        return self.decoder.decode(self.cache, self.last, self.loaded.names(adapters))

    def keep(self, rows: list[int]) -> None:
        super().keep(rows)
        self.cache.keep(rows)


def _packs(groups: list[list[int]], lengths: list[int]) -> list[list[list[int]]]:
    """Groups in order, cut into packs of at most PACK_TOKENS prompt tokens (a longer prompt goes
    alone): a packed prefill's block-diagonal mask and scores grow with the square of its length."""
    packs, size = [[]], 0
    for g, n in zip(groups, lengths):
        if packs[-1] and size + n > PACK_TOKENS:
            packs.append([])
            size = 0
        packs[-1].append(g)
        size += n
    return packs


class PaddedBatch(RunningBatch):
    def __init__(self, loaded: LoadedWeights):
        super().__init__(loaded)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, [B, heads, T, dim]
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    def add(self, seqs: list, adapters: list[str | None]) -> torch.Tensor:
        loaded, device = self.loaded, self.loaded.model.device
        width = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), width), loaded.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = loaded.forward(adapters, input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
        self._merge(seqs, [(layer.keys, layer.values) for layer in out.past_key_values.layers], mask)
        return out.logits[:, -1]

    def step(self, adapters: list[str | None]) -> torch.Tensor:
        from transformers.cache_utils import DynamicCache

        device = self.loaded.model.device
        self.mask = torch.cat([self.mask, torch.ones(len(self.seqs), 1, dtype=torch.long)], 1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        out = self.loaded.forward(adapters, input_ids=self.last[:, None].to(device),
                                  attention_mask=self.mask.to(device), position_ids=positions.to(device),
                                  past_key_values=DynamicCache(ddp_cache_data=self.kv), use_cache=True)
        self.kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits[:, -1]

    def _merge(self, seqs: list, kv, mask: torch.Tensor) -> None:
        """Append rows (left-padding whichever side is shorter so all rows end at the same column)."""
        if not self.seqs:
            self.seqs, self.kv, self.mask = list(seqs), kv, mask
            return
        t = max(self.mask.shape[1], mask.shape[1])
        self.kv = [(torch.cat([_pad_left(k0, t, 2), _pad_left(k1, t, 2)]),
                    torch.cat([_pad_left(v0, t, 2), _pad_left(v1, t, 2)]))
                   for (k0, v0), (k1, v1) in zip(self.kv, kv)]
        self.mask = torch.cat([_pad_left(self.mask, t, 1), _pad_left(mask, t, 1)])
        self.seqs += seqs

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, then drop the leading columns that are padding in every row."""
        super().keep(rows)
        idx = torch.tensor(rows, dtype=torch.long)
        self.mask = self.mask[idx]
        real = self.mask.any(0).nonzero()
        first = int(real[0]) if len(real) else self.mask.shape[1]
        self.mask = self.mask[:, first:]
        self.kv = [(k[idx, :, first:], v[idx, :, first:]) for k, v in self.kv]


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
