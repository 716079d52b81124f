"""Child processes that do not outlive whoever started them (Linux's parent-death signal)."""

from __future__ import annotations

import ctypes
import signal
import sys

# Loaded before any fork: the function run between fork and exec should only make the call.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when the thread that started it ends. As a
    Popen `preexec_fn` (no arguments: SIGTERM, or `functools.partial`) it applies to the child;
    the starting thread must live as long as the child should (a supervisor or executor thread)."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig))
