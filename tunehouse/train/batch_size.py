"""What `batch_size: "max"` means on this machine: the largest batch whose training memory fits
the device, from the model's shape and the free memory (pure maths in `fit_batch`).

On a CPU the answer is capped at 8: measured here, tokens/s does not grow with the batch on a
CPU (DESIGN.md: 2 x 512 tokens already saturates both cores), so a larger batch only means
fewer optimizer steps over the same data.
"""

from __future__ import annotations

import json
from pathlib import Path

CPU_MAX_BATCH = 8
ACTIVATION_BYTES_PER_TOKEN_LAYER = 34  # x hidden size, 16-bit activations without recompute
HEADROOM = 0.8  # of free memory: allocator fragmentation, the CUDA context, data


def fit_batch(free_bytes: int, *, n_params: int, hidden: int, n_layers: int, seq_len: int,
              bytes_per_param: int, lora: bool, max_batch: int) -> int:
    """Largest power of two ≤ max_batch whose memory fits in `free_bytes` (≥ 1).

    memory = weights + (full weights only) fp32 gradients and two Adam moments
           + batch x seq_len x n_layers x hidden x 34 bytes (Korthikanti et al. 2022, §4.1,
             with fused attention: no s² score term), scaled by bytes_per_param / 2.
    """
    fixed = n_params * bytes_per_param + (0 if lora else n_params * 12)
    per_row = seq_len * n_layers * hidden * ACTIVATION_BYTES_PER_TOKEN_LAYER * bytes_per_param / 2
    room = free_bytes * HEADROOM - fixed
    fits = int(room // per_row) if room > 0 else 0
    size = 1
    while size * 2 <= min(fits, max_batch):
        size *= 2
    return size


def free_memory(device: str) -> int:
    """Free bytes on `device` ("cuda", "cuda:N" or "cpu")."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_max(model_dir: Path | str | None, *, seq_len: int, lora: bool, max_batch: int,
                device: str | None = None) -> int:
    """`"max"` for a model folder on `device` (default: this machine's). Without a readable
    config.json (a hub id not fetched yet) the model's size is unknown: the CPU cap, or 1 on a GPU."""
    device = device or default_device()
    cap = CPU_MAX_BATCH if device == "cpu" else max_batch
    shape = _shape(model_dir)
    if shape is None:
        return min(cap, max_batch) if device == "cpu" else 1
    bytes_per_param = 2 if device != "cpu" else 4  # bf16 on a GPU; fp32 master weights on a CPU
    return fit_batch(free_memory(device), **shape, seq_len=seq_len, bytes_per_param=bytes_per_param,
                     lora=lora, max_batch=min(cap, max_batch))


def _shape(model_dir: Path | str | None) -> dict | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    except (TypeError, OSError, ValueError, KeyError):
        return None
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    vocab = int(cfg.get("vocab_size") or 32000)
    tied = cfg.get("tie_word_embeddings", True)
    # attention (4 h²) + MLP (3 h·i) per layer, embeddings (and the head when untied)
    n_params = layers * (4 * hidden * hidden + 3 * hidden * inter) + vocab * hidden * (1 if tied else 2)
    return {"n_params": n_params, "hidden": hidden, "n_layers": layers}
