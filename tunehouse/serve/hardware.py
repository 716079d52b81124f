"""`/v1/hardware` and the hardware a dedicated endpoint asks for, matched to what this machine has.

Hardware ids follow the together 1.x CLI: `<count>x_<gpu>`, e.g. `4x_nvidia_h100_80gb_sxm` from
`--gpu h100 --gpu-count 4`. A request is matched by GPU kind (the model tokens of the name, e.g.
`h100`; vendor, memory size and form factor are ignored, so `nvidia_h100_80gb_sxm` matches a
device torch calls "NVIDIA H100 80GB HBM3") and by count. An endpoint process runs its model on
one device (the engine keeps a model on a single device and does not split it across GPUs), so
only `1x_…` ids are offered and a larger count is refused with that reason, never silently taken.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache

from tunehouse.errors import InvalidInput

CPU_ID = "1x_cpu"
_ID_RE = re.compile(r"^(\d+)x_([a-z0-9_\-]+)$")
# Name tokens that say who made a GPU or how it is packaged, not which GPU it is.
_NOT_KIND = re.compile(r"^(nvidia|amd|tesla|geforce|\d+gb|sxm\d?|pcie|nvl|hbm\d*e?|mig.*)$")


@dataclass(frozen=True)
class Devices:
    """What this machine offers: `count` GPUs named `gpu` (torch's name, normalised) or none."""

    gpu: str | None
    count: int
    gpu_memory_gib: int
    cpu_cores: int
    ram_gib: int


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _kind(name: str) -> frozenset[str]:
    return frozenset(t for t in _slug(name).split("_") if t and not _NOT_KIND.match(t))


@cache  # devices do not come and go while the server runs; asking torch initialises CUDA
def local_devices() -> Devices:
    try:
        ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError):
        ram = 0
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        return Devices(None, 0, 0, os.cpu_count() or 1, ram)
    props = torch.cuda.get_device_properties(0)
    return Devices(_slug(props.name), count, round(props.total_memory / 2**30), os.cpu_count() or 1, ram)


def hardware_options(devices: Devices | None = None) -> list[dict]:
    """`1x_<gpu>` when the machine has a GPU, and always `1x_cpu`, in the shape the 1.x SDK reads."""
    d = devices or local_devices()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def item(hw_id: str, gpu_type: str, link: str, memory: int) -> dict:
        return {"object": "hardware", "id": hw_id, "pricing": {"cents_per_minute": 0.0},
                "specs": {"gpu_type": gpu_type, "gpu_link": link, "gpu_memory": memory, "gpu_count": 1},
                "availability": {"status": "available"}, "updated_at": now}

    gpus = [item(f"1x_{d.gpu}", d.gpu, "pcie", d.gpu_memory_gib)] if d.gpu else []
    return gpus + [item(CPU_ID, "cpu", f"{d.cpu_cores} cores", d.ram_gib)]


def training_hardware(settings) -> dict:
    """What a worker of these settings trains a job on: `{"processes": 2, "backend": "gloo",
    "gpus": null, "gpu_type": null}` (a separate `tunehouse worker` may have other settings)."""
    from tunehouse.worker.loop import training_devices

    gpus, n = training_devices(settings)
    return {"processes": n, "backend": ("nccl" if gpus else "gloo") if n > 1 else None,
            "gpus": gpus, "gpu_type": local_devices().gpu if gpus else None}


def match_hardware(requested: str, devices: Devices | None = None) -> str:
    """The id of this machine's hardware that `requested` names, or an InvalidInput saying what it
    has. The message starts with "invalid hardware provided", on which the 1.x CLI lists the options."""
    d = devices or local_devices()
    ids = [h["id"] for h in hardware_options(d)]
    if requested in ids:
        return requested
    m = _ID_RE.match(requested.strip().lower())
    count, name = (int(m.group(1)), m.group(2)) if m else (None, requested)
    have = (f"{d.count} × {d.gpu} GPU{'s' if d.count > 1 else ''} and the CPU" if d.gpu
            else "no GPU, only the CPU")
    prefix = f"invalid hardware provided: {requested!r}"
    if count is None or count < 1:
        raise InvalidInput(f"{prefix} is not a hardware id (`<count>x_<gpu>`, e.g. {ids[0]}). "
                           f"Use one of: {', '.join(ids)}.", param="hardware")
    if name == "cpu" or not (d.gpu and _kind(name) and _kind(name) <= _kind(d.gpu)):
        raise InvalidInput(f"{prefix}: this server has {have}. Use one of: {', '.join(ids)}.", param="hardware")
    if count > 1:
        raise InvalidInput(f"{prefix}: an endpoint runs its model on one GPU here (the engine does not split a "
                           f"model across GPUs). Use 1x_{d.gpu}.", param="hardware")
    return f"1x_{d.gpu}"


def is_cpu(hardware_id: str) -> bool:
    return hardware_id == CPU_ID
