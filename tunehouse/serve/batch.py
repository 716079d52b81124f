"""The decoding batch the engine steps: its sequences in row order, their KV cache, attention
mask and last tokens; rows join (left-padded to a common length) and leave between steps."""

from __future__ import annotations

import torch

from tunehouse.serve.weights import LoadedWeights


class RunningBatch:
    """The running batch: sequences in row order (the engine's per-choice records), their KV
    cache, attention mask and last token."""

    def __init__(self, loaded: LoadedWeights):
        self.loaded = loaded
        self.seqs: list = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, [B, heads, T, dim]
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)

    def merge(self, seqs: list, kv, mask: torch.Tensor, last: torch.Tensor) -> None:
        """Append rows (left-padding whichever side is shorter so all rows end at the same column)."""
        if not self.seqs:
            self.seqs, self.kv, self.mask, self.last = list(seqs), kv, mask, last
            return
        t = max(self.mask.shape[1], mask.shape[1])
        self.kv = [(torch.cat([_pad_left(k0, t, 2), _pad_left(k1, t, 2)]),
                    torch.cat([_pad_left(v0, t, 2), _pad_left(v1, t, 2)]))
                   for (k0, v0), (k1, v1) in zip(self.kv, kv)]
        self.mask = torch.cat([_pad_left(self.mask, t, 1), _pad_left(mask, t, 1)])
        self.last = torch.cat([self.last, last])
        self.seqs += seqs

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, then drop the leading columns that are padding in every row."""
        idx = torch.tensor(rows, dtype=torch.long)
        self.seqs = [self.seqs[i] for i in rows]
        self.mask, self.last = self.mask[idx], self.last[idx]
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
