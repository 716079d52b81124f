"""What the SFT and DPO recipes do the same way: load the policy (+ LoRA), resume, set the
learning rate, take the optimizer step, and write checkpoints after a step.

`run` below is either recipe's `_Run`: both carry cfg, model, tokenizer, optimizer, reporter,
steps_per_epoch, total_steps, output_dir and dist (train/distributed.py: rank 0 alone writes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunehouse.train import checkpoint as ckpt
from tunehouse.train import distributed
from tunehouse.train import events as ev
from tunehouse.train.lora import add_lora, lean_forward, load_lora, merge, restore_base_weights
from tunehouse.train.precision import store_frozen_in
from tunehouse.train.schedule import lr_multiplier


def resolve_batch(cfg, model_path: Path, device: torch.device):
    """The config with batch_size "max" made a number for this device (the create path has usually
    done it already, for the API server's device)."""
    if cfg.batch_size != "max":
        return cfg
    from dataclasses import replace

    from tunehouse.models.registry import MAX_BATCH, MAX_BATCH_DPO
    from tunehouse.train.batch_size import resolve_max

    dpo = hasattr(cfg, "dpo_beta")
    return replace(cfg, batch_size=resolve_max(model_path, seq_len=cfg.max_seq_length, lora=cfg.lora,
                                               max_batch=MAX_BATCH_DPO if dpo else MAX_BATCH, device=device.type))


def load_policy(cfg, model_path: Path, resume_from: Path | None, init_adapter: Path | None,
                autocast=None):
    """(tokenizer, causal LM, model to train): the weights at model_path (a full-weights resume:
    the checkpoint's), with a new LoRA adapter, or the one being resumed or continued.

    LoRA under bf16 `autocast`: the frozen base weights are stored in bf16 (cast once here, not at
    every forward) and the LoRA layers take `lora.lean_forward`; the adapter stays fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    full_source = resume_from if (resume_from is not None and not cfg.lora) else model_path
    # LoRA under bf16: load the base in bf16 directly (its fp32 copy never exists: lower peak RSS)
    low = autocast.fast_dtype if (autocast is not None and cfg.lora) else torch.float32
    causal_lm = AutoModelForCausalLM.from_pretrained(full_source, dtype=low)
    causal_lm.config.use_cache = False
    if not cfg.lora:
        model = causal_lm
    elif resume_from is not None or init_adapter is not None:
        model = load_lora(causal_lm, resume_from or init_adapter, r=cfg.lora_r)
    else:
        model = add_lora(causal_lm, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         modules=cfg.lora_trainable_modules, base_name=cfg.model)
    if cfg.lora:
        lean_forward(model)
        store_frozen_in(model, low)  # (already so, unless a loader kept some weights in fp32)
        for p in model.parameters():  # the adapter's master weights stay fp32
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return tokenizer, causal_lm, model


CHECKPOINTING_ENV = "TUNEHOUSE_ACTIVATION_CHECKPOINTING"  # "1" always, "0" never, unset: by the limits


def activation_checkpointing(cfg, causal_lm) -> bool:
    """Turn on activation checkpointing (non-reentrant, per decoder layer) when a micro-batch has at
    least `registry.CHECKPOINT_FROM_TOKENS` tokens, or as $TUNEHOUSE_ACTIVATION_CHECKPOINTING says;
    whether it is on. Same losses and gradients, less peak memory, one more forward per step."""
    import os

    from tunehouse.models.registry import CHECKPOINT_FROM_TOKENS

    forced = os.environ.get(CHECKPOINTING_ENV)
    size = cfg.micro_batch_size() if cfg.batch_size != "max" else 1
    on = forced == "1" if forced in ("0", "1") else size * cfg.max_seq_length >= CHECKPOINT_FROM_TOKENS
    if on and getattr(causal_lm, "supports_gradient_checkpointing", False):
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True
    return False


def fused_kernels(causal_lm, device: torch.device) -> str | None:
    """On CUDA, Liger's Triton kernels for RMSNorm, RoPE and SwiGLU when `liger-kernel` is
    installed (never required); what was done, for an event, or None. The LM head stays
    train/head.py's (fused with the log-softmax at trained positions only), so Liger's own fused
    cross-entropy is left off. DPO's frozen reference copy gets the same kernels as the policy."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return None
    try:
        _apply_liger_kernel_to_instance(model=causal_lm, rope=True, swiglu=True, rms_norm=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as exc:  # an architecture Liger does not know: the plain modules run
        return f"Liger kernels not applied: {type(exc).__name__}: {exc}"
    return "Liger fused kernels in use (RMSNorm, RoPE, SwiGLU)"


def resume(resume_from: Path | None, optimizer: torch.optim.Optimizer, total_steps: int) -> tuple[int, list[dict]]:
    """(steps done, metrics so far): (0, []) for a fresh run; else the folder's, with the optimizer
    and RNG state restored (the weights came with `load_policy`)."""
    if resume_from is None:
        return 0, []
    state = ckpt.read_state(resume_from)
    if state["total_steps"] != total_steps:
        raise ValueError(f"{resume_from} was written for {state['total_steps']} steps, "
                         f"this data and config give {total_steps}")
    ckpt.restore_optimizer_and_rng(resume_from, optimizer)  # cut to this rank's shards under FSDP
    return state["step"], state["metrics"]


def learning_rate(cfg, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (1-based)."""
    return cfg.learning_rate * lr_multiplier(
        step - 1, total_steps, scheduler=cfg.lr_scheduler_type, warmup_ratio=cfg.warmup_ratio,
        min_lr_ratio=cfg.min_lr_ratio, num_cycles=cfg.scheduler_num_cycles)


def optimizer_step(optimizer: torch.optim.Optimizer, max_grad_norm: float, lr: float) -> float:
    """Clip the accumulated gradients (0 = no clipping), step at `lr`, clear them; the grad norm."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    # Under FSDP the gradients are shards: their norm is a DTensor, made whole (one all-reduce).
    grad_norm = distributed._full(torch.nn.utils.get_total_norm(grads))
    if max_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def save(run, step: int, history: list[dict], folder: Path, *, merged: bool) -> Path:
    """A checkpoint of `run` at `step` (+ the merged model for LoRA when `merged`), written by
    rank 0 alone. Under FSDP every rank first takes part in gathering the weights and optimizer
    moments, so the folder is the one a single process writes (and resumes on any count)."""
    sharded = run.dist.world > 1 and not run.cfg.lora
    weights = distributed.full_state_dict(run.model) if sharded else None
    optimizer_state = distributed.full_optimizer_state(run.optimizer) if sharded else None
    if not run.dist.is_main:
        return Path(folder)
    epoch, in_epoch = divmod(step, run.steps_per_epoch)
    state = {"step": step, "total_steps": run.total_steps, "epoch": step / run.steps_per_epoch,
             "data_epoch": epoch, "data_rows_done": in_epoch * run.cfg.batch_size,
             "seed": run.cfg.random_seed, "metrics": history}

    def write_merged(tmp: Path) -> None:
        restore_base_weights(run.model)  # fp32 base (trained in bf16): the merged model of an fp32 run
        plain = merge(run.model)
        plain.save_pretrained(tmp / ckpt.MERGED_DIR)
        run.tokenizer.save_pretrained(tmp / ckpt.MERGED_DIR)

    return ckpt.save_checkpoint(folder, model=run.model, tokenizer=run.tokenizer,
                                config=run.cfg.to_dict(), state=state, optimizer=run.optimizer,
                                extra=write_merged if merged else None, state_dict=weights,
                                optimizer_state=optimizer_state)


def after_step(run, step: int, in_epoch: int, history: list[dict], intermediate: set[int]) -> None:
    """The epoch event at an epoch's last step, and the intermediate checkpoint when it is due."""
    if in_epoch == run.steps_per_epoch - 1:
        run.reporter.event(ev.EPOCH_COMPLETE, f"Epoch completed, at step {step}", step=step)
    if step in intermediate:
        folder = run.output_dir / "checkpoints" / ckpt.checkpoint_name(step)
        save(run, step, history, folder, merged=False)
        run.reporter.checkpoint(step, folder, ev.INTERMEDIATE)
        run.reporter.event(ev.CHECKPOINT_SAVE, f"Checkpoint saved at step {step}", step=step,
                           checkpoint_path=str(folder))
