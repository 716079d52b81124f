"""Supervised fine-tuning recipe, top to bottom: setup → loop → checkpoints → final save/merge.

    run_sft(cfg, model_path=..., training_path=..., validation_path=None, output_dir=...,
            reporter=PrintReporter())

Batch vocabulary: `batch_size` rows (packed sequences) per optimizer step, split into
`gradient_accumulation_steps` micro-batches. A step's loss is Σ token losses / Σ trained tokens
over all its micro-batches, so 8 × 1, 2 × 4 and 1 × 8 give the same loss and gradients.
Under torchrun (train/distributed.py) `batch_size` is the global batch: each of N processes
runs its share of the rows, and the sums run over all of them, so N processes give the losses
of one.

Output folder:
    output_dir/checkpoints/step-000010/   intermediate checkpoints (see train/checkpoint.py)
    output_dir/final/                     final checkpoint; LoRA adds final/merged/ (plain model)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunehouse.data.packing import Batch, collate, pack
from tunehouse.data.tokenize import Tokenized, pad_token_id, read_rows, split_packed, tokenize_row
from tunehouse.train import allocator, attention, distributed
from tunehouse.train import recipe
from tunehouse.train import events as ev
from tunehouse.train.config import SFTConfig
from tunehouse.train import early_stopping
from tunehouse.train.events import Cancelled, NullWandb, Reporter, open_wandb
from tunehouse.train.lora import parameter_counts
from tunehouse.train.precision import autocast_for, cpu_supports_bf16, mask_dtype
from tunehouse.train.schedule import adamw, epoch_order, spaced_steps

__all__ = ["Cancelled", "cpu_supports_bf16", "read_rows", "run_sft"]  # older import paths

@dataclass
class _Run:
    """What the loop needs, built once by the setup stages of `run_sft`."""

    cfg: SFTConfig
    model: torch.nn.Module          # PEFT model (LoRA) or plain model (full)
    causal_lm: torch.nn.Module      # the transformers model inside
    policy: torch.nn.Module         # causal_lm's training forward, under DDP/FSDP when N > 1
    dist: distributed.Dist
    tokenizer: object
    optimizer: torch.optim.Optimizer
    train_rows: list[list[Tokenized]]
    valid_rows: list[list[Tokenized]]
    pad_id: int
    autocast: contextlib.AbstractContextManager | None
    mask_dtype: torch.dtype | None  # None: packed attention, no mask (train/attention.py)
    steps_per_epoch: int
    total_steps: int
    output_dir: Path
    reporter: Reporter


def run_sft(cfg: SFTConfig, *, model_path: Path, training_path: Path,
            validation_path: Path | None, output_dir: Path, reporter: Reporter,
            resume_from: Path | None = None, init_adapter: Path | None = None,
            bf16: bool | None = None) -> Path:
    """Train, write checkpoints and the final model; return the final checkpoint folder.

    resume_from: a checkpoint folder of this same job (same step, data order and RNG after).
    init_adapter: continue training an existing LoRA adapter of the same rank (a different
      shape, or full training, continues from a merged model passed as model_path instead).
    bf16: autocast to bfloat16; None = wherever the hardware has native bf16 (CUDA or CPU) unless
      $TUNEHOUSE_BF16=0. Raises `Cancelled` when reporter.should_stop() turns true.
    """
    # Processes, seed, device, precision; batch_size "max" for this device; rank 0 alone reports
    d = distributed.setup()
    allocator.keep_freed_memory()  # reuse the step's large blocks instead of page-faulting them in again
    reporter = distributed.rank_reporter(reporter, d)
    torch.manual_seed(cfg.random_seed)
    device = d.device
    cfg = recipe.resolve_batch(cfg, model_path, device)
    autocast = autocast_for(device, bf16)

    # Tokenizer and model (+ LoRA), wrapped for N processes (DDP for LoRA, FSDP for full)
    tokenizer, causal_lm, model = recipe.load_policy(cfg, model_path, resume_from, init_adapter, autocast)
    if recipe.activation_checkpointing(cfg, causal_lm):
        reporter.event(ev.WARNING, "Activation checkpointing on (long sequences)", level="info")
    if kernels := recipe.fused_kernels(causal_lm, device):
        reporter.event(ev.WARNING, kernels, level="info")
    model.to(device).train()
    policy = distributed.wrap(causal_lm, lora=cfg.lora, autocast=autocast, d=d)

    # Data: tokenize, drop examples with nothing to learn, pack into rows
    pad_id = pad_token_id(tokenizer)
    train_rows = _rows(_examples(training_path, tokenizer, cfg, reporter, "training"), cfg)
    valid_rows = []
    if validation_path is not None and cfg.n_evals > 0:
        valid_rows = _rows(_examples(validation_path, tokenizer, cfg, reporter, "validation"), cfg)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.n_epochs

    # Optimizer (AdamW, no decay on biases and norms); the lr is set from the schedule each step
    optimizer = adamw(model, cfg.learning_rate, cfg.weight_decay)

    # Resume: weights came with the model above; optimizer, RNG and position from the folder
    start_step, history = recipe.resume(resume_from, optimizer, total_steps)

    trainable, total = parameter_counts(model)
    reporter.event(ev.TRAINING_START, d.started(), total_steps=total_steps,
                   param_count=trainable, processes=d.world, token_count=sum(
                       ex.num_tokens for row in train_rows for ex in row) * cfg.n_epochs)
    masks = None if attention.enable(causal_lm) else mask_dtype(autocast)
    run = _Run(cfg, model, causal_lm, policy, d, tokenizer, optimizer, train_rows, valid_rows, pad_id,
               autocast, masks, steps_per_epoch, total_steps, Path(output_dir), reporter)
    wandb = open_wandb(cfg, reporter) if d.is_main else NullWandb()
    stopper = early_stopping.Stopper.from_config(cfg, output_dir)
    try:
        history, stopped_at = _train_loop(run, start_step, history, wandb, stopper)
    finally:
        wandb.finish()

    # Final save: checkpoint (+ merged model for LoRA); after an early stop, the best weights
    final_step = early_stopping.final_step(model, stopper, stopped_at, total_steps)
    final = recipe.save(run, final_step, history, Path(output_dir) / "final", merged=cfg.lora)
    reporter.checkpoint(final_step, final, ev.FINAL)
    early_stopping.report_complete(reporter, stopper, stopped_at, final_step, final)
    return final


def _train_loop(run: _Run, start_step: int, history: list[dict], wandb,
                stopper: early_stopping.Stopper | None) -> tuple[list[dict], int | None]:
    """Optimizer steps start_step+1 … total_steps → (metrics history, the step early stopping
    ended training at, or None)."""
    cfg, reporter = run.cfg, run.reporter
    intermediate = spaced_steps(run.total_steps, cfg.n_checkpoints) - {run.total_steps}
    evals = spaced_steps(run.total_steps, cfg.n_evals) if run.valid_rows else set()
    order, order_epoch = None, -1
    for step in range(start_step + 1, run.total_steps + 1):
        if distributed.any_across(reporter.should_stop(), run.dist):
            raise Cancelled(step - 1)
        # Data position: a seeded permutation of rows per epoch, so resume needs only the step
        epoch, in_epoch = divmod(step - 1, run.steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(run.train_rows), cfg.random_seed, epoch), epoch
        picked = order[in_epoch * cfg.batch_size:(in_epoch + 1) * cfg.batch_size]
        rows = [run.train_rows[i] for i in picked]

        lr = recipe.learning_rate(cfg, step, run.total_steps)
        t0 = time.perf_counter()
        loss, accuracy, grad_norm, real_tokens = train_step(run, rows, lr)
        seconds = time.perf_counter() - t0
        values = {"train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_second": real_tokens / seconds,
                  "train_mean_token_accuracy": accuracy, "epoch": step / run.steps_per_epoch}

        if step in evals:
            valid_loss, valid_accuracy = evaluate(run)
            values.update(valid_loss=valid_loss, valid_mean_token_accuracy=valid_accuracy)
            reporter.event(ev.EVAL_COMPLETE, f"Evaluation complete, valid loss {valid_loss:.4f}",
                           step=step)
        reporter.metrics(step, values)
        wandb.log(values, step=step)
        history.append({"step": step, **values})
        recipe.after_step(run, step, in_epoch, history, intermediate)
        if stopper is not None and step in evals and stopper.after_eval(history, step, run.model):
            return history, step
    return history, None


def train_step(run: _Run, rows: list[list[Tokenized]], lr: float) -> tuple[float, float, float, int]:
    """One optimizer step over the global batch `rows`, of which this rank runs its share →
    (loss, token accuracy, grad norm, real tokens), all over every rank's rows."""
    d = run.dist
    parts = distributed.micro_batches(len(rows), run.cfg.gradient_accumulation_steps, d)
    # weight 0: a rank with no rows left runs the first row as a stand-in (DDP/FSDP need it there)
    micro = [(collate([rows[i] for i in idx or [0]], run.pad_id, run.mask_dtype), float(bool(idx)))
             for idx in parts]
    step_tokens = distributed.sum_across([sum(b.num_trained_tokens * w for b, w in micro)], d)[0]
    loss_sum, correct, real_tokens = 0.0, 0.0, 0.0
    for k, (batch, weight) in enumerate(micro):
        with distributed.gradient_sync(run.policy, last=k == len(micro) - 1):
            with run.autocast or contextlib.nullcontext():
                logp, argmax, targets = run.policy(_to(batch, run), _to_t(batch, run))
            loss = -logp.sum()
            # token-weighted over the whole step, every rank's tokens; × N undoes DDP/FSDP's mean
            (loss * (weight * d.world) / step_tokens).backward()
        loss_sum += loss.item() * weight
        correct += int((argmax == targets).sum()) * weight
        real_tokens += batch.num_tokens * weight
    loss_sum, correct, real_tokens = distributed.sum_across([loss_sum, correct, real_tokens], d)
    grad_norm = recipe.optimizer_step(run.optimizer, run.cfg.max_grad_norm, lr)
    return loss_sum / step_tokens, correct / step_tokens, grad_norm, int(real_tokens)


@torch.no_grad()
def evaluate(run: _Run) -> tuple[float, float]:
    """Token-weighted validation loss and accuracy, dropout off (every rank evaluates all rows:
    FSDP needs each in every forward, and evaluation is a small part of a job)."""
    run.model.eval()
    size = run.cfg.micro_batch_size()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(run.valid_rows), size):
        batch = collate(run.valid_rows[start:start + size], run.pad_id, run.mask_dtype)
        with run.autocast or contextlib.nullcontext():
            logp, argmax, targets = run.policy(_to(batch, run), _to_t(batch, run))
        loss_sum -= logp.sum().item()
        correct += int((argmax == targets).sum())
        count += targets.numel()
    run.model.train()
    return loss_sum / max(count, 1), correct / max(count, 1)


def _examples(path: Path, tokenizer, cfg: SFTConfig, reporter: Reporter, what: str):
    examples = [tokenize_row(row, tokenizer, train_on_inputs=cfg.train_on_inputs,
                             max_seq_length=cfg.max_seq_length)
                for packed in read_rows(path) for row in split_packed(packed)]
    truncated = sum(ex.truncated for ex in examples)
    kept = [ex for ex in examples if ex.num_trained_tokens > 0]
    if truncated:
        reporter.event(ev.WARNING, f"{truncated} {what} examples longer than max_seq_length "
                       f"{cfg.max_seq_length} were truncated", level="warning")
    if len(kept) < len(examples):
        reporter.event(ev.WARNING, f"{len(examples) - len(kept)} {what} examples have no trained "
                       "tokens (after truncation) and were skipped", level="warning")
    if not kept:
        raise ValueError(f"the {what} data has no example with trained tokens")
    return kept


def _rows(examples: list[Tokenized], cfg: SFTConfig) -> list[list[Tokenized]]:
    if not cfg.packing:
        return [[ex] for ex in examples]
    return [[examples[i] for i in row] for row in pack(examples, cfg.max_seq_length)]


def _to(batch: Batch, run: _Run) -> dict[str, torch.Tensor]:
    return {k: v.to(run.dist.device) for k, v in batch.model_inputs().items()}


def _to_t(batch: Batch, run: _Run) -> torch.Tensor:
    return batch.targets.to(run.dist.device)
