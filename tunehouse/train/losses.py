"""Losses and metrics as pure functions of tensors (SFT part; DPO terms join this file later).

Convention: `targets` are next-token targets already aligned with the positions that predict
them (see data/packing.py), -100 = no loss. Nothing here shifts.

Sums, not means: `token_cross_entropy` returns (sum of token losses, number of trained tokens) so
a step split into micro-batches can divide by the step's total trained tokens, which makes
batch 8 × accumulation 1 equal 2 × 4 and 1 × 8 (token-weighted, not micro-batch-weighted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ −log p(target), count) over positions with target ≠ -100.

    logits [..., V] (any leading shape), targets [...]. Computed in fp32.
    """
    flat_t = targets.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_t,
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((flat_t != IGNORE).sum())


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct argmax predictions, count) over positions with target ≠ -100."""
    keep = targets != IGNORE
    correct = (logits.argmax(-1) == targets) & keep
    return int(correct.sum()), int(keep.sum())


def mean_token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of trained positions whose argmax is the target (0.0 when there are none)."""
    correct, count = token_accuracy(logits, targets)
    return correct / count if count else 0.0


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence Σ log p(target) over labelled positions. logits [B, T, V], targets [B, T] → [B]."""
    keep = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


def trained_logits(causal_lm, inputs: dict[str, torch.Tensor],
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits only at positions with a target: ([N, V], [N]).

    Runs the decoder, gathers the hidden states of the N trained positions and applies the LM
    head to those alone: with a 49k vocabulary the head dominates a small model's step, and in
    chat data most positions are prompt (DESIGN.md: 209 vs 160 tokens/s on SmolLM2-135M).
    `causal_lm` is the plain transformers model (for PEFT: `peft_model.get_base_model()`; LoRA
    layers are injected in place, so they run). Models with logit soft-capping are not handled.
    """
    hidden = causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    keep = targets != IGNORE
    return causal_lm.get_output_embeddings()(hidden[keep]), targets[keep]
