"""Training configurations: one frozen dataclass per job kind, field names = the wire names.

Each hyperparameter is declared once, here: its name, type, default, bound (`check`), help (the
attribute docstring) and where it sits in the `POST /v1/fine-tunes` body (`wire`). The API's
request mapping and job echo (`train/wire.py`) and the CLI flags (`cli/fine_tuning.py`) are
generated from these declarations, so a new hyperparameter is one edit here plus its behaviour.

The fields SFT and DPO share live on `TrainConfig`; `SFTConfig` adds `train_on_inputs`,
`DPOConfig` the preference-loss fields. `__post_init__` collects every problem and raises one
`ConfigError` whose `.problems` lists (field, message) pairs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable, Literal

_MODULE_LIST = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(,[A-Za-z_][A-Za-z0-9_.]*)*$")


class ConfigError(ValueError):
    """Every problem of a config at once: `.problems` is a list of (field, message)."""

    def __init__(self, kind: str, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__(f"invalid {kind} config: " + "; ".join(m for _, m in problems))


# -- bounds: each returns what the value must be, or None when it is fine ---------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int, high: int | None = None) -> Callable[[Any], str | None]:
    bound = f"an integer ≥ {low}" if high is None else f"an integer in [{low}, {high}]"
    return lambda v: None if _is_int(v) and v >= low and (high is None or v <= high) else bound


def number(low: float, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[Any], str | None]:
    if high is None:
        bound = f"> {low:g}" if low_open else f"≥ {low:g}"
    else:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(v: Any) -> str | None:
        ok = _is_num(v) and (v > low if low_open else v >= low)
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        return None if ok else bound
    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def one_of(*values: Any) -> Callable[[Any], str | None]:
    bound = "one of " + ", ".join(f'"{v}"' if isinstance(v, str) else str(v).lower() for v in values)
    return lambda v: None if any(v is x if isinstance(x, bool) else v == x for x in values) else bound


def text(v: Any) -> str | None:
    return None if isinstance(v, str) and v != "" else "a non-empty string"


def optional_text(v: Any) -> str | None:
    return None if v is None or isinstance(v, str) else "a string or null"


def modules(v: Any) -> str | None:
    ok = isinstance(v, str) and (v == "all-linear" or bool(_MODULE_LIST.match(v)))
    return None if ok else '"all-linear" or a comma list of module names'


def batch(v: Any) -> str | None:
    return None if v == "max" or (_is_int(v) and v >= 1) else 'an integer ≥ 1 or "max"'


def lora_alpha(v: Any) -> str | None:
    return None if v is None or (_is_int(v) and v >= 1) else "an integer ≥ 1 (or null for 2 × lora_r)"


def hp(default: Any, check: Callable[[Any], str | None], *, wire: str | None = None,
       alias: str | None = None, secret: bool = False) -> Any:
    """Declare a hyperparameter. `wire` is its dotted path in the create body when it is not a
    top-level field of its own name; `alias` another accepted path; `secret` keeps it out of
    the job echo."""
    return field(default=default, metadata={"check": check, "wire": wire, "alias": alias, "secret": secret})


# -- the configs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """The fields every job kind has, in the order the together SDK lists them."""

    model: str = hp(dataclasses.MISSING, text)
    """Base model name (a registry name, hub id or local folder). Required."""
    training_file: str = hp(dataclasses.MISSING, text)
    """Training dataset file id (`file-…`). Required."""
    validation_file: str | None = hp(None, optional_text)
    """Validation dataset file id; null (or "", as the SDKs send it) means no validation. Default null."""
    n_epochs: int = hp(1, integer(1))
    """Passes over the training data, ≥ 1. Default 1."""
    n_checkpoints: int = hp(1, integer(1))
    """Checkpoints saved over the run, the final one included (so n-1 intermediate), ≥ 1. Default 1."""
    n_evals: int = hp(0, integer(0))
    """Validation passes spread evenly over the run, ≥ 0; > 0 needs a validation_file (DPO: else ≤ 32 training pairs). Default 0."""
    batch_size: int | Literal["max"] = hp("max", batch)
    """Examples (SFT: packed rows when packing; DPO: pairs) per optimizer step, ≥ 1, or "max": the largest that fits the device (8 on a CPU, where larger batches are no faster per token). Default "max"."""
    gradient_accumulation_steps: int = hp(1, integer(1))
    """Micro-batches each optimizer step is split into, 1 ≤ value ≤ batch_size. Default 1."""
    learning_rate: float = hp(1e-5, number(0, 1, low_open=True))
    """Peak learning rate, 0 < value ≤ 1. Default 1e-5."""
    lr_scheduler_type: Literal["cosine", "linear"] = hp("cosine", one_of("cosine", "linear"),
                                                         wire="lr_scheduler.lr_scheduler_type")
    """Decay after warmup: "cosine" or "linear". Default "cosine"."""
    min_lr_ratio: float = hp(0.0, number(0, 1), wire="lr_scheduler.lr_scheduler_args.min_lr_ratio")
    """Final learning rate as a fraction of the peak, in [0, 1]. Default 0.0."""
    scheduler_num_cycles: float = hp(0.5, number(0, low_open=True), wire="lr_scheduler.lr_scheduler_args.num_cycles")
    """Cosine cycles over the decay (0.5 = half a cosine, peak → min), > 0. Default 0.5."""
    warmup_ratio: float = hp(0.0, number(0, 1))
    """Fraction of total steps with linear warmup from 0, in [0, 1]. Default 0.0."""
    max_grad_norm: float = hp(1.0, number(0))
    """Gradient clipping by global L2 norm, ≥ 0; 0 disables clipping. Default 1.0."""
    weight_decay: float = hp(0.0, number(0))
    """AdamW decoupled weight decay, ≥ 0; never applied to biases and norm weights. Default 0.0."""
    lora: bool = hp(True, boolean, wire="training_type.type")
    """Train a LoRA adapter (true; on the wire training_type.type "Lora") or all weights (false; "Full"). Default true."""
    lora_r: int = hp(8, integer(1), wire="training_type.lora_r")
    """LoRA rank, ≥ 1. Default 8."""
    lora_alpha: int | None = hp(None, lora_alpha, wire="training_type.lora_alpha")
    """LoRA scaling numerator (scale = alpha / r), an integer ≥ 1; null means 2 × lora_r. Default null."""
    lora_dropout: float = hp(0.0, number(0, 1, high_open=True), wire="training_type.lora_dropout")
    """Dropout on the LoRA input, in [0, 1). Default 0.0."""
    lora_trainable_modules: str = hp("all-linear", modules, wire="training_type.lora_trainable_modules")
    """"all-linear" (every nn.Linear but lm_head) or a comma list of module names, e.g. "q_proj,v_proj". Default "all-linear"."""
    max_seq_length: int = hp(2048, integer(8))
    """Longest training sequence in tokens (SFT: packed row length; DPO: prompt + one completion), ≥ 8; at most the model's context, which is also the default when shorter than 2048. Default 2048."""
    packing: bool = hp(True, boolean)
    """Pack several examples (DPO: pair sides) per row of ≤ max_seq_length tokens, isolated by a block-diagonal mask. Default true."""
    random_seed: int = hp(42, integer(0, 2**63 - 1))
    """Seed for initialisation, data order and dropout, in [0, 2^63 - 1]. Default 42."""
    wandb_api_key: str | None = hp(None, optional_text, alias="wandb_key", secret=True)
    """Weights & Biases API key (the SDKs send it as wandb_key); metrics go to W&B only when set and wandb is installed. Default null."""
    wandb_base_url: str | None = hp(None, optional_text)
    """W&B server URL for self-hosted W&B. Default null."""
    wandb_project_name: str | None = hp(None, optional_text)
    """W&B project. Default null (W&B's default project)."""
    wandb_name: str | None = hp(None, optional_text)
    """W&B run name. Default null (the job id)."""
    wandb_entity: str | None = hp(None, optional_text)
    """W&B entity (user or team). Default null."""
    early_stopping_enabled: bool = hp(False, boolean)
    """Stop when the validation loss stops improving (needs a validation_file and n_evals ≥ warmup_evals + 1 + patience); the final model is then the best evaluation's weights. Default false."""
    early_stopping_patience: int = hp(2, integer(1))
    """Evaluations in a row without improvement that stop training, ≥ 1. Default 2."""
    early_stopping_min_delta: float = hp(0.0, number(0))
    """Smallest drop of the validation loss that counts as an improvement, ≥ 0. Default 0.0."""
    early_stopping_warmup_evals: int = hp(1, integer(0))
    """First evaluations ignored by early stopping, ≥ 0. Default 1."""

    _KIND = "training"

    def __post_init__(self) -> None:
        if self.validation_file == "":
            object.__setattr__(self, "validation_file", None)
        problems = self.problems()
        if problems:
            raise ConfigError(self._KIND, problems)
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", 2 * self.lora_r)

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every field out of bounds, then the rules across fields."""
        out = []
        for f in dataclasses.fields(self):
            bound = f.metadata["check"](getattr(self, f.name))
            if bound:
                out.append((f.name, f"{f.name} must be {bound}, got {getattr(self, f.name)!r}"))
        bad = {name for name, _ in out}

        def need(ok: bool, name: str, bound: str) -> None:
            if not ok and name not in bad:
                out.append((name, f"{name} must be {bound}, got {getattr(self, name)!r}"))

        if not bad & {"batch_size", "gradient_accumulation_steps"} and self.batch_size != "max":
            need(self.gradient_accumulation_steps <= self.batch_size, "gradient_accumulation_steps",
                 f"≤ batch_size ({self.batch_size})")
        if self._needs_validation_for_evals() and "n_evals" not in bad and self.n_evals > 0:
            need(self.validation_file is not None, "n_evals", "0 when there is no validation_file")
        if self.early_stopping_enabled is True and not out:
            need(self.validation_file is not None, "early_stopping_enabled",
                 "false when there is no validation_file")
            least = self.early_stopping_warmup_evals + 1 + self.early_stopping_patience
            need(self.n_evals >= least, "n_evals",
                 f"≥ early_stopping_warmup_evals + 1 + early_stopping_patience = {least} with early stopping")
        return out

    def _needs_validation_for_evals(self) -> bool:
        return True

    def micro_batch_size(self) -> int:
        """Largest micro-batch: batch_size split into gradient_accumulation_steps parts."""
        if self.batch_size == "max":
            raise ValueError('batch_size "max" must be resolved for the device first (train.batch.resolve_max)')
        return math.ceil(self.batch_size / self.gradient_accumulation_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(cls._KIND, [(n, f"unknown field {n}") for n in unknown])
        return cls(**values)


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on chat, instruction or plain-text rows."""

    train_on_inputs: bool | Literal["auto"] = hp("auto", one_of(True, False, "auto"),
                                                 wire="training_method.train_on_inputs", alias="train_on_inputs")
    """Train on prompt tokens too: true, false, or "auto" (false for chat/instruction data, true for text). Default "auto"."""

    _KIND = "SFT"


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """Preference fine-tuning (DPO, length-normalised DPO, RPO, SimPO) on `input` /
    `preferred_output` / `non_preferred_output` pairs. `simpo_gamma > 0` selects SimPO, which has
    no reference model: it sets dpo_reference_free and dpo_normalize_logratios_by_length."""

    dpo_beta: float = hp(0.1, number(0, low_open=True), wire="training_method.dpo_beta")
    """β: scale of the log-ratio margin (higher keeps the policy nearer the reference), > 0. Default 0.1."""
    dpo_normalize_logratios_by_length: bool = hp(False, boolean,
                                                 wire="training_method.dpo_normalize_logratios_by_length")
    """Divide each side's log-ratio by its completion length in tokens. Default false."""
    dpo_reference_free: bool = hp(False, boolean, wire="training_method.dpo_reference_free")
    """Use no reference model (its log-probs taken as 0). Default false."""
    rpo_alpha: float = hp(0.0, number(0), wire="training_method.rpo_alpha")
    """RPO: weight of the preferred completion's mean per-token NLL added to the loss, ≥ 0. Default 0.0."""
    simpo_gamma: float = hp(0.0, number(0), wire="training_method.simpo_gamma")
    """SimPO target margin γ, ≥ 0; > 0 selects SimPO (reference-free, length-normalised). Default 0.0."""

    _KIND = "DPO"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.simpo_gamma > 0:  # SimPO: no reference, average log-probs (Meng et al. 2024)
            object.__setattr__(self, "dpo_reference_free", True)
            object.__setattr__(self, "dpo_normalize_logratios_by_length", True)

    def _needs_validation_for_evals(self) -> bool:
        return False  # DPO evaluates on ≤ 32 training pairs when there is no validation file


CONFIGS: dict[str, type[TrainConfig]] = {"sft": SFTConfig, "dpo": DPOConfig}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (its one description), over the class and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        out |= {a.target.id: b.value.value for a, b in zip(body, body[1:])
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    return out
