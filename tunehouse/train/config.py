"""Training configurations: one frozen dataclass per job kind, field names = the wire names.

The names are the flat argument names of the `together` SDK's `fine_tuning.create` (see
api-reference §5.2), so API field, CLI flag and config field are one name. `__post_init__`
collects every problem and raises a single `ValueError` naming each offending field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

_MODULE_LIST = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(,[A-Za-z_][A-Za-z0-9_.]*)*$")


class _ConfigMethods:
    """Methods both configs share (no fields: each config lists its own, in wire order)."""

    _KIND = ""

    def micro_batch_size(self) -> int:
        """Largest micro-batch: batch_size split into gradient_accumulation_steps parts."""
        return math.ceil(self.batch_size / self.gradient_accumulation_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"invalid {cls._KIND} config: unknown field(s) {', '.join(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class SFTConfig(_ConfigMethods):
    model: str
    """Base model name (a registry name, hub id or local folder). Required."""
    training_file: str
    """Training dataset file id (`file-…`). Required."""
    validation_file: str | None = None
    """Validation dataset file id; None (or "", as the SDKs send it) means no validation. Default None."""
    n_epochs: int = 1
    """Passes over the training data, ≥ 1. Default 1."""
    n_checkpoints: int = 1
    """Checkpoints saved over the run, the final one included (so n-1 intermediate), ≥ 1. Default 1."""
    n_evals: int = 0
    """Validation passes spread evenly over the run, ≥ 0; > 0 needs a validation_file. Default 0."""
    batch_size: int = 8
    """Sequences (packed rows when packing) per optimizer step, ≥ 1; "max" is resolved by the caller. Default 8."""
    gradient_accumulation_steps: int = 1
    """Micro-batches each optimizer step is split into, 1 ≤ value ≤ batch_size. Default 1."""
    learning_rate: float = 1e-5
    """Peak learning rate, 0 < value ≤ 1. Default 1e-5."""
    lr_scheduler_type: Literal["cosine", "linear"] = "cosine"
    """Decay after warmup: "cosine" or "linear". Default "cosine"."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak, in [0, 1]. Default 0.0."""
    scheduler_num_cycles: float = 0.5
    """Cosine cycles over the decay (0.5 = half a cosine, peak → min), > 0. Default 0.5."""
    warmup_ratio: float = 0.0
    """Fraction of total steps with linear warmup from 0, in [0, 1]. Default 0.0."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global L2 norm, ≥ 0; 0 disables clipping. Default 1.0."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, ≥ 0; never applied to biases and norm weights. Default 0.0."""
    lora: bool = True
    """Train a LoRA adapter (True) or all weights (False). Default True."""
    lora_r: int = 8
    """LoRA rank, ≥ 1. Default 8."""
    lora_alpha: float = 16
    """LoRA scaling numerator (scale = alpha / r), > 0. Default 16."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1). Default 0.0."""
    lora_trainable_modules: str = "all-linear"
    """"all-linear" (every nn.Linear but lm_head) or a comma list of module names, e.g. "q_proj,v_proj". Default "all-linear"."""
    train_on_inputs: bool | Literal["auto"] = "auto"
    """Train on prompt tokens too: True, False, or "auto" (False for chat/instruction data, True for text). Default "auto"."""
    max_seq_length: int = 2048
    """Longest training sequence in tokens (packed row length when packing), ≥ 8. Default 2048."""
    packing: bool = True
    """Pack several examples per row, isolated by a block-diagonal mask. Default True."""
    random_seed: int = 42
    """Seed for initialisation, data order and dropout, ≥ 0. Default 42."""
    wandb_api_key: str | None = None
    """Weights & Biases API key; metrics go to W&B only when set and wandb is installed. Default None."""
    wandb_base_url: str | None = None
    """W&B server URL for self-hosted W&B. Default None."""
    wandb_project_name: str | None = None
    """W&B project. Default None (W&B's default project)."""
    wandb_name: str | None = None
    """W&B run name. Default None (the job id)."""
    wandb_entity: str | None = None
    """W&B entity (user or team). Default None."""
    early_stopping_enabled: bool = False
    """Stop when the validation loss stops improving (needs a validation_file and n_evals ≥ warmup_evals + 1 + patience); the final model is then the best evaluation's weights. Default False."""
    early_stopping_patience: int = 2
    """Evaluations in a row without improvement that stop training, ≥ 1. Default 2."""
    early_stopping_min_delta: float = 0.0
    """Smallest drop of the validation loss that counts as an improvement, ≥ 0. Default 0.0."""
    early_stopping_warmup_evals: int = 1
    """First evaluations ignored by early stopping, ≥ 0. Default 1."""

    def __post_init__(self) -> None:
        if self.validation_file == "":
            object.__setattr__(self, "validation_file", None)
        problems = _problems(self)
        need = _Need(self, problems)
        if _is_int(self.n_evals) and self.n_evals > 0:
            need(self.validation_file is not None, "n_evals", "0 when there is no validation_file")
        need(self.train_on_inputs is True or self.train_on_inputs is False
             or self.train_on_inputs == "auto", "train_on_inputs", 'true, false or "auto"')
        if problems:
            raise ValueError("invalid SFT config: " + "; ".join(problems))

    _KIND = "SFT"


@dataclass(frozen=True)
class DPOConfig(_ConfigMethods):
    """Preference fine-tuning (DPO, length-normalised DPO, RPO, SimPO) on `input` /
    `preferred_output` / `non_preferred_output` pairs.

    The fields shared with SFTConfig carry the same names, defaults and validation (a test keeps
    the two lists aligned); `train_on_inputs` does not apply (only completions are scored), and
    batch_size, max_seq_length and packing count pairs and sides. `simpo_gamma > 0` selects SimPO,
    which has no reference model: it sets dpo_reference_free and
    dpo_normalize_logratios_by_length to True whatever was passed.
    """

    model: str
    """Base model name (a registry name, hub id or local folder). Required."""
    training_file: str
    """Training dataset file id (`file-…`). Required."""
    validation_file: str | None = None
    """Validation dataset file id; None (or "", as the SDKs send it) means no validation. Default None."""
    n_epochs: int = 1
    """Passes over the training data, ≥ 1. Default 1."""
    n_checkpoints: int = 1
    """Checkpoints saved over the run, the final one included (so n-1 intermediate), ≥ 1. Default 1."""
    n_evals: int = 0
    """Evaluations spread evenly over the run plus one before it, ≥ 0; on the validation pairs, else on ≤ 32 training pairs. Default 0."""
    batch_size: int = 8
    """Preference pairs per optimizer step, ≥ 1; "max" is resolved by the caller. Default 8."""
    gradient_accumulation_steps: int = 1
    """Micro-batches each optimizer step is split into, 1 ≤ value ≤ batch_size. Default 1."""
    learning_rate: float = 1e-5
    """Peak learning rate, 0 < value ≤ 1. Default 1e-5."""
    lr_scheduler_type: Literal["cosine", "linear"] = "cosine"
    """Decay after warmup: "cosine" or "linear". Default "cosine"."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak, in [0, 1]. Default 0.0."""
    scheduler_num_cycles: float = 0.5
    """Cosine cycles over the decay (0.5 = half a cosine, peak → min), > 0. Default 0.5."""
    warmup_ratio: float = 0.0
    """Fraction of total steps with linear warmup from 0, in [0, 1]. Default 0.0."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global L2 norm, ≥ 0; 0 disables clipping. Default 1.0."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, ≥ 0; never applied to biases and norm weights. Default 0.0."""
    lora: bool = True
    """Train a LoRA adapter (True) or all weights (False). Default True."""
    lora_r: int = 8
    """LoRA rank, ≥ 1. Default 8."""
    lora_alpha: float = 16
    """LoRA scaling numerator (scale = alpha / r), > 0. Default 16."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1). Default 0.0."""
    lora_trainable_modules: str = "all-linear"
    """"all-linear" (every nn.Linear but lm_head) or a comma list of module names, e.g. "q_proj,v_proj". Default "all-linear"."""
    max_seq_length: int = 2048
    """Longest side of a pair in tokens (prompt + one completion), ≥ 8; longer pairs are truncated. Default 2048."""
    packing: bool = True
    """Pack the sides of a micro-batch's pairs into rows of ≤ max_seq_length tokens (block-diagonal mask); False = one side per row. Default True."""
    random_seed: int = 42
    """Seed for initialisation, data order and dropout, ≥ 0. Default 42."""
    wandb_api_key: str | None = None
    """Weights & Biases API key; metrics go to W&B only when set and wandb is installed. Default None."""
    wandb_base_url: str | None = None
    """W&B server URL for self-hosted W&B. Default None."""
    wandb_project_name: str | None = None
    """W&B project. Default None (W&B's default project)."""
    wandb_name: str | None = None
    """W&B run name. Default None (the job id)."""
    wandb_entity: str | None = None
    """W&B entity (user or team). Default None."""
    early_stopping_enabled: bool = False
    """Stop when the validation loss stops improving (needs a validation_file and n_evals ≥ warmup_evals + 1 + patience); the final model is then the best evaluation's weights. Default False."""
    early_stopping_patience: int = 2
    """Evaluations in a row without improvement that stop training, ≥ 1. Default 2."""
    early_stopping_min_delta: float = 0.0
    """Smallest drop of the validation loss that counts as an improvement, ≥ 0. Default 0.0."""
    early_stopping_warmup_evals: int = 1
    """First evaluations ignored by early stopping, ≥ 0. Default 1."""
    dpo_beta: float = 0.1
    """β: scale of the log-ratio margin (higher keeps the policy nearer the reference), > 0. Default 0.1."""
    dpo_normalize_logratios_by_length: bool = False
    """Divide each side's log-ratio by its completion length in tokens. Default False."""
    dpo_reference_free: bool = False
    """Use no reference model (its log-probs taken as 0). Default False."""
    rpo_alpha: float = 0.0
    """RPO: weight of the preferred completion's mean per-token NLL added to the loss, ≥ 0. Default 0.0."""
    simpo_gamma: float = 0.0
    """SimPO target margin γ, ≥ 0; > 0 selects SimPO (reference-free, length-normalised). Default 0.0."""

    def __post_init__(self) -> None:
        if self.validation_file == "":
            object.__setattr__(self, "validation_file", None)
        problems = _problems(self)
        need = _Need(self, problems)
        need(_is_num(self.dpo_beta) and self.dpo_beta > 0, "dpo_beta", "> 0")
        for name in ("rpo_alpha", "simpo_gamma"):
            need(_is_num(getattr(self, name)) and getattr(self, name) >= 0, name, "≥ 0")
        for name in ("dpo_normalize_logratios_by_length", "dpo_reference_free"):
            need(isinstance(getattr(self, name), bool), name, "true or false")
        if problems:
            raise ValueError("invalid DPO config: " + "; ".join(problems))
        if self.simpo_gamma > 0:  # SimPO: no reference, average log-probs (Meng et al. 2024)
            object.__setattr__(self, "dpo_reference_free", True)
            object.__setattr__(self, "dpo_normalize_logratios_by_length", True)

    _KIND = "DPO"



def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


class _Need:
    """`need(ok, field, bound)` appends "field must be bound, got value" to `out` when not ok."""

    def __init__(self, config: Any, out: list[str]):
        self.config, self.out = config, out

    def __call__(self, ok: bool, field: str, bound: str) -> None:
        if not ok:
            self.out.append(f"{field} must be {bound}, got {getattr(self.config, field)!r}")


def _problems(c: SFTConfig | DPOConfig) -> list[str]:
    """Problems with the fields SFTConfig and DPOConfig share (each adds its own after)."""
    out: list[str] = []
    need = _Need(c, out)

    need(isinstance(c.model, str) and c.model != "", "model", "a non-empty string")
    need(isinstance(c.training_file, str) and c.training_file != "", "training_file",
         "a non-empty string")
    need(c.validation_file is None or isinstance(c.validation_file, str), "validation_file",
         "a string or None")
    for name, low in (("n_epochs", 1), ("n_checkpoints", 1), ("n_evals", 0), ("batch_size", 1),
                      ("gradient_accumulation_steps", 1), ("lora_r", 1), ("random_seed", 0),
                      ("max_seq_length", 8)):
        value = getattr(c, name)
        need(_is_int(value) and value >= low, name, f"an integer ≥ {low}")
    if _is_int(c.batch_size) and _is_int(c.gradient_accumulation_steps):
        need(c.gradient_accumulation_steps <= c.batch_size, "gradient_accumulation_steps",
             f"≤ batch_size ({c.batch_size})")
    need(_is_num(c.learning_rate) and 0 < c.learning_rate <= 1, "learning_rate", "in (0, 1]")
    need(c.lr_scheduler_type in ("cosine", "linear"), "lr_scheduler_type",
         'one of "cosine", "linear"')
    for name in ("min_lr_ratio", "warmup_ratio"):
        value = getattr(c, name)
        need(_is_num(value) and 0 <= value <= 1, name, "in [0, 1]")
    need(_is_num(c.scheduler_num_cycles) and c.scheduler_num_cycles > 0, "scheduler_num_cycles",
         "> 0")
    for name in ("max_grad_norm", "weight_decay"):
        value = getattr(c, name)
        need(_is_num(value) and value >= 0, name, "≥ 0")
    for name in ("lora", "packing"):
        need(isinstance(getattr(c, name), bool), name, "true or false")
    need(_is_num(c.lora_alpha) and c.lora_alpha > 0, "lora_alpha", "> 0")
    need(_is_num(c.lora_dropout) and 0 <= c.lora_dropout < 1, "lora_dropout", "in [0, 1)")
    modules = c.lora_trainable_modules
    need(isinstance(modules, str) and (modules == "all-linear" or bool(_MODULE_LIST.match(modules))),
         "lora_trainable_modules", '"all-linear" or a comma list of module names')
    for name in ("wandb_api_key", "wandb_base_url", "wandb_project_name", "wandb_name",
                 "wandb_entity"):
        value = getattr(c, name)
        need(value is None or isinstance(value, str), name, "a string or None")
    need(isinstance(c.early_stopping_enabled, bool), "early_stopping_enabled", "true or false")
    for name, low in (("early_stopping_patience", 1), ("early_stopping_warmup_evals", 0)):
        value = getattr(c, name)
        need(_is_int(value) and value >= low, name, f"an integer ≥ {low}")
    need(_is_num(c.early_stopping_min_delta) and c.early_stopping_min_delta >= 0, "early_stopping_min_delta", "≥ 0")
    if c.early_stopping_enabled is True and not out:
        need(c.validation_file is not None, "early_stopping_enabled", "false when there is no validation_file")
        least = c.early_stopping_warmup_evals + 1 + c.early_stopping_patience
        need(not _is_int(c.n_evals) or c.n_evals >= least, "n_evals",
             f"≥ early_stopping_warmup_evals + 1 + early_stopping_patience = {least} with early stopping")
    return out
