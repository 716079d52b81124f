"""Attention for packed rows: each example attends only within itself, computed per example.

A packed row holds several examples back to back, and `position_ids` restart at 0 at each one
(data/packing.py). Instead of one attention over the whole row under a [T, T] block-diagonal
mask, `packed_attention` runs causal attention separately on each example's slice:

- no mask tensor: the 4-D mask is B·T² elements (1 GiB in bf16 for 8 rows of 8,192 tokens);
- work ∝ Σ Lᵢ² instead of T², and plain causal attention (`is_causal`) is what the fast
  kernels take (flash attention on GPUs refuses an arbitrary mask). Measured on SmolLM2-135M
  LoRA, 2 CPU cores: 1.54x tokens/s at max_seq_length 2048, the same at 512. (Running the slices
  in fp32 instead of bf16 was no faster end to end and kept 80 MB more for the backward.)

It is registered with transformers' attention interface under ATTENTION and switched on per
model with `enable(model)`; models whose attention does not go through that interface keep the
mask (the recipes then build it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION = "tunehouse_packed"

_segments_cache: tuple[torch.Tensor, list[list[tuple[int, int]]]] | None = None


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each run of positions that begins at 0.

    The result is cached for the tensor object: every layer of a forward gets the same one."""
    global _segments_cache
    if _segments_cache is not None and _segments_cache[0] is position_ids:
        return _segments_cache[1]
    t = position_ids.shape[-1]
    out = []
    for row in position_ids.reshape(-1, t):
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        out.append(list(zip(starts, [*starts[1:], t])))
    _segments_cache = (position_ids, out)
    return out


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
    per_row = segments(position_ids)
    if len(per_row) == 1 and query.shape[0] > 1:  # one position row shared by the batch
        per_row = per_row * query.shape[0]
    # unbind / split, not slicing: their backward is one stack / cat, where the backward of each
    # slice writes into a zeroed copy of the whole tensor (40% of a 2-row step's time, profiled)
    rows = []
    for spans, q, k, v in zip(per_row, query.unbind(0), key.unbind(0), value.unbind(0)):
        sizes = [b - a for a, b in spans]
        parts = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=dropout, is_causal=True,
                                                scale=scaling, enable_gqa=gqa)[0]
                 for qs, ks, vs in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))]
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
