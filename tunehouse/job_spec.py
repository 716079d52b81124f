"""The typed record of what a job was asked to do, as it crosses from the API to the worker and
the training child: the resolved training config plus where its weights start from.

Stored in `Job.config` as `{"train": <config fields>, "extra": <the rest>}` (the layout older
homes already hold), and read back only through `JobSpec.of(job)`.

Third-party secrets (`wandb_api_key`, `hf_api_token`) are stored sealed with the home's secret
(`tunehouse.sealing`), opened only by `JobSpec.of(job, secret)` in the training child (elsewhere
they read as None), and removed from the row once the job has ended.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from tunehouse import sealing
from tunehouse.train.config import CONFIGS, DPOConfig, SFTConfig

EXTRA_SECRETS = ("hf_api_token",)


def _train_secrets(config_type) -> list[str]:
    return [f.name for f in fields(config_type) if f.metadata.get("secret")]


def forget_secrets(config: dict) -> dict:
    """A stored spec without its secrets: for a job that will not run again."""
    train, extra = dict(config.get("train") or {}), dict(config.get("extra") or {})
    for name in {n for c in CONFIGS.values() for n in _train_secrets(c)}:
        if train.get(name) is not None:
            train[name] = None
    for name in EXTRA_SECRETS:
        if extra.get(name) is not None:
            extra[name] = None
    return {**config, "train": train, "extra": extra}


@dataclass(frozen=True)
class ParentRef:
    """The checkpoint a `from_checkpoint` job continues, and the shape of its adapter."""

    job_id: str
    step: int
    blob_key: str
    lora: bool
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_trainable_modules: str | None = None

    @classmethod
    def of(cls, job_id: str, checkpoint, cfg: SFTConfig | DPOConfig) -> ParentRef:
        return cls(job_id, checkpoint.step, checkpoint.blob_key, cfg.lora, cfg.lora_r, cfg.lora_alpha,
                   cfg.lora_trainable_modules)

    def same_adapter_shape(self, cfg: SFTConfig | DPOConfig) -> bool:
        return self.lora and cfg.lora and (self.lora_r, self.lora_alpha, self.lora_trainable_modules) == (
            cfg.lora_r, cfg.lora_alpha, cfg.lora_trainable_modules)


@dataclass(frozen=True)
class JobSpec:
    method: str  # "sft" or "dpo"
    train: SFTConfig | DPOConfig
    suffix: str | None = None
    from_checkpoint: str | None = None
    parent: ParentRef | None = None
    from_hf_model: str | None = None
    """As asked: a registry name, a folder on the server, or a hub repo id."""
    hf_model_revision: str | None = None
    weights: str | None = None
    """Where the starting weights are read when not the registry's `model`: a folder, or a hub
    repo id the worker fetches (at `hf_model_revision`, with `hf_api_token`)."""
    hf_api_token: str | None = None
    hf_output_repo_name: str | None = None

    @property
    def lora(self) -> bool:
        return self.train.lora

    def to_json(self, secret: bytes) -> dict:
        """The stored form, its secrets sealed with the home's `secret`."""
        extra = {k: v for k, v in asdict(self).items() if k not in ("method", "train", "parent")}
        extra["parent"] = asdict(self.parent) if self.parent else None
        train = self.train.to_dict()
        for values, names in ((train, _train_secrets(type(self.train))), (extra, EXTRA_SECRETS)):
            for name in names:
                if values.get(name) is not None:
                    values[name] = sealing.seal(secret, values[name])
        return {"train": train, "extra": extra}

    @classmethod
    def of(cls, job, secret: bytes | None = None) -> JobSpec:
        """The job's spec; its secrets opened with the home's `secret`, or None without it."""
        train, extra = dict(job.config["train"]), dict(job.config.get("extra") or {})
        for values, names in ((train, _train_secrets(CONFIGS[job.method])), (extra, EXTRA_SECRETS)):
            for name in names:
                if values.get(name) is not None:
                    values[name] = sealing.unseal(secret, values[name]) if secret is not None else None
        if isinstance(train.get("lora_alpha"), float):  # homes from before lora_alpha was an integer
            train["lora_alpha"] = round(train["lora_alpha"])
        parent = extra.pop("parent", None)
        if parent and "lora_shape" in parent:  # the older nested layout
            parent = {**{k: v for k, v in parent.items() if k != "lora_shape"}, **parent["lora_shape"]}
        if parent and isinstance(parent.get("lora_alpha"), float):
            parent["lora_alpha"] = round(parent["lora_alpha"])
        known = {"suffix", "from_checkpoint", "from_hf_model", "hf_model_revision", "weights", "hf_api_token",
                 "hf_output_repo_name"}
        return cls(method=job.method, train=CONFIGS[job.method].from_dict(train),
                   parent=ParentRef(**parent) if parent else None,
                   **{k: v for k, v in extra.items() if k in known})
