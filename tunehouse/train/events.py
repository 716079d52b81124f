"""How a training recipe reports: events, metrics, checkpoints, whether to stop, and W&B.

The recipe writes only through a `Reporter`; the worker's implementation forwards to the store
(events with the UPPERCASE protocol types of api-reference §5.6), tests use `MemoryReporter`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

# Event types the training process emits (the v1 SDK accepts only the UPPERCASE forms).
TRAINING_START = "TRAINING_START"
EPOCH_COMPLETE = "EPOCH_COMPLETE"
EVAL_COMPLETE = "EVAL_COMPLETE"
CHECKPOINT_SAVE = "CHECKPOINT_SAVE"
TRAINING_COMPLETE = "TRAINING_COMPLETE"
WANDB_INIT = "WANDB_INIT"
JOB_STOPPED = "JOB_STOPPED"
WARNING = "WARNING"

INTERMEDIATE = "Intermediate"
FINAL = "Final"


class Cancelled(Exception):
    """A cancel was requested; training stopped before `step` + 1 with no checkpoint written."""

    def __init__(self, step: int):
        super().__init__(f"training cancelled after step {step}")
        self.step = step


class Reporter(Protocol):
    def event(self, type: str, message: str, level: str = "info", **fields: Any) -> None:
        """One job event; `fields` are optional protocol fields (step, token_count, …)."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Scalars for optimizer step `step` (1-based): train_loss, lr, grad_norm, …"""

    def checkpoint(self, step: int, path: Path, checkpoint_type: str) -> None:
        """A complete checkpoint folder now exists at `path` ("Intermediate" or "Final")."""

    def should_stop(self) -> bool:
        """True once a cancel was requested; the recipe checks it before every step."""


@dataclass
class MemoryReporter:
    """Keeps everything in lists; `stop_after_steps` simulates a cancel after that many metrics."""

    events: list[dict[str, Any]] = field(default_factory=list)
    metric_rows: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    checkpoints: list[tuple[int, Path, str]] = field(default_factory=list)
    stop_after_steps: int | None = None

    def event(self, type: str, message: str, level: str = "info", **fields: Any) -> None:
        self.events.append({"type": type, "message": message, "level": level, **fields})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.metric_rows.append((step, dict(values)))

    def checkpoint(self, step: int, path: Path, checkpoint_type: str) -> None:
        self.checkpoints.append((step, Path(path), checkpoint_type))

    def should_stop(self) -> bool:
        return self.stop_after_steps is not None and len(self.metric_rows) >= self.stop_after_steps

    def losses(self, key: str = "train_loss") -> list[float]:
        return [values[key] for _, values in self.metric_rows if key in values]

    def event_types(self) -> list[str]:
        return [e["type"] for e in self.events]


@dataclass
class PrintReporter:
    """Human-readable lines on a stream (stdout by default); never asks to stop."""

    stream: TextIO = sys.stdout

    def event(self, type: str, message: str, level: str = "info", **fields: Any) -> None:
        print(f"[{level}] {type}: {message}", file=self.stream, flush=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        print(f"step {step}: {shown}", file=self.stream, flush=True)

    def checkpoint(self, step: int, path: Path, checkpoint_type: str) -> None:
        print(f"checkpoint {checkpoint_type} at step {step}: {path}", file=self.stream, flush=True)

    def should_stop(self) -> bool:
        return False


class NullWandb:
    """Stands in for a W&B run when no key is given or wandb is not installed."""

    def log(self, values: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def open_wandb(cfg, reporter: Reporter):
    """A W&B run for a config with wandb_* fields (SFTConfig, DPOConfig), else a NullWandb."""
    if not cfg.wandb_api_key:
        return NullWandb()
    try:
        import wandb
    except ImportError:
        reporter.event(WARNING, "wandb is not installed: W&B logging is off", level="warning")
        return NullWandb()
    wandb.login(key=cfg.wandb_api_key, host=cfg.wandb_base_url)
    config = {k: v for k, v in cfg.to_dict().items() if k != "wandb_api_key"}
    run = wandb.init(project=cfg.wandb_project_name, name=cfg.wandb_name,
                     entity=cfg.wandb_entity, config=config)
    if run.url:
        reporter.event(WANDB_INIT, f"Weights & Biases run started: {run.url}", wandb_url=run.url)
    else:  # an offline run (WANDB_MODE=offline) has no web page until it is synced: point at its folder
        folder = Path(run.settings.sync_dir).resolve()
        reporter.event(WANDB_INIT, f"Weights & Biases run started offline in {folder}; "
                                   f"upload it with `wandb sync {folder}`", wandb_url=folder.as_uri())
    return run
