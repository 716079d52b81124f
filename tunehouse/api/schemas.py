"""Wire shapes (the Together fine-tuning API): response builders and request models."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field

from tunehouse.job_spec import JobSpec
from tunehouse.store.tables import File
from tunehouse.train.wire import to_wire


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
class PriceEstimate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    training_file: str | None = None
    validation_file: str | None = None
    model: str | None = None
    from_checkpoint: str | None = None
    n_epochs: int = Field(1, ge=1, le=2**31 - 1)
    n_evals: int = Field(0, ge=0, le=2**31 - 1)


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
            "checkpoint": "adapter" if JobSpec.of(job).lora else "model", "valid_loss": cp.valid_loss}


def job_object(job, events: list | None = None, queue_depth: int = 0) -> dict:
    """The job as both SDK lines accept it (api-reference §5.5): its hyperparameters as the create
    body carries them (generated from the config, secrets left out), ISO `Z` times, int batch size
    and price, UPPERCASE event types, `model_output_name` (the v3 CLI download needs it)."""
    spec, prog = JobSpec.of(job), job.progress or {}
    out = {
        **to_wire(spec.train, spec.method),
        "id": job.id, "object": "fine-tune", "status": job.status,
        "created_at": iso(job.created_at), "updated_at": iso(job.updated_at), "started_at": iso(job.started_at),
        "model": job.model, "model_output_name": job.model_output_name, "output_name": job.model_output_name,
        "adapter_output_name": job.model_output_name if spec.lora else None,
        "validation_file": job.validation_file or "",
        "train_on_inputs": getattr(spec.train, "train_on_inputs", None),
        "suffix": spec.suffix, "from_checkpoint": job.from_checkpoint, "from_hf_model": spec.from_hf_model,
        "hf_model_revision": spec.hf_model_revision, "hf_output_repo_name": spec.hf_output_repo_name,
        "hf_output_url": prog.get("hf_output_url"), "wandb_url": prog.get("wandb_url"),
        "user_id": job.owner, "owner_address": job.owner,
        "total_price": 0, "token_count": int(prog.get("token_count") or 0),
        "param_count": int(prog.get("param_count") or 0), "total_steps": int(prog.get("total_steps") or 0),
        "steps_completed": int(prog.get("steps_completed") or 0),
        "epochs_completed": int(prog.get("epochs_completed") or 0),
        "evals_completed": int(prog.get("evals_completed") or 0),
        "queue_depth": queue_depth, "eval_steps": int(prog.get("eval_steps") or 0),
        "TrainingFileNumLines": prog.get("train_lines"),
        "early_stopped": bool(prog.get("early_stopped")),
        "early_stopping_best_step": prog.get("early_stopping_best_step"),
        "early_stopping_best_metric": prog.get("early_stopping_best_metric"),
        "progress": {"estimate_available": prog.get("seconds_remaining") is not None,
                     "seconds_remaining": prog.get("seconds_remaining") or 0},
    }
    if events is not None:
        out["events"] = [event_object(e) for e in events]
    return out
