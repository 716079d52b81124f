"""Optimizer, learning-rate schedule and data order, as plain functions of the step.

Semantics match transformers' `get_linear_schedule_with_warmup` and
`get_cosine_with_min_lr_schedule_with_warmup` (what together's trainer uses):
`step` is the number of optimizer steps already taken (0 for the first update), warmup is
`ceil(warmup_ratio × total_steps)` steps rising linearly from 0, then the multiplier decays to
`min_lr_ratio`. Cosine: 0.5·(1 + cos(2π·num_cycles·progress)), rescaled into [min_lr_ratio, 1].
"""

from __future__ import annotations

import math

import torch


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def lr_multiplier(step: int, total_steps: int, *, scheduler: str = "cosine",
                  warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0,
                  num_cycles: float = 0.5) -> float:
    """Learning-rate multiplier (of the peak rate) for the update after `step` steps."""
    warm = warmup_steps(total_steps, warmup_ratio)
    if step < warm:
        return step / max(1, warm)
    progress = (step - warm) / max(1, total_steps - warm)
    if scheduler == "linear":
        factor = max(0.0, 1.0 - progress)
    elif scheduler == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    else:
        raise ValueError(f'scheduler must be "linear" or "cosine", got {scheduler!r}')
    return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)


def adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no decay on biases and norm weights."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if _decays(n, p)]
    no_decay = [p for n, p in named if not _decays(n, p)]
    # fused: one kernel over every tensor per step (the default on a CPU is a Python loop of ~10
    # ops per tensor: 420 tensors for LoRA on all linear layers of SmolLM2-135M); FSDP's sharded
    # parameters (DTensors) keep the default implementation
    plain = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for _, p in named)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=plain or None)


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim >= 2 and "norm" not in name.lower() and not name.endswith("bias")


def spaced_steps(total_steps: int, n: int) -> set[int]:
    """n steps spread evenly over 1…total_steps, the last one being total_steps."""
    return {max(1, round(total_steps * k / n)) for k in range(1, n + 1)} if n > 0 else set()


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation of the rows for `epoch`, so resume needs only the step."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=generator).tolist()
