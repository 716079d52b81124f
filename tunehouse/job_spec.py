"""The typed record of what a job was asked to do, as it crosses from the API to the worker and
the training child: the resolved training config plus where its weights start from.

Stored in `Job.config` as `{"train": <config fields>, "extra": <the rest>}` (the layout older
homes already hold), and read back only through `JobSpec.of(job)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunehouse.train.config import CONFIGS, DPOConfig, SFTConfig


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

    def to_json(self) -> dict:
        extra = {k: v for k, v in asdict(self).items() if k not in ("method", "train", "parent")}
        extra["parent"] = asdict(self.parent) if self.parent else None
        return {"train": self.train.to_dict(), "extra": extra}

    @classmethod
    def of(cls, job) -> JobSpec:
        train, extra = dict(job.config["train"]), dict(job.config.get("extra") or {})
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
