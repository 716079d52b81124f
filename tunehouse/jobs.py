"""The job lifecycle, in one place for the API and the worker.

    pending → queued → running → compressing → uploading → completed
         ╲        ╲        ╲──→ error | user_error      (reason in an event)
          ╲────────╲────────╲─→ cancel_requested → cancelled

A running job whose worker or training child died goes back to `queued` (JOB_RESTARTED) and
resumes from its last checkpoint, up to MAX_ATTEMPTS tries; then it is failed with an event.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import delete as sql_delete
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tunehouse.errors import Conflict, NotFound
from tunehouse.job_spec import forget_secrets
from tunehouse.store.tables import Checkpoint, Event, Job, Metric, utcnow

TERMINAL = frozenset({"completed", "cancelled", "error", "user_error"})
ACTIVE = frozenset({"running", "compressing", "uploading"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"queued", "cancel_requested", "cancelled", "error", "user_error"}),
    "queued": frozenset({"running", "cancel_requested", "cancelled", "error", "user_error"}),
    "running": frozenset({"compressing", "uploading", "queued", "cancel_requested", "error", "user_error",
                          "completed"}),
    "compressing": frozenset({"uploading", "queued", "cancel_requested", "error"}),
    "uploading": frozenset({"completed", "queued", "cancel_requested", "error"}),
    "cancel_requested": frozenset({"cancelled", "error", "completed"}),
    "completed": frozenset(), "cancelled": frozenset(), "error": frozenset(), "user_error": frozenset(),
}
MAX_ATTEMPTS = 3


def set_status(job: Job, new: str) -> None:
    if new not in TRANSITIONS[job.status]:
        raise Conflict(f"Job {job.id} cannot go from {job.status} to {new}.", param="status")
    job.status = new
    job.updated_at = utcnow()
    if new in TERMINAL:  # it never runs again: its third-party keys need not be kept, even sealed
        job.config = forget_secrets(job.config)


def add_event(s: Session, job_id: str, type_: str, message: str, level: str = "info", **fields) -> Event:
    ev = Event(job_id=job_id, type=type_, level=level, message=message, fields=fields or None)
    s.add(ev)
    s.flush()
    return ev


def get_owned(s: Session, owner: str, job_id: str) -> Job:
    job = s.get(Job, job_id)
    if job is None or job.owner != owner:
        raise NotFound(f"No fine-tuning job with id {job_id!r}.", param="id", code="job_not_found")
    return job


def list_owned(s: Session, owner: str) -> list[Job]:
    return list(s.scalars(select(Job).where(Job.owner == owner).order_by(Job.created_at)))


def events(s: Session, job_id: str) -> list[Event]:
    return list(s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


def checkpoints(s: Session, job_id: str) -> list[Checkpoint]:
    return list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def metrics(s: Session, job_id: str, step_from: int | None = None, step_to: int | None = None,
            logged_from: datetime | None = None, logged_to: datetime | None = None) -> list:
    """A job's metric rows (`.step`, `.values`) in step order, within the inclusive step and
    logging-time bounds given (a naive time is taken as UTC, as every time here is). Two columns,
    not ORM objects: a 10,000-step job's curves load in half the time."""
    q = select(Metric.step, Metric.values).where(Metric.job_id == job_id)
    if step_from is not None:
        q = q.where(Metric.step >= step_from)
    if step_to is not None:
        q = q.where(Metric.step <= step_to)
    if logged_from is not None:
        q = q.where(Metric.created_at >= _as_utc(logged_from))
    if logged_to is not None:
        q = q.where(Metric.created_at <= _as_utc(logged_to))
    return list(s.execute(q.order_by(Metric.step, Metric.id)))


def record_metric(s: Session, job_id: str, step: int, values: dict, *, drop_later: bool = False) -> None:
    """Write a step's metrics, replacing what an earlier try wrote for it (a resumed job redoes
    the steps after its last checkpoint). `drop_later` also drops the steps after it: the first
    step a training process reports, so a resumed run leaves no row of the dead one behind.
    Delete-then-insert in one transaction: portable, and safe to run again after a failed commit."""
    stale = Metric.step >= step if drop_later else Metric.step == step
    s.execute(sql_delete(Metric).where(Metric.job_id == job_id, stale))
    s.add(Metric(job_id=job_id, step=step, values=values))
    s.flush()


def record_checkpoint(s: Session, job_id: str, step: int, checkpoint_type: str, blob_key: str) -> None:
    """Record a checkpoint folder once, however often the write is retried or the step redone."""
    same = select(Checkpoint.id).where(Checkpoint.job_id == job_id, Checkpoint.step == step,
                                       Checkpoint.checkpoint_type == checkpoint_type)
    if s.scalar(same.limit(1)) is None:
        s.add(Checkpoint(job_id=job_id, step=step, checkpoint_type=checkpoint_type, blob_key=blob_key))
        s.flush()


def _as_utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def thin(rows: list, resolution: int | None) -> list:
    """At most `resolution` rows, uniformly spaced: every k-th row, and always the last."""
    if not resolution or len(rows) <= resolution:
        return rows
    k = -(-len(rows) // resolution)
    picked = rows[::k]
    return picked[:resolution - 1] + [rows[-1]] if picked[-1] is not rows[-1] else picked


def queue_position(s: Session, job: Job) -> int:
    if job.status not in ("pending", "queued"):
        return 0
    q = select(func.count()).select_from(Job).where(Job.status == "queued", Job.created_at < job.created_at)
    return int(s.scalar(q) or 0)


def request_cancel(s: Session, job: Job) -> Job:
    if job.status in TERMINAL or job.status == "cancel_requested":
        raise Conflict(f"Job {job.id} is already {job.status}; there is nothing to cancel.", param="id")
    if job.status in ("pending", "queued"):
        set_status(job, "cancelled")  # nothing is running: cancel at once
        add_event(s, job.id, "JOB_STOPPED", "Job cancelled before it started")
    else:
        set_status(job, "cancel_requested")
        add_event(s, job.id, "CANCEL_REQUESTED", "Cancel requested")
    return job


def delete_job(s: Session, job: Job) -> None:
    """Delete the job and its records; a live training child notices the row is gone and stops."""
    for table in (Event, Metric, Checkpoint):
        s.execute(sql_delete(table).where(table.job_id == job.id))
    s.delete(job)
    s.flush()


# -- worker side --------------------------------------------------------------------------------
# Heartbeats and the staleness check read the database's clock, never the worker's: workers on
# several machines compare times one of them wrote with times another reads, and a worker whose
# clock is 10 minutes off would otherwise requeue live jobs (or have its own requeued).
def db_now(s: Session) -> datetime:
    """The database's time: PostgreSQL's `now()` (the transaction's start); SQLite is a file on
    this machine, so this machine's clock is the database's."""
    if s.get_bind().dialect.name == "postgresql":
        return s.scalar(select(func.now()))
    return utcnow()


def claim_next(s: Session, worker_id: str) -> Job | None:
    """Atomically take the oldest queued job. PostgreSQL: `SELECT … FOR UPDATE SKIP LOCKED`, so
    workers claiming at once each lock a different row and none waits; SQLite (one writer at a
    time): a conditional UPDATE, so two workers never both win."""
    if s.get_bind().dialect.name == "postgresql":
        job = s.scalar(select(Job).where(Job.status == "queued").order_by(Job.created_at).limit(1)
                       .with_for_update(skip_locked=True).execution_options(populate_existing=True))
        if job is None:
            return None
        now = db_now(s)
        job.status, job.worker_id, job.heartbeat_at, job.updated_at = "running", worker_id, now, now
        job.attempts += 1
        job.started_at = job.started_at or now
        s.flush()
        return job
    candidates = s.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.created_at).limit(5))
    for job_id in list(candidates):
        now = db_now(s)
        res = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
            status="running", worker_id=worker_id, heartbeat_at=now, updated_at=now,
            attempts=Job.attempts + 1))
        if res.rowcount == 1:
            job = s.get(Job, job_id)
            s.refresh(job)
            if job.started_at is None:
                job.started_at = now
            return job
    return None


def heartbeat(s: Session, job_id: str, worker_id: str) -> str | None:
    """Record that the worker is alive; returns the job's status (None if it was deleted)."""
    job = s.get(Job, job_id)
    if job is None:
        return None
    if job.worker_id == worker_id:
        job.heartbeat_at = db_now(s)
    return job.status


def requeue_or_fail(s: Session, job: Job, reason: str) -> None:
    """A job whose training process or worker died: resume it, or fail it after MAX_ATTEMPTS."""
    if job.status == "cancel_requested":
        set_status(job, "cancelled")
        add_event(s, job.id, "JOB_STOPPED", f"Job cancelled ({reason})")
    elif job.attempts >= MAX_ATTEMPTS:
        set_status(job, "error")
        add_event(s, job.id, "JOB_ERROR", f"Job failed after {job.attempts} attempts: {reason}", level="error")
    else:
        set_status(job, "queued")
        job.worker_id = None
        add_event(s, job.id, "JOB_RESTARTED",
                  f"Job restarted ({reason}); it resumes from its last checkpoint", level="warning")


def recover_stale(s: Session, timeout_s: float) -> list[str]:
    """Requeue (or fail) active jobs whose heartbeat is older than `timeout_s` by the database's clock."""
    cutoff = db_now(s) - timedelta(seconds=timeout_s)
    stale = s.scalars(select(Job).where(Job.status.in_(ACTIVE | {"cancel_requested"}), Job.heartbeat_at < cutoff))
    out = []
    for job in list(stale):
        requeue_or_fail(s, job, "its worker stopped sending heartbeats")
        out.append(job.id)
    return out


def recover_own(s: Session, worker_id: str) -> list[str]:
    """On worker start: jobs this worker held when it died are requeued at once."""
    held = s.scalars(select(Job).where(Job.worker_id == worker_id,
                                       Job.status.in_(ACTIVE | {"cancel_requested"})))
    out = []
    for job in list(held):
        requeue_or_fail(s, job, "its worker restarted")
        out.append(job.id)
    return out


def unfinished_job_using(s: Session, file_id: str) -> Job | None:
    """The oldest job not yet ended that trains or validates on `file_id`."""
    q = select(Job).where((Job.training_file == file_id) | (Job.validation_file == file_id),
                          Job.status.not_in(TERMINAL)).order_by(Job.created_at)
    return s.scalar(q.limit(1))
