"""Compute precision: bf16 autocast where the hardware has it, and the mask dtype to match.

CPU autocast is opt-in ($TUNEHOUSE_BF16=1, or bf16=True from the caller) and only where oneDNN has
native bf16 matmuls (AVX512-BF16 / AMX): 398 vs 168 GFLOP/s on this machine (DESIGN.md).
"""

from __future__ import annotations

import os

import torch

BF16_ENV = "TUNEHOUSE_BF16"  # "1": bf16 autocast on CPUs that support it (default fp32)


def cpu_supports_bf16() -> bool:
    """Native bf16 matmul on this CPU (AVX512-BF16 / AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_for(device: torch.device, bf16: bool | None):
    """A bf16 autocast context for `device`, or None for fp32. bf16=None: on for CUDA with bf16,
    on CPU only if $TUNEHOUSE_BF16=1 and the CPU has native bf16."""
    if device.type == "cuda":
        wanted = torch.cuda.is_bf16_supported() if bf16 is None else bf16
    else:
        wanted = os.environ.get(BF16_ENV) == "1" if bf16 is None else bf16
        wanted = wanted and cpu_supports_bf16()
    return torch.autocast(device.type, dtype=torch.bfloat16) if wanted else None


def mask_dtype(autocast) -> torch.dtype:
    """The additive attention mask's dtype: bf16 under autocast (sdpa wants the query dtype)."""
    return torch.bfloat16 if autocast is not None else torch.float32
