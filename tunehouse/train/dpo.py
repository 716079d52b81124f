"""Preference fine-tuning recipe (DPO, length-normalised DPO, RPO, SimPO), top to bottom:
setup → reference log-probs → loop → checkpoints → final save/merge. Same skeleton as sft.py.

    run_dpo(cfg, model_path=..., training_path=..., validation_path=None, output_dir=...,
            reporter=PrintReporter(), reference_cache_dir=cache, reference_id="base-model@rev")

Batch vocabulary: `batch_size` preference pairs per optimizer step, split into
`gradient_accumulation_steps` micro-batches. A step's loss is the mean of the per-pair losses over
all its pairs (pair-weighted), so 8 × 1, 2 × 4 and 1 × 8 give the same loss and gradients; on
N processes (train/distributed.py) `batch_size` is the global batch, each rank runs its share of
the pairs and the sums run over all ranks, so N processes give the losses of one. Both
sides of every pair of a micro-batch run in one forward pass, the pair's prompt computed once for
both (data/preference.py), and the LM head runs only at completion positions (`target_logps`).

The reference is the initial policy (step 0):
  - LoRA from a fresh adapter (B = 0): the base model = the same model with adapters disabled;
  - LoRA continuing `init_adapter`: base + that adapter, loaded a second time, frozen, as the PEFT
    adapter "reference" and switched to for reference passes (one base model in memory);
  - full weights: a frozen copy of the initial weights, loaded only for the precomputation and
    for KL at evaluation, and freed after.
Its per-pair log-prob sums are computed ONCE per dataset before training (on N processes each
computes a share and all gather it, so every rank holds all of them) and cached in
`reference_cache_dir/<key>.pt` (key: `reference_cache_key`), so later epochs, a resumed run and
other jobs on the same data and model run the policy only. SimPO and `dpo_reference_free` run no
reference pass in training; at evaluation their `kl` is still measured for LoRA (adapters off is
one cheap extra forward) and left out for full weights (it would need a second model loaded).

Output folder: as run_sft (checkpoints/step-NNNNNN/, final/, final/merged/ for LoRA).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tunehouse.data.preference import Pair, PairBatch, collate_pairs, tokenize_pair
from tunehouse.data.tokenize import pad_token_id, read_rows
from tunehouse.store.blobs import sha256_file
from tunehouse.train import allocator, attention, distributed
from tunehouse.train import recipe
from tunehouse.train import events as ev
from tunehouse.train.config import DPOConfig
from tunehouse.train import early_stopping
from tunehouse.train.events import Cancelled, NullWandb, Reporter, open_wandb
from tunehouse.train.lora import adapters_disabled, parameter_counts
from tunehouse.train.losses import (
    preference_loss, segment_logps, segment_sums, target_logps, token_kl, trained_logits,
)
from tunehouse.train.precision import autocast_for, mask_dtype
from tunehouse.train.schedule import adamw, epoch_order, spaced_steps

__all__ = ["Cancelled", "reference_cache_key", "reference_model", "run_dpo"]

REFERENCE_VERSION = 3  # bump when tokenisation, truncation or the log-prob sums change (2: fused head, packed attention; 3: shared prompt)
REFERENCE_ADAPTER = "reference"
EVAL_SAMPLE = 32  # training pairs evaluated when there is no validation file
KL_CHUNK = 512  # positions per full-vocabulary KL chunk (512 × 49k vocab × 4 B = 100 MB)


@dataclass
class _Run:
    """What the loop needs, built once by the setup stages of `run_dpo`."""

    cfg: DPOConfig
    model: torch.nn.Module          # PEFT model (LoRA) or plain model (full)
    causal_lm: torch.nn.Module      # the transformers model inside (for reference passes)
    policy: torch.nn.Module         # causal_lm's training forward, under DDP/FSDP when N > 1
    dist: distributed.Dist
    tokenizer: object
    optimizer: torch.optim.Optimizer
    train_pairs: list[Pair]
    valid_pairs: list[Pair]
    train_ref: torch.Tensor | None  # [n, 2] reference (chosen, rejected) sums; None: reference-free
    valid_ref: torch.Tensor | None
    pad_id: int
    autocast: contextlib.AbstractContextManager | None
    mask_dtype: torch.dtype | None  # None: packed attention, no mask (train/attention.py)
    steps_per_epoch: int
    total_steps: int
    output_dir: Path
    reporter: Reporter
    reference_path: Path | None = None  # full weights: where the frozen initial weights are
    frozen: torch.nn.Module | None = None  # full weights: the loaded frozen copy, while needed


def run_dpo(cfg: DPOConfig, *, model_path: Path, training_path: Path,
            validation_path: Path | None, output_dir: Path, reporter: Reporter,
            resume_from: Path | None = None, init_adapter: Path | None = None,
            reference_cache_dir: Path | None = None, reference_id: str = "",
            bf16: bool | None = None) -> Path:
    """Train, write checkpoints and the final model; return the final checkpoint folder.

    resume_from / init_adapter / bf16: as run_sft. reference_cache_dir: where reference log-probs
    are cached (None: computed in memory for this run only). reference_id: names the reference
    model for the cache key (the caller knows it: base model, parent checkpoint); "" falls back to
    the resolved model_path and init_adapter paths. Raises `Cancelled` on reporter.should_stop().
    """
    # Processes, seed, device, precision; batch_size "max" for this device; rank 0 alone reports
    d = distributed.setup()
    allocator.keep_freed_memory()  # reuse the step's large blocks instead of page-faulting them in again
    reporter = distributed.rank_reporter(reporter, d)
    torch.manual_seed(cfg.random_seed)
    device = d.device
    cfg = recipe.resolve_batch(cfg, model_path, device)
    autocast = autocast_for(device, bf16)

    # Tokenizer and model (+ LoRA; + the frozen "reference" adapter when continuing one)
    tokenizer, causal_lm, model = recipe.load_policy(cfg, model_path, resume_from, init_adapter, autocast)
    if recipe.activation_checkpointing(cfg, causal_lm):
        reporter.event(ev.WARNING, "Activation checkpointing on (long sequences)", level="info")
    if kernels := recipe.fused_kernels(causal_lm, device):
        reporter.event(ev.WARNING, kernels, level="info")
    if cfg.lora and init_adapter is not None:
        model.load_adapter(str(init_adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter("default")
    model.to(device).train()
    policy = distributed.wrap(causal_lm, lora=cfg.lora, autocast=autocast, d=d)  # DDP (LoRA) / FSDP (full)

    # Data: tokenize pairs (truncating), pick the evaluation pairs
    pad_id = pad_token_id(tokenizer)
    train_pairs = _pairs(training_path, tokenizer, cfg, reporter, "training")
    valid_pairs, eval_sample = [], []
    if cfg.n_evals > 0 and validation_path is not None:
        valid_pairs = _pairs(validation_path, tokenizer, cfg, reporter, "validation")
    elif cfg.n_evals > 0:
        eval_sample = sorted(epoch_order(len(train_pairs), cfg.random_seed, -1)[:EVAL_SAMPLE])
        valid_pairs = [train_pairs[i] for i in eval_sample]
    steps_per_epoch = math.ceil(len(train_pairs) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.n_epochs

    # Optimizer (AdamW, no decay on biases and norms); the lr is set from the schedule each step
    optimizer = adamw(model, cfg.learning_rate, cfg.weight_decay)

    # Reference log-probs: once per dataset, from the cache when another run computed them
    masks = None if attention.enable(causal_lm) else mask_dtype(autocast)
    run = _Run(cfg, model, causal_lm, policy, d, tokenizer, optimizer, train_pairs, valid_pairs, None, None,
               pad_id, autocast, masks, steps_per_epoch, total_steps, Path(output_dir), reporter,
               reference_path=None if cfg.lora else Path(model_path))
    if not cfg.dpo_reference_free:
        adapter = Path(init_adapter).resolve() if init_adapter is not None else ""
        ident = reference_id or f"{Path(model_path).resolve()}|{adapter}"
        cached = _cached_reference(run, reference_cache_dir, ident, autocast is not None)
        run.train_ref = cached(training_path, train_pairs)
        if validation_path is not None and valid_pairs:
            run.valid_ref = cached(validation_path, valid_pairs)
        elif valid_pairs:
            run.valid_ref = run.train_ref[eval_sample]

    # Resume: weights came with the model above; optimizer, RNG and position from the folder
    start_step, history = recipe.resume(resume_from, optimizer, total_steps)

    trainable, total = parameter_counts(model)
    reporter.event(ev.TRAINING_START, d.started(), total_steps=total_steps,
                   param_count=trainable, processes=d.world, token_count=sum(
                       pair.num_tokens for pair in train_pairs) * cfg.n_epochs)
    wandb = open_wandb(cfg, reporter) if d.is_main else NullWandb()
    stopper = early_stopping.Stopper.from_config(cfg, output_dir)
    try:
        history, stopped_at = _train_loop(run, start_step, history, wandb, stopper)
    finally:
        wandb.finish()

    # Final save: checkpoint (+ merged model for LoRA); the reference adapter is not part of it
    if cfg.lora and REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)
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
    evals = spaced_steps(run.total_steps, cfg.n_evals) if run.valid_pairs else set()
    if evals and start_step == 0:  # step 0: policy = reference, so the KL curve starts at 0
        values = evaluate(run)
        reporter.metrics(0, values)
        wandb.log(values, step=0)
        history.append({"step": 0, **values})
    order, order_epoch = None, -1
    for step in range(start_step + 1, run.total_steps + 1):
        if distributed.any_across(reporter.should_stop(), run.dist):
            raise Cancelled(step - 1)
        # Data position: a seeded permutation of pairs per epoch, so resume needs only the step
        epoch, in_epoch = divmod(step - 1, run.steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(run.train_pairs), cfg.random_seed, epoch), epoch
        picked = order[in_epoch * cfg.batch_size:(in_epoch + 1) * cfg.batch_size]

        lr = recipe.learning_rate(cfg, step, run.total_steps)
        t0 = time.perf_counter()
        loss, metrics, grad_norm, real_tokens = train_step(run, picked, lr)
        seconds = time.perf_counter() - t0
        values = {"train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "pairs_per_second": len(picked) / seconds,
                  "tokens_per_second": real_tokens / seconds, **metrics,
                  "epoch": step / run.steps_per_epoch}

        if step in evals:
            values.update(evaluate(run))
            reporter.event(ev.EVAL_COMPLETE,
                           f"Evaluation complete, valid loss {values['valid_loss']:.4f}", step=step)
        reporter.metrics(step, values)
        wandb.log(values, step=step)
        history.append({"step": step, **values})
        recipe.after_step(run, step, in_epoch, history, intermediate)
        if stopper is not None and step in evals and stopper.after_eval(history, step, run.model):
            return history, step
    return history, None


def train_step(run: _Run, picked: list[int], lr: float) -> tuple[float, dict, float, int]:
    """One optimizer step over the global batch of pairs `picked`, of which this rank runs its
    share → (loss, metrics, grad norm, real tokens), all over every rank's pairs."""
    d = run.dist
    parts = distributed.micro_batches(len(picked), run.cfg.gradient_accumulation_steps, d)
    step_pairs = len(picked)  # the same on every rank: the divisor needs no all-reduce
    loss_sum, sums, tokens = 0.0, {}, 0.0
    for k, idx in enumerate(parts):
        # weight 0: a rank with no pairs left runs the first pair as a stand-in (DDP/FSDP need it there)
        indices, weight = [picked[i] for i in idx or [0]], float(bool(idx))
        batch = _collate(run, [run.train_pairs[i] for i in indices])
        ref = None if run.train_ref is None else run.train_ref[indices]
        with distributed.gradient_sync(run.policy, last=k == len(parts) - 1):
            with run.autocast or contextlib.nullcontext():
                losses, metrics, _ = _pair_losses(run, batch, ref)
            # pair-weighted over the whole step, every rank's pairs; × N undoes DDP/FSDP's mean
            (losses.sum() * (weight * d.world) / step_pairs).backward()
        loss_sum += losses.sum().item() * weight
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value * len(indices) * weight
        tokens += batch.num_tokens * weight
    names = sorted(sums)
    loss_sum, tokens, *totals = distributed.sum_across([loss_sum, tokens, *(sums[n] for n in names)], d)
    grad_norm = recipe.optimizer_step(run.optimizer, run.cfg.max_grad_norm, lr)
    metrics = {n: total / step_pairs for n, total in zip(names, totals)}
    return loss_sum / step_pairs, metrics, grad_norm, int(tokens)


@torch.no_grad()
def evaluate(run: _Run) -> dict[str, float]:
    """valid_loss, valid/rewards/*, valid/logps/* (pair means) and the exact `kl`, dropout off.
    Every rank evaluates all pairs (FSDP needs each in every forward; evaluation is small).

    kl = KL(π‖ρ) over the full vocabulary at every completion token, averaged over tokens.
    """
    run.model.eval()
    size = run.cfg.micro_batch_size()
    with_kl = run.train_ref is not None or run.cfg.lora
    loss_sum, sums, kl_sum, kl_tokens = 0.0, {}, 0.0, 0
    with _frozen_reference(run) if with_kl else contextlib.nullcontext():
        for start in range(0, len(run.valid_pairs), size):
            pairs = run.valid_pairs[start:start + size]
            ref = None if run.valid_ref is None else run.valid_ref[start:start + size]
            batch = _collate(run, pairs)
            with run.autocast or contextlib.nullcontext():
                losses, metrics, logits = _pair_losses(run, batch, ref, keep_logits=with_kl)
                if with_kl:
                    with reference_model(run) as reference:
                        ref_logits, _ = trained_logits(reference, *_inputs(run, batch))
                    kl_sum += _kl_sum(logits, ref_logits)
                    kl_tokens += logits.shape[0]
            loss_sum += losses.sum().item()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value * len(pairs)
    run.model.train()
    n = len(run.valid_pairs)
    values = {"valid_loss": loss_sum / n}
    values.update({f"valid/{k}": v / n for k, v in sums.items() if k != "kl/estimate"})
    if with_kl:
        values["kl"] = kl_sum / max(kl_tokens, 1)
    return values


def _pair_losses(run: _Run, batch: PairBatch, ref: torch.Tensor | None, keep_logits: bool = False):
    """Policy forward of a micro-batch → (per-pair losses, metrics, completion logits or None).

    Training takes the fused chunked head (no [N, V] logits); evaluation keeps the logits when it
    needs them for the exact KL."""
    cfg = run.cfg
    logits = None
    if keep_logits:
        logits, targets = run.policy(*_inputs(run, batch), logits=True)
        logps = segment_logps(logits, targets, batch.segment.to(logits.device), 2 * batch.num_pairs)
    else:
        logp, _, _ = run.policy(*_inputs(run, batch))
        logps = segment_sums(logp, batch.segment, 2 * batch.num_pairs)
    lengths = batch.chosen_lengths.to(logps.device), batch.rejected_lengths.to(logps.device)
    ref_c, ref_r = (None, None) if ref is None else ref.to(logps.device).unbind(-1)
    losses, metrics = preference_loss(
        logps[0::2], logps[1::2], ref_c, ref_r, *lengths, beta=cfg.dpo_beta,
        normalize_by_length=cfg.dpo_normalize_logratios_by_length,
        reference_free=cfg.dpo_reference_free, rpo_alpha=cfg.rpo_alpha,
        simpo_gamma=cfg.simpo_gamma)
    return losses, metrics, logits


def _kl_sum(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Σ over positions of the full-vocabulary KL, in chunks to bound memory."""
    total = 0.0
    for start in range(0, policy_logits.shape[0], KL_CHUNK):
        p, q = policy_logits[start:start + KL_CHUNK], reference_logits[start:start + KL_CHUNK]
        total += token_kl(p, q, torch.ones(p.shape[0], dtype=torch.bool)).item() * p.shape[0]
    return total


# -- the reference --------------------------------------------------------------------------------

@contextlib.contextmanager
def reference_model(run: _Run) -> Iterator[torch.nn.Module]:
    """The causal LM to run as the reference (the initial policy); every reference forward of
    the recipe goes through here. LoRA: the policy's own model with adapters disabled, or with
    the frozen "reference" adapter active; full weights: the frozen copy `_frozen_reference`
    loaded."""
    if not run.cfg.lora:
        if run.frozen is None:
            raise RuntimeError("the frozen reference copy is not loaded")
        yield run.frozen
    elif REFERENCE_ADAPTER in run.model.peft_config:
        run.model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)  # stays frozen
        try:
            yield run.causal_lm
        finally:
            run.model.set_adapter("default")  # also makes "default" trainable again
    else:
        with adapters_disabled(run.model):
            yield run.causal_lm


@contextlib.contextmanager
def _frozen_reference(run: _Run) -> Iterator[None]:
    """Full weights: load the initial weights, frozen, for the duration; free them after."""
    if run.cfg.lora or run.reference_path is None:
        yield
        return
    from transformers import AutoModelForCausalLM

    device = run.dist.device
    run.frozen = AutoModelForCausalLM.from_pretrained(run.reference_path, dtype=torch.float32)
    recipe.fused_kernels(run.frozen, device)  # the policy's kernels: π = ρ exactly at step 1
    run.frozen.to(device).eval().requires_grad_(False)
    if attention.enable(run.frozen) != (run.mask_dtype is None):  # same architecture as the policy
        raise RuntimeError("the frozen reference and the policy disagree on packed attention")
    try:
        yield
    finally:
        run.frozen = None
        gc.collect()


def reference_cache_key(reference_id: str, data_path: Path, max_seq_length: int,
                        bf16: bool) -> str:
    """sha256 over (reference_id, sha256 of the data file's bytes, max_seq_length, precision,
    REFERENCE_VERSION): what the cached reference log-probs depend on."""
    fields = [reference_id, sha256_file(data_path), max_seq_length, "bf16" if bf16 else "fp32",
              REFERENCE_VERSION]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def weights_stamp(model_dir: Path) -> str:
    """What identifies a model folder's weights for the cache: each weight file's name, size and
    modification time (hashing the bytes would read ~0.5 GB for SmolLM2 on every DPO job). A
    model name re-registered with other weights, or a folder rewritten in place, stamps anew."""
    files = sorted(p for p in Path(model_dir).glob("*") if p.suffix in (".safetensors", ".bin", ".gguf"))
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files) or str(model_dir)


def _cached_reference(run: _Run, cache_dir: Path | None, reference_id: str, bf16: bool):
    """A function (data path, its pairs) → [n, 2] reference sums: read from the cache file when
    present, else computed with `reference_logps` and written atomically."""

    def get(data_path: Path, pairs: list[Pair]) -> torch.Tensor:
        if cache_dir is None:
            return reference_logps(run, pairs)
        key = reference_cache_key(reference_id, data_path, run.cfg.max_seq_length, bf16)
        path = Path(cache_dir) / f"{key}.pt"
        cached = torch.load(path, weights_only=True)["logps"] if path.is_file() else None
        usable = cached is not None and cached.shape == (len(pairs), 2)
        if not distributed.any_across(not usable, run.dist):  # computing it takes every rank
            return cached
        logps = reference_logps(run, pairs)
        if not run.dist.is_main:
            return logps
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            torch.save({"logps": logps, "reference_id": reference_id}, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return logps

    return get


@torch.no_grad()
def reference_logps(run: _Run, pairs: list[Pair]) -> torch.Tensor:
    """Reference Σ log p of each pair's (chosen, rejected) completion → [n, 2] fp32 on CPU. On N
    processes each rank computes pairs r, r+N, … and all gather them: every rank gets all n."""
    out = [torch.zeros(0, 2)]
    mine = distributed.share(pairs, run.dist)
    run.model.eval()
    with _frozen_reference(run):
        for start in range(0, len(mine), run.cfg.micro_batch_size()):
            batch = _collate(run, mine[start:start + run.cfg.micro_batch_size()])
            with run.autocast or contextlib.nullcontext(), reference_model(run) as reference:
                logp, _, _ = target_logps(reference, *_inputs(run, batch))
            logps = segment_sums(logp, batch.segment, 2 * batch.num_pairs)
            out.append(logps.view(-1, 2).float().cpu())
    run.model.train()
    return distributed.gather_shares(torch.cat(out), len(pairs), run.dist)


# -- data and saving ------------------------------------------------------------------------------

def _pairs(path: Path, tokenizer, cfg: DPOConfig, reporter: Reporter, what: str) -> list[Pair]:
    pairs = [tokenize_pair(row, tokenizer, max_seq_length=cfg.max_seq_length)
             for row in read_rows(path)]
    truncated = sum(pair.truncated for pair in pairs)
    if truncated:
        reporter.event(ev.WARNING, f"{truncated} {what} pairs longer than max_seq_length "
                       f"{cfg.max_seq_length} were truncated (prompt from the left first, then "
                       "the completion from the right)", level="warning")
    if not pairs:
        raise ValueError(f"the {what} data has no preference pair")
    return pairs


def _collate(run: _Run, pairs: list[Pair]) -> PairBatch:
    """Packing with packed attention: the micro-batch in ONE row (attention runs per pair anyway,
    so a longer row costs nothing, and one row has no padding: 17% of the tokens of the bench's
    batches were padding in rows of ≤ max_seq_length); with a mask, rows of ≤ max_seq_length
    (the mask is T² per row)."""
    row_tokens = None
    if run.cfg.packing:
        row_tokens = run.cfg.max_seq_length if run.mask_dtype is not None else sum(p.run_tokens for p in pairs)
    return collate_pairs(pairs, run.pad_id, run.mask_dtype, row_tokens=row_tokens)


def _inputs(run: _Run, batch: PairBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(model inputs, targets [N], index [N]) of `batch` on the device."""
    device = run.dist.device
    return ({k: v.to(device) for k, v in batch.model_inputs().items()},
            batch.targets.to(device), batch.index.to(device))
