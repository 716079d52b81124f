"""Early stopping on the validation loss: a pure rule over the evaluations made so far.

    rule = EarlyStopping(patience=2, min_delta=0.0, warmup_evals=1)
    verdict = rule.verdict([(10, 1.9), (20, 1.5), (30, 1.52), (40, 1.6)])   # (step, valid loss)
    verdict.stop, verdict.best_step, verdict.best_value                      # True, 20, 1.5

- The first `warmup_evals` evaluations are ignored (early in training the loss is noisy and
  falls anyway).
- After them, an evaluation improves when its loss is below the best so far by more than
  `min_delta`; the best is then that evaluation.
- Training stops once `patience` evaluations in a row have not improved.

So stopping needs at least warmup_evals + 1 + patience evaluations, which is why a job with early
stopping must ask for that many (`n_evals`). The verdict depends only on the recorded losses, so a
resumed run reaches the same decision as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tunehouse.train.checkpoint import load_trainable, save_trainable
from tunehouse.train.events import TRAINING_COMPLETE


@dataclass(frozen=True)
class Verdict:
    stop: bool
    best_step: int | None  # None while every evaluation is still in the warm-up
    best_value: float | None
    evals_without_improvement: int


@dataclass(frozen=True)
class EarlyStopping:
    patience: int = 2
    min_delta: float = 0.0
    warmup_evals: int = 1

    def min_evals(self) -> int:
        """Evaluations needed before a stop is possible."""
        return self.warmup_evals + 1 + self.patience

    def verdict(self, evals: Sequence[tuple[int, float]]) -> Verdict:
        """`evals`: (step, validation loss) in step order."""
        best_step, best, bad = None, None, 0
        for step, loss in list(evals)[self.warmup_evals:]:
            if best is None or loss < best - self.min_delta:
                best_step, best, bad = step, loss, 0
            else:
                bad += 1
        return Verdict(bad >= self.patience, best_step, best, bad)


BEST_WEIGHTS = "early-stopping-best.safetensors"


class Stopper:
    """Early stopping inside a recipe's loop: after each evaluation, `after_eval` saves the
    weights when they are the best so far and says whether to stop; `restore_best` puts the best
    weights back for the final save. The best weights live in the job's output folder, so a
    resumed run still has them."""

    def __init__(self, rule: EarlyStopping, folder: Path):
        self.rule, self.path = rule, Path(folder) / BEST_WEIGHTS
        self.verdict: Verdict | None = None

    @classmethod
    def from_config(cls, cfg, folder: Path) -> Stopper | None:
        if not cfg.early_stopping_enabled:
            return None
        return cls(EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta,
                                 cfg.early_stopping_warmup_evals), folder)

    def after_eval(self, history: Sequence[dict], step: int, model) -> bool:
        """`history`: metric rows so far, this step's (with its valid_loss) included."""
        evals = [(h["step"], h["valid_loss"]) for h in history if h["step"] > 0 and "valid_loss" in h]
        self.verdict = self.rule.verdict(evals)
        if self.verdict.best_step == step:
            save_trainable(model, self.path)
        return self.verdict.stop

    def restore_best(self, model) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # rank 0 wrote the file: the others read it once it is there
        load_trainable(model, self.path)

    def message(self, step: int) -> str:
        v = self.verdict
        return (f"Training stopped early at step {step}: the validation loss did not improve by more than "
                f"{self.rule.min_delta:g} for {v.evals_without_improvement} evaluations; the final model has "
                f"the weights of step {v.best_step} (valid loss {v.best_value:.4f})")


def final_step(model, stopper: Stopper | None, stopped_at: int | None, total_steps: int) -> int:
    """The step the final weights come from: the last one, or after an early stop the best
    evaluation's (whose weights are put back into `model` here)."""
    if stopped_at is None or stopper is None:
        return total_steps
    stopper.restore_best(model)
    return stopper.verdict.best_step


def report_complete(reporter, stopper: Stopper | None, stopped_at: int | None, step: int, final: Path) -> None:
    if stopped_at is None or stopper is None:
        reporter.event(TRAINING_COMPLETE, "Training completed", step=step, model_path=str(final))
        return
    reporter.event(TRAINING_COMPLETE, stopper.message(stopped_at), step=stopped_at, model_path=str(final),
                   early_stopping_best_step=stopper.verdict.best_step,
                   early_stopping_best_metric_value=stopper.verdict.best_value)
