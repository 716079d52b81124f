"""Self-describing checkpoint folders: write atomically, read back for resume.

A checkpoint folder holds everything needed to resume or to use the weights, nothing else:

    LoRA                          full weights
    adapter_config.json           config.json, generation_config.json
    adapter_model.safetensors     model.safetensors
    tunehouse_config.json         resolved SFTConfig (named so it never clashes with HF's config.json)
    trainer_state.json            step, total_steps, epoch, data position, seed, metrics so far
    optimizer.pt                  AdamW state dict (the lr is a pure function of step: no scheduler state)
    rng_state.pt                  torch RNG state(s), for dropout on resume
    tokenizer.json, tokenizer_config.json, chat_template.jinja

The final LoRA checkpoint also has `merged/`: a plain model folder (weights + tokenizer) with the
adapter folded in. Folders are written under a temporary name beside the destination and renamed
into place, so a killed process never leaves a half-written checkpoint under a real name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tunehouse.atomic import atomic_dir

CONFIG_FILE = "tunehouse_config.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
MERGED_DIR = "merged"
FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(dest: Path, *, model, tokenizer, config: dict[str, Any],
                    state: dict[str, Any], optimizer: torch.optim.Optimizer | None,
                    extra: Callable[[Path], None] | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write a complete checkpoint to `dest` atomically and return `dest`.

    `model` is a PEFT model (adapter only is written) or a plain transformers model;
    `extra(tmp_folder)` may add more (the merged model) before the rename. `state_dict` /
    `optimizer_state`: the full (gathered) ones of a sharded model, written instead of the
    model's and optimizer's own.
    """
    with atomic_dir(dest) as tmp:
        if hasattr(model, "peft_config"):
            # "auto" would look the base model name up on the hub to compare vocab sizes; only the
            # trained adapter is written (DPO may hold a frozen "reference" adapter beside it)
            model.save_pretrained(tmp, save_embedding_layers=False, selected_adapters=["default"])
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's generated model card: no facts
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / CONFIG_FILE, config)
        _write_json(tmp / STATE_FILE, {"format_version": FORMAT_VERSION, **state})
        if optimizer is not None:
            torch.save(optimizer_state or optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            torch.save(_rng_state(), tmp / RNG_FILE)
        if extra is not None:
            extra(tmp)
    return Path(dest)


def is_lora_checkpoint(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CONFIG_FILE).read_text())


def read_state(folder: Path) -> dict[str, Any]:
    state = json.loads((Path(folder) / STATE_FILE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: unsupported checkpoint format {state.get('format_version')}")
    return state


def restore_optimizer_and_rng(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """Load optimizer.pt into `optimizer` (same parameter order) and restore the RNG states."""
    from tunehouse.train.distributed import shard_optimizer_state

    folder = Path(folder)
    full = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
    optimizer.load_state_dict(shard_optimizer_state(full, optimizer))  # written by any process count
    rng = torch.load(folder / RNG_FILE, weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_trainable(model: torch.nn.Module, path: Path) -> None:
    """The trainable parameters alone (the adapter, or every weight of a full fine-tune) to one
    safetensors file, atomically: early stopping's copy of the best weights so far. Several
    processes: every rank calls it (sharded weights are gathered), rank 0 writes."""
    from safetensors.torch import save_file

    from tunehouse.train.distributed import _full, is_main

    path = Path(path)
    tensors = {n: _full(p.detach()).to("cpu", copy=True).contiguous()
               for n, p in model.named_parameters() if p.requires_grad}
    if not is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    """Copy what `save_trainable` wrote back into the same model's parameters."""
    from safetensors.torch import load_file

    from tunehouse.train.distributed import shard_into

    saved = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n in saved if n not in params]
    if missing:
        raise ValueError(f"{path} does not match this model: no parameter {missing[0]!r}")
    for name, value in saved.items():
        shard_into(params[name], value)


def list_files(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted POSIX paths relative to it."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
