"""Attention for packed rows: each example attends only within itself, computed per example.

A packed row holds several examples back to back, and `position_ids` restart at 0 at each one
(data/packing.py). Instead of one attention over the whole row under a [T, T] block-diagonal
mask, `packed_attention` runs causal attention separately on each example's slice:

- no mask tensor: the 4-D mask is B·T² elements (1 GiB in bf16 for 8 rows of 8,192 tokens);
- work ∝ Σ Lᵢ² instead of T², and plain causal attention (`is_causal`) is what the fast
  kernels take (flash attention on GPUs refuses an arbitrary mask). Measured on SmolLM2-135M
  LoRA, 2 CPU cores: 1.54x tokens/s at max_seq_length 2048, the same at 512. (Running long
  slices in fp32 instead of bf16 was no faster end to end and kept 80 MB more for the backward;
  short ones are faster in fp32 on a CPU: `FP32_UP_TO`.)

Branches: a run of positions restarting at k > 0 instead of 0 (data/preference.py puts a
pair's rejected completion after its chosen one, both after one shared prompt) sees the first k
tokens of the example's first run and then itself, causally, never the tokens between: the first
run is split where branches leave it, and each later piece or branch attends to the keys of the
pieces before it plus its own under a bottom-right causal mask. Every token gets the keys it
would have run alone, so a pair's prompt is computed once for both sides.

It is registered with transformers' attention interface under ATTENTION and switched on per
model with `enable(model)`; models whose attention does not go through that interface keep the
mask (the recipes then build it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION = "tunehouse_packed"

# On a CPU, pieces of up to this many query tokens run in fp32 under bf16: torch's CPU flash
# kernel's bf16 backward is slow on short pieces. fwd+bwd of one causal piece (9 heads, GQA 3,
# head dim 64, 1 thread) bf16 vs fp32: 40 tokens 1.48 vs 0.46 ms, 100: 3.58 vs 1.43, 150: 5.06 vs
# 3.05, 250: 8.32 vs 7.48, 512: 28.4 vs 29.4, 1024: 70.9 vs 86.1. (A DPO pair's pieces are short.)
FP32_UP_TO = 256

_plan_cache: tuple[torch.Tensor, list] | None = None


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per row, the (start, end, k) of each run of consecutive positions: k = the position the
    run starts at, 0 for a new example, k > 0 for a branch off the current example's first run
    (data/preference.py's shared prompt) that sees that run's first k tokens."""
    t = position_ids.shape[-1]
    out = []
    for row in position_ids.reshape(-1, t):
        breaks = torch.cat([torch.tensor([True]), row[1:] != row[:-1] + 1]) if t else row.bool()
        starts = breaks.nonzero().flatten().tolist()
        out.append([(a, b, int(row[a])) for a, b in zip(starts, [*starts[1:], t])])
    return out


def _plan(position_ids: torch.Tensor) -> list[tuple[list[int], list[tuple[int, ...]], list]]:
    """Per row: the split sizes along the sequence, each piece's prefix pieces (the keys it sees
    before its own), and its mask (None: plain causal; else the bool [L, S] causal mask aligned
    to the bottom right: all the prefix keys, then its own keys up to itself). A first run that
    has branches is split where they branch off, so a branch's prefix is whole pieces (splits,
    not slices: see `packed_attention`). Cached for the tensor object: every layer of a forward
    gets the same plan."""
    global _plan_cache
    if _plan_cache is not None and _plan_cache[0] is position_ids:
        return _plan_cache[1]
    plans = []
    for runs in segments(position_ids):
        firsts = [k == 0 or i == 0 for i, (_, _, k) in enumerate(runs)]
        cuts: dict[int, set[int]] = {}  # first run's start → where branches leave it
        for (a, b, k), is_first in zip(runs, firsts):
            if is_first:
                first, cuts[a] = (a, b), set()
            elif k > first[1] - first[0]:
                raise ValueError(f"a run restarting at position {k} follows a first run of "
                                 f"{first[1] - first[0]} tokens: nothing to branch off")
            else:
                cuts[first[0]].add(k)
        sizes, prefixes, pieces = [], [], []  # pieces: the current first run's (end offset, piece)
        for (a, b, k), is_first in zip(runs, firsts):
            if is_first:
                pieces = []
                bounds = sorted({0, b - a, *cuts[a]})
                for lo, hi in zip(bounds, bounds[1:]):
                    prefixes.append(tuple(p for _, p in pieces))
                    pieces.append((hi, len(sizes)))
                    sizes.append(hi - lo)
            else:
                prefixes.append(tuple(p for end, p in pieces if end <= k))
                sizes.append(b - a)
        masks = []
        for i, pre in enumerate(prefixes):
            seen = sum(sizes[j] for j in pre)
            masks.append(None if not pre else
                         torch.ones(sizes[i], seen + sizes[i], dtype=torch.bool).tril(seen))
        plans.append((sizes, prefixes, masks))
    _plan_cache = (position_ids, plans)
    return plans


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, T, D], key/value [B, KV, T, D] →
    ([B, T, H, D], None). With an explicit mask, or without position ids, it is plain SDPA."""
    position_ids = kwargs.get("position_ids")
    gqa = query.shape[1] != key.shape[1]
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             is_causal=attention_mask is None and query.shape[2] > 1,
                                             scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    per_row = _plan(position_ids)
    if len(per_row) == 1 and query.shape[0] > 1:  # one position row shared by the batch
        per_row = per_row * query.shape[0]
    # unbind / split, not slicing: their backward is one stack / cat, where the backward of each
    # slice writes into a zeroed copy of the whole tensor (40% of a 2-row step's time, profiled)
    rows = []
    for (sizes, prefixes, masks), q, k, v in zip(per_row, query.unbind(0), key.unbind(0), value.unbind(0)):
        ks, vs = k.split(sizes, 1), v.split(sizes, 1)
        parts = []
        for i, qs in enumerate(q.split(sizes, 1)):
            if masks[i] is None:
                kk, vv = ks[i], vs[i]
            else:  # a branch or a later piece of a first run: its prefix's keys, then its own
                kk = torch.cat([ks[j] for j in prefixes[i]] + [ks[i]], dim=1)
                vv = torch.cat([vs[j] for j in prefixes[i]] + [vs[i]], dim=1)
            low = qs.dtype if (qs.device.type == "cpu" and qs.dtype != torch.float32
                               and qs.shape[1] <= FP32_UP_TO) else None
            if low is not None:
                qs, kk, vv = qs.float(), kk.float(), vv.float()
            out = F.scaled_dot_product_attention(qs[None], kk[None], vv[None], attn_mask=masks[i], dropout_p=dropout,
                                                 is_causal=masks[i] is None, scale=scaling, enable_gqa=gqa)[0]
            parts.append(out if low is None else out.to(low))
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    out = torch.stack(rows)
    return out.transpose(1, 2).contiguous(), None


def enable(model) -> bool:
    """Switch `model` (a transformers PreTrainedModel) to packed attention; False when its
    attention does not go through transformers' attention interface (it then needs the mask)."""
    if not getattr(model, "_supports_attention_backend", False):
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION)
    else:
        model.config._attn_implementation = ATTENTION
    return model.config._attn_implementation == ATTENTION
