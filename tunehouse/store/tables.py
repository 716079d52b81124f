"""SQLAlchemy 2 tables: API keys, files, and (for the training jobs) jobs, events, metrics,
checkpoints. Times are stored as UTC datetimes."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings; the key itself is never stored
    owner: Mapped[str] = mapped_column(String(128), index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class File(Base):
    """An uploaded dataset. `state` is internal: `uploading` rows are never listed, so an
    interrupted or rejected upload leaves nothing visible."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    file_type: Mapped[str] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    checksum: Mapped[str | None] = mapped_column(String(64), index=True)  # sha256 hex
    state: Mapped[str] = mapped_column(String(16), default="uploading")  # uploading | stored
    upload_nonce: Mapped[str | None] = mapped_column(String(64))  # single-use token; cleared once used
    multipart: Mapped[dict | None] = mapped_column(JSON)  # {"upload_id", "num_parts"}; ETags are the parts' MD5s
    processing_status: Mapped[str] = mapped_column(String(16), default="PENDING")
    validation_report: Mapped[dict | None] = mapped_column(JSON)
    line_count: Mapped[int | None] = mapped_column(Integer)
    num_samples: Mapped[int | None] = mapped_column(Integer)
    dataset_format: Mapped[str | None] = mapped_column(String(32))
    token_counts: Mapped[dict | None] = mapped_column(JSON)  # {model name: tokens in one pass}
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    method: Mapped[str] = mapped_column(String(16), default="sft")
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    from_checkpoint: Mapped[str | None] = mapped_column(String(512))  # `ID:STEP` or a parent's output name
    config: Mapped[dict] = mapped_column(JSON)  # the resolved training config, wire names
    model_output_name: Mapped[str | None] = mapped_column(String(512), unique=True)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    progress: Mapped[dict | None] = mapped_column(JSON)  # step counters, token counts, ETA
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(48))  # UPPERCASE protocol value, e.g. JOB_START
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    fields: Mapped[dict | None] = mapped_column(JSON)  # step, checkpoint_path, ...
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Metric(Base):
    """One row per (job, step): a resumed job rewrites the steps it redoes (`jobs.record_metric`)."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ux_metrics_job_step", "job_id", "step", unique=True),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer, index=True)
    values: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    checkpoint_type: Mapped[str] = mapped_column(String(32))  # Intermediate | Final
    blob_key: Mapped[str] = mapped_column(String(512))
    valid_loss: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelRow(Base):
    """A base model added with `tunehouse models add` (built-ins are not stored)."""

    __tablename__ = "models"
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    source: Mapped[str] = mapped_column(String(1024))  # local folder or hub id
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Endpoint(Base):
    """A dedicated endpoint: one model kept loaded (merged weights) in its own process."""

    __tablename__ = "endpoints"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)  # what chat requests pass as `model`
    display_name: Mapped[str | None] = mapped_column(String(256))
    model: Mapped[str] = mapped_column(String(512))
    hardware: Mapped[str] = mapped_column(String(128))
    min_replicas: Mapped[int] = mapped_column(Integer, default=1)
    max_replicas: Mapped[int] = mapped_column(Integer, default=1)
    inactive_timeout: Mapped[int | None] = mapped_column(Integer)  # minutes; 0/None = never
    state: Mapped[str] = mapped_column(String(16), default="PENDING")
    desired: Mapped[str] = mapped_column(String(16), default="STARTED")  # STARTED | STOPPED
    port: Mapped[int | None] = mapped_column(Integer)
    pid: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Evaluation(Base):
    """A `tunehouse eval` result posted to the server: the per-model summary rows, kept per owner."""

    __tablename__ = "evaluations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    file: Mapped[str] = mapped_column(String(512))  # the held-out file's name, as the client gave it
    max_tokens: Mapped[int] = mapped_column(Integer)
    models: Mapped[list] = mapped_column(JSON)  # [{label, model, exact_match, f1, valid_loss, perplexity, n_turns, seconds}]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
