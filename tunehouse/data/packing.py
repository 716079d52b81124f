"""Rows of tokenized examples → model-ready batches, pure.

A *row* is a list of examples that share one sequence: several with packing, one without.
`pack` groups examples into rows of ≤ max_seq_length tokens; `collate` turns rows into tensors:

    input_ids     [B, T]        pad = a pad id distinct from EOS
    targets       [B, T]        next-token targets: targets[t] = labels[t+1] inside a segment,
                                -100 at each segment's last token and on padding (already shifted,
                                so losses never shift again and never cross a segment boundary)
    position_ids  [B, T]        restart at 0 in every segment
    attention_mask [B, 1, T, T] additive: 0 where query t may see key s (same segment, s ≤ t),
                                dtype-min elsewhere; a pad query sees only itself (no NaN rows);
                                None when `mask_dtype` is None

With transformers' own attention (sdpa, eager) the explicit 4-D block-diagonal mask is required:
restarting position_ids alone let the second segment attend to the first (logits off by 0.17,
DESIGN.md). The recipes switch models to `train/attention.py`'s packed attention instead, which
reads the segments from position_ids and needs no mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunehouse.data.tokenize import IGNORE, Tokenized


@dataclass
class Batch:
    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    num_tokens: int
    """Real (non-pad) tokens."""
    num_trained_tokens: int
    """Positions with a target (≠ -100)."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs


def pack(examples: Sequence[Tokenized], max_seq_length: int) -> list[list[int]]:
    """Greedy first-fit-decreasing packing → rows as lists of example indices.

    Examples are taken longest first (ties by index, so the result is deterministic) and each
    goes into the first row with room. Rows come out in creation order; the recipe shuffles rows.
    """
    order = sorted(range(len(examples)), key=lambda i: (-examples[i].num_tokens, i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = examples[i].num_tokens
        if n > max_seq_length:
            raise ValueError(f"example {i} has {n} tokens > max_seq_length {max_seq_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_seq_length - n)
    return rows


def collate(rows: Sequence[Sequence[Tokenized]], pad_id: int,
            mask_dtype: torch.dtype | None = torch.float32) -> Batch:
    """Tensors for a micro-batch of rows, padded on the right to the longest row; no attention
    mask when mask_dtype is None."""
    width = max(sum(ex.num_tokens for ex in row) for row in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    segment = torch.full((b, width), -1, dtype=torch.long)  # -1 = padding
    for r, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row):
            n = ex.num_tokens
            end = start + n
            input_ids[r, start:end] = torch.tensor(ex.input_ids, dtype=torch.long)
            targets[r, start:end - 1] = torch.tensor(ex.labels[1:], dtype=torch.long)
            position_ids[r, start:end] = torch.arange(n)
            segment[r, start:end] = s
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    mask = None if mask_dtype is None else block_causal_mask(segment, mask_dtype)
    return Batch(input_ids, targets, position_ids, mask,
                 num_tokens=int((segment >= 0).sum()),
                 num_trained_tokens=int((targets != IGNORE).sum()))


def block_causal_mask(segment: torch.Tensor, dtype: torch.dtype,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Additive [B, 1, T, T] mask from segment ids [B, T] (-1 = padding): a query sees the keys
    of its own segment up to itself; a pad query sees only itself (no NaN rows).

    With `position_ids`, a segment may branch (data/preference.py's shared prompt): a run of
    positions restarting at k > 0 is a branch off the segment's first run, and its tokens see
    that run's first k tokens and their own branch up to themselves, never another branch."""
    width = segment.shape[1]
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]                       # [T, T] key ≤ query
    same = segment[:, :, None] == segment[:, None, :]           # [B, T, T]
    real = (segment >= 0)[:, :, None]
    allowed = same & causal & real
    if position_ids is not None:
        prev = torch.cat([torch.full_like(position_ids[:, :1], -2), position_ids[:, :-1]], dim=1)
        starts = (position_ids != prev + 1) | (segment != torch.cat([segment[:, :1] - 1, segment[:, :-1]], 1))
        run = starts.cumsum(1)                                  # run id per token
        run_start = torch.cummax(torch.where(starts, idx.expand_as(run), 0), 1).values
        branch_at = position_ids.gather(1, run_start)           # k of the token's run (0: a first run)
        first = branch_at == 0                                  # token lies in its segment's first run
        same_run = run[:, :, None] == run[:, None, :]
        prefix = first[:, None, :] & (position_ids[:, None, :] < branch_at[:, :, None])
        allowed &= same_run | prefix
    allowed |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros((segment.shape[0], 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return mask
