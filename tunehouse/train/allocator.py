"""Keep freed memory for reuse instead of handing it back to the OS after every step (glibc).

A training step allocates and frees the same large tensors every step (activations, the LM
head's logits chunks). glibc serves blocks above its mmap threshold with fresh mmaps and returns
freed heap tops to the OS, so each step page-faults (and zeroes) hundreds of MB again. Raising the
mmap threshold to its maximum (32 MiB on 64-bit) and the trim threshold keeps that memory in the
process: SmolLM2-135M LoRA at 512 tokens, 1 thread, went from 164 to 182 tokens per CPU-second
(0.46 → 0.51 of the bf16 matmul roofline). The memory stays counted in RSS while the job runs,
which is what the peak was anyway. (PyTorch's CPU tuning guides reach for jemalloc or tcmalloc
for the same reason; this needs no extra library.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 1024 * 1024    # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1024 * 1024 * 1024  # give back freed heap tops only above 1 GiB
TOP_PAD = 64 * 1024 * 1024           # grow the heap 64 MiB at a time (virtual until touched)


def keep_freed_memory() -> bool:
    """Tune glibc malloc as above; False where there is no glibc (macOS, musl) or it refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(k, v) == 1 for k, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
