"""`/v1/hardware`: what this machine really has, in the shape the together 1.x SDK reads."""

from __future__ import annotations

import os
from datetime import datetime, timezone


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def hardware_options() -> list[dict]:
    """One option per device kind present: each CUDA GPU model (1..count of them), or the CPU."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    opts = []
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a dependency
        count = 0
    if count:
        import torch

        props = torch.cuda.get_device_properties(0)
        gpu = props.name.lower().replace(" ", "_").replace("-", "_")
        mem = round(props.total_memory / 2**30)
        for n in range(1, count + 1):
            opts.append({"object": "hardware", "id": f"{n}x_{gpu}", "pricing": {"cents_per_minute": 0.0},
                         "specs": {"gpu_type": gpu, "gpu_link": "pcie" if n == 1 else "nvlink",
                                   "gpu_memory": mem, "gpu_count": n},
                         "availability": {"status": "available"}, "updated_at": now})
    opts.append({"object": "hardware", "id": "1x_cpu", "pricing": {"cents_per_minute": 0.0},
                 "specs": {"gpu_type": "cpu", "gpu_link": f"{os.cpu_count()} cores",
                           "gpu_memory": round(_ram_gb()), "gpu_count": 1},
                 "availability": {"status": "available"}, "updated_at": now})
    return opts
