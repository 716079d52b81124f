"""The training child process: `python -m tunehouse.train.run JOB_ID`.

The worker starts it with its settings in the environment (TUNEHOUSE_HOME, TUNEHOUSE_DATABASE_URL,
TUNEHOUSE_BLOB_URL, …). It resolves the job's inputs (base weights, parent checkpoint, data files,
its own last checkpoint when resuming) as local copies of blobs, runs the recipe with a reporter
that writes events, metrics and checkpoints through the store, and finishes the job. SIGTERM
means cancel: the recipe stops before its next step and writes nothing half-done.

Nothing is shared between machines but the database and the blob store. The recipe writes into
this machine's scratch (`work_path/jobs/<id>/out/…`); each checkpoint is put into the store
(`jobs/<id>/out/checkpoints/step-…`, `jobs/<id>/out/final`) before the database records it, so a
recorded checkpoint is always complete in the store, and a job that another worker started
resumes from there on any machine. The scratch folder goes when the attempt ends.

Under torchrun (N processes, train/distributed.py) rank 0 does all of the above and the other
ranks train the plan it broadcasts, with a reporter that writes nothing. A collective that fails
because a rank died or hung ends every rank with EXIT_PEER_LOST and nothing recorded: the worker
requeues the job, which resumes from its last checkpoint.

Exit codes: 0 the job reached a final state (completed, user_error, error); 3 cancelled;
anything else (or a signal) means the process died and the worker requeues the job.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import traceback
import uuid
from pathlib import Path

from tunehouse import jobs
from tunehouse.atomic import sweep_temp_dirs
from tunehouse.downloads import build_archive
from tunehouse.errors import redact_paths
from tunehouse.files import blob_key
from tunehouse.job_spec import JobSpec
from tunehouse.models.registry import Registry
from tunehouse.settings import Settings
from tunehouse.store.blobs import private_dirs
from tunehouse.store.home import Home, open_home
from tunehouse.store.db import is_transient
from tunehouse.store.tables import File, Job
from tunehouse.train import distributed
from tunehouse.train import events as ev
from tunehouse.train.early_stopping import BEST_WEIGHTS

EXIT_CANCELLED = 3
EXIT_PEER_LOST = 4  # another training process died or stopped answering


class StoreReporter:
    """The recipe's Reporter, writing to the database; `should_stop` turns true on SIGTERM, on a
    cancel request, or when the job row was deleted."""

    def __init__(self, home: Home, job_id: str):
        self.home, self.job_id = home, job_id
        self.out_dir = scratch_dir(home, job_id) / "out"  # what the recipe writes…
        self.out_key = f"jobs/{job_id}/out"  # …and where the store keeps it
        self.stop_signal = False
        self._checked_at = 0.0
        self._stop = False
        self._t0 = time.monotonic()
        self._first_step: int | None = None

    def key_of(self, path: Path) -> str | None:
        """The store key of a file or folder the recipe wrote (`jobs/ft-…/out/final`); None
        for a path outside the job's output."""
        try:
            rel = Path(path).resolve().relative_to(self.out_dir.resolve()).as_posix()
        except ValueError:
            return None
        return self.out_key if rel == "." else f"{self.out_key}/{rel}"

    @staticmethod
    def _public(value: str) -> str:
        """Events are the owner's to read: what is left of an absolute path once this machine's
        folders became blob keys (`server_paths_out`) is named by its last component."""
        return redact_paths(value) if value.startswith("/") else value

    def event(self, type: str, message: str, level: str = "info", **fields) -> None:
        message = server_paths_out(self.home, message, self.job_id)
        fields = {k: self._public(server_paths_out(self.home, v, self.job_id)) if isinstance(v, str) else v
                  for k, v in fields.items()}
        if type == ev.TRAINING_START:
            self._t0, self._first_step = time.monotonic(), None  # the ETA clock starts with training
        self.home.db.retrying(lambda s: self._write_event(s, type, message, level, fields), what=f"event {type}")

    def _write_event(self, s, type: str, message: str, level: str, fields: dict) -> None:
        jobs.add_event(s, self.job_id, type, message, level, **fields)
        job = s.get(Job, self.job_id)
        if job is None:
            return
        if fields.get("wandb_url"):  # the job shows the run's address too
            job.progress = {**(job.progress or {}), "wandb_url": fields["wandb_url"]}
        if fields.get("total_steps"):
            job.progress = {**(job.progress or {}), "total_steps": fields["total_steps"],
                            "param_count": fields.get("param_count"), "token_count": fields.get("token_count")}
        if type == ev.EPOCH_COMPLETE:
            job.progress = {**(job.progress or {}),
                            "epochs_completed": (job.progress or {}).get("epochs_completed", 0) + 1}
        if fields.get("early_stopping_best_step") is not None:
            job.progress = {**(job.progress or {}), "early_stopped": True,
                            "early_stopping_best_step": fields["early_stopping_best_step"],
                            "early_stopping_best_metric": fields.get("early_stopping_best_metric_value")}
        if type == ev.EVAL_COMPLETE:
            job.progress = {**(job.progress or {}),
                            "evals_completed": (job.progress or {}).get("evals_completed", 0) + 1}

    def metrics(self, step: int, values: dict[str, float]) -> None:
        first = self._first_step is None
        if first:
            self._first_step = step - 1  # a resumed run starts past 0
        rate = (time.monotonic() - self._t0) / max(step - self._first_step, 1)

        def write(s) -> None:
            # the first step this process reports also drops the rows a dead try wrote after it
            jobs.record_metric(s, self.job_id, step, values, drop_later=first)
            job = s.get(Job, self.job_id)
            if job is not None:
                prog = dict(job.progress or {})
                total = prog.get("total_steps") or step
                prog.update(steps_completed=step, seconds_remaining=round(rate * (total - step), 1))
                job.progress = prog

        self.home.db.retrying(write, what=f"metrics of step {step}")

    def checkpoint(self, step: int, path: Path, checkpoint_type: str) -> None:
        """Put the checkpoint folder into the store, then record it: a recorded checkpoint is
        complete in the store. Early stopping's best weights so far go with each intermediate
        one, so a run resumed elsewhere still has them."""
        key = self.key_of(path)
        if key is None:
            raise ValueError(f"checkpoint {path} is outside the job's output folder {self.out_dir}")
        best = self.out_dir / BEST_WEIGHTS
        if checkpoint_type == ev.INTERMEDIATE and best.is_file():
            self.home.blobs.put_file(f"{self.out_key}/{BEST_WEIGHTS}", best)
        self.home.blobs.put_dir(key, Path(path))
        self.home.db.retrying(lambda s: jobs.record_checkpoint(s, self.job_id, step, checkpoint_type, key),
                              what=f"checkpoint of step {step}")

    def should_stop(self) -> bool:
        if self.stop_signal or self._stop:
            return True
        if time.monotonic() - self._checked_at > 1.0:  # one small query a second at most
            self._checked_at = time.monotonic()
            try:
                with self.home.db.session() as s:
                    job = s.get(Job, self.job_id)
                    # cancelled, deleted, or requeued to another worker: stop before the next step
                    self._stop = job is None or job.status not in jobs.ACTIVE
            except Exception as exc:  # a transient read error: ask again at the next step
                if not is_transient(exc):
                    raise
        return self._stop


def resolve_inputs(home: Home, job: Job, spec: JobSpec, registry: Registry, reporter: StoreReporter) -> dict:
    """Paths for the recipe: base weights (or a parent's merged weights), init adapter, data, resume."""
    reporter.event("MODEL_DOWNLOADING", f"Preparing model data for {spec.from_hf_model or job.model}")
    model_path, init_adapter, parent = _starting_weights(home, spec, registry), None, spec.parent
    if parent:
        folder = home.blobs.local_dir(parent.blob_key)
        if parent.same_adapter_shape(spec.train):
            init_adapter = folder  # keep training the parent's adapter
            reporter.event(ev.WARNING, f"Continuing the LoRA adapter of {parent.job_id} (step {parent.step})",
                           level="info")
        elif parent.lora:
            model_path = _merged(home, job, folder, model_path)  # fold the parent in, then a new adapter/full
            reporter.event(ev.WARNING, f"Merged the adapter of {parent.job_id} (step {parent.step}) into "
                                       "the base weights: this job's training type or LoRA shape differs",
                           level="info")
        else:
            model_path = folder  # a full-weights parent is a model folder already
    reporter.event("MODEL_DOWNLOAD_COMPLETE", "Model data downloaded")
    with home.db.session() as s:
        train = s.get(File, job.training_file)
        val = s.get(File, job.validation_file) if job.validation_file else None
        if train is None or (job.validation_file and val is None):
            raise ValueError("a data file of this job was deleted before it ran; upload it again and create a new job")
        training_path = home.blobs.local_file(blob_key(train))
        validation_path = home.blobs.local_file(blob_key(val)) if val else None
        done = [c for c in jobs.checkpoints(s, job.id) if c.checkpoint_type == "Intermediate"]
    reporter.event("TRAINING_DATA_DOWNLOAD_COMPLETE", "Training data downloaded")
    resume_from = home.blobs.local_dir(done[-1].blob_key) if done else None  # from any machine's try
    if resume_from is not None:
        best = f"{reporter.out_key}/{BEST_WEIGHTS}"
        if home.blobs.exists(best):  # early stopping's best weights so far, where the recipe keeps them
            private_dirs(reporter.out_dir)
            shutil.copyfile(home.blobs.local_file(best), reporter.out_dir / BEST_WEIGHTS)
        reporter.event(ev.WARNING, f"Resuming from the checkpoint at step {done[-1].step}", level="info",
                       step=done[-1].step)
    return dict(model_path=model_path, init_adapter=init_adapter, training_path=training_path,
                validation_path=validation_path, resume_from=resume_from)


def _starting_weights(home: Home, spec: JobSpec, registry: Registry) -> Path:
    """The registry's base, or from_hf_model's weights: another registry model, a server folder,
    or a hub repo fetched into the model cache. Registry models are this machine's copies."""
    if spec.weights is None:
        return Path(registry.path(spec.train.model))
    if spec.weights in {m.name for m in registry.list()}:
        return Path(registry.path(spec.weights))
    if Path(spec.weights).is_dir():
        return Path(spec.weights)
    from tunehouse.hub import fetch_weights

    return fetch_weights(spec.weights, spec.hf_model_revision, spec.hf_api_token, registry.cache)


def _merged(home: Home, job: Job, adapter_folder: Path, base_path: Path) -> Path:
    """The parent's weights with its adapter folded in: the final checkpoint already carries
    them; an intermediate one is merged here, once."""
    if (adapter_folder / "merged").is_dir():
        return adapter_folder / "merged"
    dest = scratch_dir(home, job.id) / "parent-merged"
    if not (dest / "config.json").exists():
        from tunehouse.train.lora import merge_adapter_folder

        merge_adapter_folder(base_path, adapter_folder, dest)
    return dest


def main(job_id: str) -> int:
    os.umask(0o077)  # checkpoints, weights and caches it writes are the server user's alone
    d = distributed.setup()  # under torchrun: join the other ranks before anything else
    if d.world > 1:
        from tunehouse.worker.loop import _die_with_parent

        _die_with_parent()  # a rank never outlives torchrun, its parent
    if not d.is_main:
        return _follow(d)
    settings = Settings()
    home = open_home(settings)
    try:
        return _main(home, job_id, d)
    finally:  # checkpoints and outputs are in the store: the attempt's scratch goes
        shutil.rmtree(scratch_dir(home, job_id), ignore_errors=True)


def scratch_dir(home: Home, job_id: str) -> Path:
    """This machine's folder for one job's attempt: what the recipe writes before it is stored,
    the parent's merged weights."""
    return home.settings.work_path / "jobs" / job_id


def _main(home: Home, job_id: str, d: distributed.Dist) -> int:
    registry = Registry(home)
    reporter = StoreReporter(home, job_id)
    signal.signal(signal.SIGTERM, lambda *_: setattr(reporter, "stop_signal", True))
    with home.db.session() as s:
        job = s.get(Job, job_id)
    from tunehouse.train.sft import Cancelled

    plan = None
    try:
        try:
            if job is None:
                return EXIT_CANCELLED
            spec = JobSpec.of(job, home.secret)  # the one place the job's secrets are opened
            plan = _plan(home, job, spec, resolve_inputs(home, job, spec, registry, reporter))
        finally:  # the other ranks train this plan; None (rank 0 stopped here) ends them
            distributed.broadcast(_without_secrets(plan), d)
        _train(plan, reporter)
    except Cancelled:
        return EXIT_CANCELLED
    except Exception as exc:
        if d.world > 1 and (distributed.peer_lost(exc) or reporter.stop_signal):
            traceback.print_exc()  # another rank died or hung: no verdict on the job, the worker requeues it
            return EXIT_PEER_LOST
        return _failed(home, job_id, exc)
    return _publish(home, job_id, spec)


def _plan(home: Home, job: Job, spec: JobSpec, inputs: dict) -> dict:
    """What every rank trains: the recipe, its config and inputs, where it writes."""
    plan = dict(method=spec.method, cfg=spec.train, inputs=inputs, output_dir=scratch_dir(home, job.id) / "out")
    for parent in (plan["output_dir"], plan["output_dir"] / "checkpoints"):
        sweep_temp_dirs(parent)  # what a killed try on this machine left half-written
    if spec.method == "dpo":
        from tunehouse.train.dpo import weights_stamp

        # The reference is the starting policy: the base model, other weights, or the parent checkpoint.
        plan["reference_id"] = (f"{job.model}|{spec.weights or ''}@{spec.hf_model_revision or ''}|"
                                f"{spec.parent.blob_key if spec.parent else ''}|lora={spec.lora}|"
                                f"{weights_stamp(inputs['model_path'])}")
        plan["reference_cache_dir"] = home.settings.blob_cache_path / "reference-logps"
    return plan


def _without_secrets(plan: dict | None) -> dict | None:
    """The plan for ranks 1…N-1: they report nothing, so they get no W&B key."""
    if plan is None or not getattr(plan["cfg"], "wandb_api_key", None):
        return plan
    from dataclasses import replace

    return {**plan, "cfg": replace(plan["cfg"], wandb_api_key=None)}


def _train(plan: dict, reporter) -> None:
    from tunehouse.train.sft import run_sft

    common = dict(output_dir=plan["output_dir"], reporter=reporter, **plan["inputs"])
    if plan["method"] == "dpo":
        from tunehouse.train.dpo import run_dpo

        run_dpo(plan["cfg"], reference_cache_dir=plan["reference_cache_dir"], reference_id=plan["reference_id"],
                **common)
    else:
        run_sft(plan["cfg"], **common)


def _follow(d: distributed.Dist) -> int:
    """Ranks 1…N-1: train rank 0's plan, writing nothing (not even opening the home). Rank 0
    records every verdict on the job; a problem of the job's own (bad data) is seen by rank 0
    too, anything else fails the attempt."""
    from tunehouse.train.sft import Cancelled

    reporter = distributed.NullReporter()
    signal.signal(signal.SIGTERM, lambda *_: setattr(reporter, "stop_signal", True))
    plan = distributed.broadcast(None, d)
    if plan is None:
        return 0
    try:
        _train(plan, reporter)
    except Cancelled:
        return EXIT_CANCELLED
    except (ValueError, FileNotFoundError):
        return 0
    except Exception as exc:
        traceback.print_exc()
        return EXIT_PEER_LOST if distributed.peer_lost(exc) else 1
    return 0


def _failed(home: Home, job_id: str, exc: Exception) -> int:
    """Record the job's failure: user_error when the data or request cannot be trained on, else
    an internal error whose trace goes to the log (this process's stderr) under an id."""
    if isinstance(exc, (ValueError, FileNotFoundError)):
        _finish(home, job_id, "user_error", "JOB_USER_ERROR", f"Job failed: {redact_paths(str(exc))}")
        return 0
    # a bug or resource problem: the owner gets an id, the log the trace
    eid = uuid.uuid4().hex[:12]
    print(f"JOB_ERROR id {eid}:", file=sys.stderr)
    traceback.print_exception(exc)
    _finish(home, job_id, "error", "JOB_ERROR", f"Job failed: internal error (id {eid}); the worker's log "
                                                "has the details.")
    return 0


def _publish(home: Home, job_id: str, spec: JobSpec) -> int:
    """After the final save (and LoRA merge): the documented tail of the event log,

        TRAINING_COMPLETE → COMPRESSING_MODEL → MODEL_COMPRESSION_COMPLETE
                          → MODEL_UPLOADING → MODEL_UPLOAD_COMPLETE → JOB_COMPLETE

    Compressing is real work: the default download (merged weights for LoRA, the model for full
    training) is packed into a zstd tar, so the first download is instant. Uploading records the
    archive's SHA-256 and path on the event: the blob store is the archive's home already."""
    if not _advance(home, job_id, ("compressing", "COMPRESSING_MODEL", "Compressing output model")):
        return EXIT_CANCELLED
    with home.db.session() as s:
        archive, digest = build_archive(s, home, s.get(Job, job_id), None, None)
    size = f"{archive.rsplit('/', 1)[-1]}, {home.blobs.size(archive) / 2**20:.1f} MiB"
    if not _advance(home, job_id, (None, "MODEL_COMPRESSION_COMPLETE", f"Model compression complete: {size}"),
                    ("uploading", "MODEL_UPLOADING", "Uploading output model")):
        return EXIT_CANCELLED
    # The writer hashed the archive as it went in; one built before (a download asked for it
    # while this job compressed, or an earlier try of this job) is read back once to hash it.
    digest = digest or _sha256_blob(home, archive)
    if spec.hf_output_repo_name:
        _push(home, job_id, spec)
    if not _advance(home, job_id, (None, "MODEL_UPLOAD_COMPLETE", "Model upload complete"), digest=digest):
        return EXIT_CANCELLED
    _finish(home, job_id, "completed", "JOB_COMPLETE", "Job finished")
    return 0


def _sha256_blob(home: Home, key: str) -> str:
    """Streamed from the store: no local copy of an archive this machine will never serve."""
    import hashlib

    h = hashlib.sha256()
    with home.blobs.open(key) as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _advance(home: Home, job_id: str, *steps: tuple[str | None, str, str], digest: str | None = None) -> bool:
    """Each (new status or None, event type, message) in one transaction, retried on a transient
    error; False when the job was deleted or a cancel was requested meanwhile."""
    def write(s) -> bool:
        job = s.get(Job, job_id)
        if job is None or job.status == "cancel_requested":
            return False
        for status, type_, message in steps:
            if status:
                jobs.set_status(job, status)
            fields = {"model_path": job.model_output_name, "hash": digest} if digest else {}
            jobs.add_event(s, job_id, type_, message, **fields)
        return True

    return home.db.retrying(write, what=steps[-1][1])


def _push(home: Home, job_id: str, spec: JobSpec) -> None:
    """hf_output_repo_name: the default output (merged weights, or the full model) to the hub.
    A failed push is a warning: the model is complete and downloadable here."""
    from tunehouse.downloads import pick_folder
    from tunehouse.hub import push_folder

    with home.db.session() as s:
        folder, _ = pick_folder(s, home, s.get(Job, job_id), None, None)
    try:
        url = push_folder(folder, spec.hf_output_repo_name, spec.hf_api_token, f"tunehouse job {job_id}")
    except Exception as exc:  # the hub, the network or the token: say which, keep the job
        with home.db.session() as s:
            jobs.add_event(s, job_id, ev.WARNING, f"Could not push the output to {spec.hf_output_repo_name}: "
                           f"{type(exc).__name__}: {redact_paths(str(exc))}", level="warning")
        return
    with home.db.session() as s:
        job = s.get(Job, job_id)
        job.progress = {**(job.progress or {}), "hf_output_url": url}
        jobs.add_event(s, job_id, ev.WARNING, f"Pushed the output to {url}", level="info")


def _finish(home: Home, job_id: str, status: str, type_: str, message: str) -> None:
    def write(s) -> None:
        job = s.get(Job, job_id)
        if job is None:
            return
        jobs.set_status(job, status)
        jobs.add_event(s, job_id, type_, server_paths_out(home, message, job_id),
                       "info" if status == "completed" else "error")

    home.db.retrying(write, what=type_)


def server_paths_out(home: Home, text: str, job_id: str | None = None) -> str:
    """`text` with this machine's folders taken out: a path the job wrote reads as its blob key
    (`jobs/ft-…/out/final`), one in a local blob store or the scratch folder as its key too.
    Events are shown to API callers, who have no business knowing where a server or worker keeps
    its home."""
    roots: list[tuple[Path, str]] = []
    if job_id:
        roots.append((scratch_dir(home, job_id), f"jobs/{job_id}"))
    local_store = getattr(home.blobs, "root", None)  # the local backend's folder
    roots += [(home.settings.work_path, ""), *([(local_store, "")] if local_store else []),
              (home.settings.home, "")]
    for root, key in roots:
        for form in sorted({str(root), str(Path(root).resolve())}, key=len, reverse=True):
            text = text.replace(form + "/", key + "/" if key else "").replace(form, key or ".")
    return text


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
