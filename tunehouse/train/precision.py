"""Compute precision: bf16 wherever the hardware has it, frozen weights stored in it, and the mask
dtype to match.

bf16 is the default on CUDA devices with bf16 and on CPUs where oneDNN has native bf16 matmuls
(AVX512-BF16 / AMX): 398 vs 168 GFLOP/s on the 2-core AVX512-BF16 machine of DESIGN.md.
$TUNEHOUSE_BF16=0 (or bf16=False from the caller) keeps fp32; $TUNEHOUSE_BF16=1 asks for bf16
(still only where the hardware has it).

Under bf16 the recipes also store the frozen base weights in bf16 (`store_frozen_in`): autocast
would otherwise cast every frozen fp32 weight to bf16 again at each forward (autocast caches casts
only of weights that require grad), which was 28% of a SmolLM2-135M LoRA step's CPU time. Trained
weights (LoRA A/B, or every weight in full fine-tuning) stay fp32 masters.
"""

from __future__ import annotations

import os

import torch

BF16_ENV = "TUNEHOUSE_BF16"  # "0": fp32 everywhere; "1" or unset: bf16 where the hardware has it


def cpu_supports_bf16() -> bool:
    """Native bf16 matmul on this CPU (AVX512-BF16 / AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_default(device: torch.device) -> bool:
    """Whether a job on `device` runs in bf16 when the caller does not say: yes where the hardware
    has native bf16, unless $TUNEHOUSE_BF16=0."""
    if os.environ.get(BF16_ENV) == "0":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_bf16()


def autocast_for(device: torch.device, bf16: bool | None):
    """A bf16 autocast context for `device`, or None for fp32. bf16=None: `bf16_default(device)`;
    bf16=True on hardware without native bf16 gives fp32 (emulated bf16 is slower than fp32)."""
    if bf16 is None:
        wanted = bf16_default(device)
    elif device.type == "cuda":
        wanted = bf16 and torch.cuda.is_bf16_supported()
    else:
        wanted = bf16 and cpu_supports_bf16()
    return torch.autocast(device.type, dtype=torch.bfloat16) if wanted else None


def mask_dtype(autocast) -> torch.dtype:
    """The additive attention mask's dtype: bf16 under autocast (sdpa wants the query dtype)."""
    return torch.bfloat16 if autocast is not None else torch.float32


def store_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Convert the floating-point parameters that do not require grad to `dtype`, in place (tied
    weights once); buffers (rotary tables) stay as they are. Returns how many were converted."""
    n = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n
