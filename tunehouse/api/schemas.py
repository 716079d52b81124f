"""Wire shapes (the Together fine-tuning API): response builders and request models."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field

from tunehouse.store.tables import File


def unix(dt: datetime) -> int:
    return int(_utc(dt).timestamp())


def iso(dt: datetime | None) -> str | None:
    """ISO-8601 UTC with fractional seconds and a `Z` (the v1 CLI parses exactly this)."""
    if dt is None:
        return None
    return _utc(dt).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc(dt: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


# The openai SDK's FileObject.status (deprecated there, still a required field of its model).
OPENAI_FILE_STATUS = {"COMPLETED": "processed", "FAILED": "error"}


def file_object(f: File) -> dict:
    """A file object both together SDK lines and the openai SDK accept (api-reference §4.3): note
    `FileType` in capitals and `created_at` as an int, which v3's preprocess validation requires;
    `status` is what openai's FileObject needs (uploaded → processed | error)."""
    return {
        "id": f.id,
        "object": "file",
        "created_at": unix(f.created_at),
        "filename": f.filename,
        "bytes": f.bytes,
        "purpose": f.purpose,
        "FileType": f.file_type,
        "Processed": f.processing_status in ("COMPLETED", "FAILED"),
        "LineCount": f.line_count or 0,
        "processing_status": f.processing_status,
        "status": OPENAI_FILE_STATUS.get(f.processing_status, "uploaded"),
        "status_details": (f.validation_report or {}).get("error"),
        "validation_report": f.validation_report,
    }


class MultipartInitiate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    file_name: str
    file_size: int = Field(gt=0)
    num_parts: int = Field(ge=1)
    purpose: str = "fine-tune"
    file_type: str | None = None
    checksum: str | None = None


class PartRef(BaseModel):
    part_number: int = Field(ge=1)
    etag: str


class MultipartComplete(BaseModel):
    upload_id: str
    file_id: str
    parts: list[PartRef]


class MultipartAbort(BaseModel):
    upload_id: str
    file_id: str


# -- fine-tuning -------------------------------------------------------------------------------
class LrSchedulerArgs(BaseModel):
    model_config = ConfigDict(extra="ignore")
    min_lr_ratio: float | None = None
    num_cycles: float | None = None


class LrScheduler(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lr_scheduler_type: str = "cosine"
    lr_scheduler_args: LrSchedulerArgs | None = None


class TrainingType(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_trainable_modules: str | None = None


class TrainingMethod(BaseModel):
    model_config = ConfigDict(extra="ignore")
    method: str = "sft"
    train_on_inputs: bool | str | None = None
    dpo_beta: float | None = None
    dpo_normalize_logratios_by_length: bool | None = None
    dpo_reference_free: bool | None = None
    rpo_alpha: float | None = None
    simpo_gamma: float | None = None


class FineTuneCreate(BaseModel):
    """`POST /v1/fine-tunes` (api-reference §5.2). Types only: the bounds live in the training
    config, which collects every problem at once."""

    model_config = ConfigDict(extra="ignore")
    training_file: str
    validation_file: str | None = None
    model: str | None = None
    from_checkpoint: str | None = None
    from_hf_model: str | None = None
    hf_model_revision: str | None = None
    hf_api_token: str | None = None
    hf_output_repo_name: str | None = None
    n_epochs: int = 1
    n_checkpoints: int = 1
    n_evals: int = 0
    batch_size: int | str = "max"
    learning_rate: float = 1e-5
    lr_scheduler: LrScheduler | None = None
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    suffix: str | None = None
    wandb_key: str | None = None
    wandb_api_key: str | None = None
    wandb_base_url: str | None = None
    wandb_project_name: str | None = None
    wandb_name: str | None = None
    wandb_entity: str | None = None
    training_type: TrainingType | None = None
    training_method: TrainingMethod | None = None
    train_on_inputs: bool | str | None = None  # deprecated top-level form; mapped onto training_method
    multimodal_params: dict | None = None
    packing: bool = True
    max_seq_length: int | None = None
    gradient_accumulation_steps: int = 1
    random_seed: int | None = None
    early_stopping_enabled: bool = False
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float | None = None
    early_stopping_warmup_evals: int | None = None


class PriceEstimate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    training_file: str | None = None
    validation_file: str | None = None
    model: str | None = None
    from_checkpoint: str | None = None
    n_epochs: int = 1
    n_evals: int = 0


def event_object(ev) -> dict:
    fields = ev.fields or {}
    return {"object": "fine-tune-event", "created_at": iso(ev.created_at), "level": ev.level,
            "message": ev.message, "type": ev.type, "param_count": fields.get("param_count"),
            "token_count": fields.get("token_count"), "total_steps": fields.get("total_steps"),
            "step": fields.get("step"), "checkpoint_path": fields.get("checkpoint_path"),
            "model_path": fields.get("model_path"), "wandb_url": fields.get("wandb_url"), "hash": fields.get("hash"),
            **{k: fields[k] for k in ("early_stopping_best_step", "early_stopping_best_metric_value") if k in fields}}


def checkpoint_object(job, cp) -> dict:
    return {"step": cp.step, "path": f"{job.id}:{cp.step}" if cp.checkpoint_type == "Intermediate" else job.id,
            "created_at": iso(cp.created_at), "checkpoint_type": cp.checkpoint_type,
            "checkpoint": "adapter" if job.config["train"]["lora"] else "model", "valid_loss": cp.valid_loss}


EARLY_STOPPING_FIELDS = {"early_stopping_enabled": False, "early_stopping_patience": 2,  # defaults for older jobs
                         "early_stopping_min_delta": 0.0, "early_stopping_warmup_evals": 1}
DPO_FIELDS = ("dpo_beta", "dpo_normalize_logratios_by_length", "dpo_reference_free", "rpo_alpha", "simpo_gamma")


def _training_method(method: str, cfg: dict) -> dict:
    if method == "dpo":
        return {"method": "dpo", **{k: cfg[k] for k in DPO_FIELDS}}
    return {"method": "sft", "train_on_inputs": cfg["train_on_inputs"]}


def job_object(job, events: list | None = None, queue_depth: int = 0) -> dict:
    """The job as both SDK lines accept it (api-reference §5.5): ISO `Z` times, int batch size
    and price, UPPERCASE event types, `model_output_name` (the v3 CLI download needs it)."""
    cfg, extra, prog = job.config["train"], job.config.get("extra", {}), job.progress or {}
    lora = cfg["lora"]
    training_type = ({"type": "Lora", "lora_r": cfg["lora_r"], "lora_alpha": cfg["lora_alpha"],
                      "lora_dropout": cfg["lora_dropout"], "lora_trainable_modules": cfg["lora_trainable_modules"]}
                     if lora else {"type": "Full"})
    out = {
        "id": job.id, "object": "fine-tune", "status": job.status,
        "created_at": iso(job.created_at), "updated_at": iso(job.updated_at), "started_at": iso(job.started_at),
        "model": job.model, "model_output_name": job.model_output_name, "output_name": job.model_output_name,
        "adapter_output_name": job.model_output_name if lora else None,
        "training_file": job.training_file, "validation_file": job.validation_file or "",
        "n_epochs": cfg["n_epochs"], "n_checkpoints": cfg["n_checkpoints"], "n_evals": cfg["n_evals"],
        "batch_size": cfg["batch_size"], "gradient_accumulation_steps": cfg["gradient_accumulation_steps"],
        "learning_rate": cfg["learning_rate"], "warmup_ratio": cfg["warmup_ratio"],
        "max_grad_norm": cfg["max_grad_norm"], "weight_decay": cfg["weight_decay"],
        "lr_scheduler": {"lr_scheduler_type": cfg["lr_scheduler_type"],
                         "lr_scheduler_args": {"min_lr_ratio": cfg["min_lr_ratio"],
                                               **({"num_cycles": cfg["scheduler_num_cycles"]}
                                                  if cfg["lr_scheduler_type"] == "cosine" else {})}},
        "training_type": training_type,
        "training_method": _training_method(job.method, cfg),
        "train_on_inputs": cfg.get("train_on_inputs"),
        "packing": cfg["packing"], "max_seq_length": cfg["max_seq_length"], "random_seed": cfg["random_seed"],
        "suffix": extra.get("suffix"), "from_checkpoint": job.from_checkpoint,
        "from_hf_model": extra.get("from_hf_model"), "hf_model_revision": extra.get("hf_model_revision"),
        "wandb_project_name": cfg.get("wandb_project_name"), "wandb_name": cfg.get("wandb_name"),
        "wandb_base_url": cfg.get("wandb_base_url"), "wandb_url": prog.get("wandb_url"),
        "user_id": job.owner, "owner_address": job.owner,
        "total_price": 0, "token_count": int(prog.get("token_count") or 0),
        "param_count": int(prog.get("param_count") or 0), "total_steps": int(prog.get("total_steps") or 0),
        "steps_completed": int(prog.get("steps_completed") or 0),
        "epochs_completed": int(prog.get("epochs_completed") or 0),
        "evals_completed": int(prog.get("evals_completed") or 0),
        "queue_depth": queue_depth, "eval_steps": int(prog.get("eval_steps") or 0),
        "TrainingFileNumLines": prog.get("train_lines"),
        **{k: cfg.get(k, default) for k, default in EARLY_STOPPING_FIELDS.items()},
        "early_stopped": bool(prog.get("early_stopped")),
        "early_stopping_best_step": prog.get("early_stopping_best_step"),
        "early_stopping_best_metric": prog.get("early_stopping_best_metric"),
        "progress": {"estimate_available": prog.get("seconds_remaining") is not None,
                     "seconds_remaining": prog.get("seconds_remaining") or 0},
    }
    if events is not None:
        out["events"] = [event_object(e) for e in events]
    return out
