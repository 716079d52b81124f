"""Learning-rate schedules as pure functions of the optimizer step.

Semantics match transformers' `get_linear_schedule_with_warmup` and
`get_cosine_with_min_lr_schedule_with_warmup` (what together's trainer uses):
`step` is the number of optimizer steps already taken (0 for the first update), warmup is
`ceil(warmup_ratio × total_steps)` steps rising linearly from 0, then the multiplier decays to
`min_lr_ratio`. Cosine: 0.5·(1 + cos(2π·num_cycles·progress)), rescaled into [min_lr_ratio, 1].
"""

from __future__ import annotations

import math


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
