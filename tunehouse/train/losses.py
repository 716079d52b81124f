"""Losses and metrics as pure functions of tensors: SFT token cross-entropy, DPO-family terms.

Convention: `targets` are next-token targets already aligned with the positions that predict
them (see data/packing.py), -100 = no loss. Nothing here shifts.

Sums, not means: `token_cross_entropy` returns (sum of token losses, number of trained tokens) so
a step split into micro-batches can divide by the step's total trained tokens, which makes
batch 8 × accumulation 1 equal 2 × 4 and 1 × 8 (token-weighted, not micro-batch-weighted).

Preference terms take per-sequence SUMS of completion log-probs (π policy, ρ reference; c the
preferred, r the non-preferred completion, shape [B]) and completion LENGTHS L (tokens, [B]), and
return (per-pair losses [B], metrics) with TRL's metric names, each a mean over the B pairs:

    DPO                 h = β·[(π_c − ρ_c) − (π_r − ρ_r)]            loss −log σ(h)
    length-normalised   h = β·[(π_c − ρ_c)/L_c − (π_r − ρ_r)/L_r]
    reference-free      ρ = 0
    SimPO               h = β·(π_c/L_c − π_r/L_r) − γ                (no reference)
    RPO                 any of the above + α·(−π_c/L_c)             (`rpo_nll`)
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


def segment_logps(logits: torch.Tensor, targets: torch.Tensor, segment: torch.Tensor,
                  n_segments: int) -> torch.Tensor:
    """Σ log p(target) per segment: logits [N, V], targets [N], segment [N] in 0…n-1 → [n].

    The packed counterpart of `sequence_logps`, for `trained_logits` output (every position
    has a target) and `preference.PairBatch.segment`.
    """
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(n_segments, dtype=picked.dtype, device=picked.device).index_add(
        0, segment.to(picked.device), picked)


def _trained_hidden(hidden: torch.Tensor, targets: torch.Tensor,
                    index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [N, H], targets [N]) of the trained positions: where targets [B, T] ≠ -100,
    or, with `index` [N] (flat into B·T, a position may repeat), those positions and targets [N]."""
    if index is None:
        keep = targets != IGNORE
        return hidden[keep], targets[keep]
    return hidden.flatten(0, 1)[index], targets


def trained_logits(causal_lm, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                   index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits only at positions with a target: ([N, V], [N]). `targets`: [B, T] with -100 where
    no loss, or with `index` the N trained positions' targets (`_trained_hidden`).

    Runs the decoder, gathers the hidden states of the N trained positions and applies the LM
    head to those alone: with a 49k vocabulary the head dominates a small model's step, and in
    chat data most positions are prompt (DESIGN.md: 209 vs 160 tokens/s on SmolLM2-135M).
    `causal_lm` is the plain transformers model (for PEFT: `peft_model.get_base_model()`; LoRA
    layers are injected in place, so they run). Models with logit soft-capping are not handled.
    """
    hidden = causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    hidden, picked = _trained_hidden(hidden, targets, index)
    return causal_lm.get_output_embeddings()(hidden), picked


def target_logps(causal_lm, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                 index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(target) at the N positions with a target, the argmax token there, and those targets:
    ([N] fp32, [N], [N]). The training path of `trained_logits`: the head runs fused with the
    log-softmax in chunks (`train/head.py`), so the [N, V] logits never exist at once; heads it
    cannot fuse (bias, soft-capping) go through `trained_logits`."""
    from tunehouse.train.head import fusable, linear_log_softmax_gather

    if not fusable(causal_lm):
        logits, picked = trained_logits(causal_lm, inputs, targets, index)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, picked[:, None])[:, 0]
        return logp, logits.detach().argmax(-1), picked
    hidden = causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    hidden, picked = _trained_hidden(hidden, targets, index)
    logp, argmax = linear_log_softmax_gather(hidden, causal_lm.get_output_embeddings().weight, picked)
    return logp, argmax, picked


def segment_sums(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Σ values per segment: values [N], segment [N] in 0…n-1 → [n] (e.g. per-sequence log-probs
    from `target_logps` and `preference.PairBatch.segment`)."""
    return torch.zeros(n_segments, dtype=values.dtype, device=values.device).index_add(
        0, segment.to(values.device), values)


# -- preference optimisation ------------------------------------------------------------------

Metrics = dict[str, float]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
             chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *, beta: float,
             normalize_by_length: bool = False) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al. 2023) sigmoid loss −log σ(β·(chosen log-ratio − rejected log-ratio)).

    log-ratio = π − ρ, divided by its own completion length when `normalize_by_length`.
    `ref_* = None` is reference-free DPO (ρ = 0); the metrics then have no `kl/estimate`.
    rewards/* are the β-scaled log-ratios; kl/estimate is the mean over both sides of (π − ρ)/L:
    a per-token log-ratio on the dataset's completions, not samples of π, so a cheap drift signal
    that can be negative (the exact KL is `token_kl`).
    """
    reference = ref_chosen is not None
    if not reference:
        ref_chosen = ref_rejected = torch.zeros_like(policy_chosen)
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if normalize_by_length:
        chosen_ratio = chosen_ratio / chosen_lengths
        rejected_ratio = rejected_ratio / rejected_lengths
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    metrics = _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, policy_chosen,
                              policy_rejected)
    if reference:
        per_token = ((policy_chosen - ref_chosen) / chosen_lengths
                     + (policy_rejected - ref_rejected) / rejected_lengths) / 2
        metrics["kl/estimate"] = per_token.mean().item()
    return losses, metrics


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *, beta: float,
               gamma: float) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024): −log σ(β·(π_c/L_c − π_r/L_r) − γ); no reference model.

    rewards/* are β × the average per-token log-prob of each side.
    """
    chosen_rewards = beta * policy_chosen / chosen_lengths
    rejected_rewards = beta * policy_rejected / rejected_lengths
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, _reward_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)


def rpo_nll(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024): mean per-token NLL of each preferred completion, [B]."""
    return -policy_chosen / chosen_lengths


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                    chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *,
                    beta: float, normalize_by_length: bool, reference_free: bool,
                    rpo_alpha: float, simpo_gamma: float) -> tuple[torch.Tensor, Metrics]:
    """The DPOConfig objective: SimPO when simpo_gamma > 0, else DPO (reference-free when
    asked), plus rpo_alpha × `rpo_nll` when rpo_alpha > 0. Per-pair losses [B] and metrics."""
    if simpo_gamma > 0:
        losses, metrics = simpo_loss(policy_chosen, policy_rejected, chosen_lengths,
                                     rejected_lengths, beta=beta, gamma=simpo_gamma)
    else:
        no_ref = reference_free or ref_chosen is None
        losses, metrics = dpo_loss(policy_chosen, policy_rejected, None if no_ref else ref_chosen,
                                   None if no_ref else ref_rejected, chosen_lengths,
                                   rejected_lengths, beta=beta,
                                   normalize_by_length=normalize_by_length)
    if rpo_alpha > 0:
        losses = losses + rpo_alpha * rpo_nll(policy_chosen, chosen_lengths)
    return losses, metrics


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> Metrics:
    def mean(t: torch.Tensor) -> float:
        return t.detach().float().mean().item()

    return {"rewards/chosen": mean(chosen_rewards), "rewards/rejected": mean(rejected_rewards),
            "rewards/margins": mean(chosen_rewards - rejected_rewards),
            "rewards/accuracies": mean(chosen_rewards > rejected_rewards),
            "logps/chosen": mean(policy_chosen), "logps/rejected": mean(policy_rejected)}


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
    """Exact KL(π‖ρ) = Σ_v π(v)·(log π(v) − log ρ(v)) per position over the whole vocabulary,
    averaged over positions where `mask` is true. logits [..., V], mask [...] → scalar (fp32)."""
    logp = torch.log_softmax(policy_logits.float(), dim=-1)
    logq = torch.log_softmax(reference_logits.float(), dim=-1)
    per_position = (logp.exp() * (logp - logq)).sum(-1)
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)
