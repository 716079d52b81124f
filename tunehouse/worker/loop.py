"""The worker: claims queued jobs, runs each in a training child process, heartbeats, forwards
cancel as SIGTERM, and records how the child ended.

A worker owns devices (`--gpus 0,1,2,3`, `--num-processes N`; default every visible GPU, one
process on a CPU): with N > 1 the child is torchrun starting N training processes (one per
GPU, NCCL; gloo on a CPU), all in the child's process group, so cancel reaches every rank.

Runs embedded in `tunehouse serve` (a thread) or alone as `tunehouse worker`. Training never runs
in this process: a crash cannot take the service down, and memory is returned when a job ends.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tunehouse import jobs
from tunehouse.parent_death import die_with_parent
from tunehouse.settings import Settings
from tunehouse.store.blobs import private_dirs
from tunehouse.store.db import is_transient
from tunehouse.store.home import Home
from tunehouse.store.tables import Job

log = logging.getLogger("tunehouse.worker")
CANCEL_GRACE_S = 30  # after SIGTERM, the child gets this long to stop before SIGKILL


class Worker:
    def __init__(self, home: Home, worker_id: str | None = None, *, poll_s: float = 1.0,
                 heartbeat_s: float = 2.0, stale_after_s: float | None = None):
        self.home = home
        self.gpus, self.num_processes = training_devices(home.settings)
        # Stable across restarts of this worker (recover_own), without the home's path in the database.
        home_tag = hashlib.sha256(str(home.settings.home.resolve()).encode()).hexdigest()[:12]
        self.worker_id = worker_id or f"{socket.gethostname()}:{home_tag}"
        self.poll_s, self.heartbeat_s = poll_s, heartbeat_s
        self.stale_after_s = stale_after_s if stale_after_s is not None else home.settings.heartbeat_timeout_s
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------
    def start_thread(self) -> threading.Thread:
        self.thread = threading.Thread(target=self.run_forever, name="tunehouse-worker", daemon=True)
        self.thread.start()
        return self.thread

    def stop(self, timeout: float = 60) -> None:
        """Stop after the running child (if any) has been told to stop and its job requeued."""
        self.stopping.set()
        self.wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def run_forever(self) -> None:
        """Never ends on an exception: a database error (locked, connection lost) or a bug in one
        round is logged, and the loop goes on after a pause that grows while errors repeat
        (0.5 s doubling to 30 s)."""
        recovered, pause = False, 0.5
        while not self.stopping.is_set():
            try:
                if not recovered:
                    with self.home.db.session() as s:
                        jobs.recover_own(s, self.worker_id)  # what this worker held when it last died
                    self.sweep_scratch()
                    recovered = True
                with self.home.db.session() as s:
                    jobs.recover_stale(s, self.stale_after_s)
                busy = self.run_once()
                pause = 0.5
            except Exception:
                log.exception("worker %s: round failed; retrying in %.1f s", self.worker_id, pause)
                self.stopping.wait(pause)
                pause = min(pause * 2, 30.0)
                continue
            if not busy:
                self.wake.wait(self.poll_s)
                self.wake.clear()

    def run_once(self) -> bool:
        """Claim one queued job and see it to the end; False when there was none."""
        with self.home.db.session() as s:
            job = jobs.claim_next(s, self.worker_id)
            if job is None:
                return False
            job_id, attempt = job.id, job.attempts
            jobs.add_event(s, job_id, "JOB_START", "Job started" if attempt == 1 else f"Job started (attempt {attempt})")
        self._run_child(job_id, attempt)
        return True

    def sweep_scratch(self) -> None:
        """Remove what killed tries left in this machine's scratch: the folders of jobs this
        worker does not run now (their checkpoints are in the store)."""
        folder = self.home.settings.work_path / "jobs"
        if not folder.is_dir():
            return
        with self.home.db.session() as s:
            for p in folder.iterdir():
                job = s.get(Job, p.name)
                if job is None or job.worker_id != self.worker_id or job.status not in jobs.ACTIVE:
                    shutil.rmtree(p, ignore_errors=True)

    # -- one job ----------------------------------------------------------------------------
    def _run_child(self, job_id: str, attempt: int) -> None:
        log_path = self.home.settings.run_path / "jobs" / job_id / f"attempt-{attempt}.log"
        private_dirs(log_path.parent)
        with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
            self.child = subprocess.Popen(self._command(job_id), env=self._child_env(),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_die_with_parent)
            try:
                rc = self._supervise(job_id, self.child)
            except BaseException:  # no child trains on unsupervised; its job is requeued once stale
                self.child.kill()
                self.child.wait()
                raise
            finally:
                self.child = None
                # a killed child cannot clean up: its scratch goes here (what counts is in the store)
                shutil.rmtree(self.home.settings.work_path / "jobs" / job_id, ignore_errors=True)
        self._record_exit(job_id, rc, log_path)

    def _supervise(self, job_id: str, child: subprocess.Popen) -> int:
        term_sent_at, beat_at, status = None, 0.0, "running"
        while (rc := child.poll()) is None:
            if time.monotonic() - beat_at >= self.heartbeat_s:
                beat_at = time.monotonic()
                try:
                    with self.home.db.session() as s:
                        status = jobs.heartbeat(s, job_id, self.worker_id)
                except Exception as exc:  # keep supervising; the next beat tries again
                    if not is_transient(exc):
                        raise
                    log.warning("worker %s: heartbeat of %s failed: %s", self.worker_id, job_id, exc)
            wants_stop = status in (None, "cancel_requested") or self.stopping.is_set()
            if wants_stop and term_sent_at is None:
                _signal_group(child, signal.SIGTERM)  # torchrun and every rank
                term_sent_at = time.monotonic()
            elif term_sent_at is not None and time.monotonic() - term_sent_at > CANCEL_GRACE_S:
                _signal_group(child, signal.SIGKILL)
            self.stopping.wait(0.2)  # wakes at once when the worker is asked to stop
        return rc

    def _record_exit(self, job_id: str, rc: int, log_path: Path) -> None:
        def write(s) -> bool:
            job = s.get(Job, job_id)
            if job is None:
                return False
            job.exit_code = rc
            if job.status in jobs.TERMINAL:
                return True
            if job.status == "cancel_requested":
                jobs.set_status(job, "cancelled")
                jobs.add_event(s, job_id, "JOB_STOPPED", "Job cancelled")
            elif self.stopping.is_set():
                job.attempts -= 1  # a clean shutdown is not a failed try
                jobs.requeue_or_fail(s, job, "the worker shut down")
            else:
                how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                # The log tail holds server paths and stack text: it goes to this process's log,
                # and the job's events (which the owner reads) carry only the log file's name.
                log.warning("job %s: the training process died (%s); %s ends: %s", job_id, how, log_path,
                            _tail(log_path))
                jobs.requeue_or_fail(s, job, f"the training process died ({how}; the worker's log "
                                             f"{log_path.name} has the details)")
            return True

        # retried: a lost write here would leave the job `running` until its heartbeat goes stale
        if not self.home.db.retrying(write, what=f"exit of {job_id}"):
            self.home.blobs.delete(f"jobs/{job_id}")  # deleted while running: drop what the child left

    def _command(self, job_id: str) -> list[str]:
        entry = ["-m", "tunehouse.train.run", job_id]
        if self.num_processes == 1:
            return [sys.executable, *entry]
        # --standalone: a rendezvous on a free local port per job; no restarts inside torchrun:
        # a failed rank fails the attempt and this worker requeues the job (resumed from its checkpoint)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={self.num_processes}", "--max-restarts=0", *entry]

    def _child_env(self) -> dict[str, str]:
        from tunehouse.train.distributed import TIMEOUT_ENV

        st: Settings = self.home.settings
        env = dict(os.environ, **settings_env(st), PYTHONUNBUFFERED="1")
        env[TIMEOUT_ENV] = str(st.dist_timeout_s)
        if st.secret:  # the child opens the job's sealed keys with it
            env["TUNEHOUSE_SECRET"] = st.secret.get_secret_value()
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpus))
        elif self.num_processes > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.num_processes))  # CPU: cores shared
        return env


def settings_env(st: Settings) -> dict[str, str]:
    """This worker's settings as the training child reads them (`TUNEHOUSE_*`): every field set
    on it (a CLI flag or a test's Settings reach the child too) but secrets, and where its
    database, blobs and blob cache are."""
    from pydantic import SecretStr

    env = {}
    for name in st.model_fields_set:
        value = getattr(st, name)
        if value is not None and not isinstance(value, SecretStr):  # secrets: only what the child needs, below
            env[f"TUNEHOUSE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(TUNEHOUSE_HOME=str(st.home), TUNEHOUSE_DATABASE_URL=st.db_url, TUNEHOUSE_BLOB_URL=st.blob_location,
               TUNEHOUSE_BLOB_CACHE_DIR=str(st.blob_cache_path))
    env.pop("TUNEHOUSE_BLOB_DIR", None)  # blob_url says it
    return env


def training_devices(settings: Settings) -> tuple[list[int] | None, int]:
    """(GPU indices the worker owns or None on a CPU, processes per job) from `gpus` and
    `num_processes`; more processes than GPUs is refused (one process per GPU)."""
    from tunehouse.serve.hardware import local_devices

    gpus = [int(g) for g in settings.gpus.split(",")] if settings.gpus else None
    if gpus is None and local_devices().count:
        gpus = list(range(local_devices().count))
    n = settings.num_processes or (len(gpus) if gpus else 1)
    if gpus is not None and n > len(gpus):
        raise ValueError(f"num_processes {n} is more than the {len(gpus)} GPUs this worker owns ({settings.gpus or 'all'}); "
                         "give it more GPUs or fewer processes")
    return (gpus[:n] if gpus is not None else None), n


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    """`sig` to the child's process group (it leads its own session): torchrun and all its ranks."""
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL if the worker dies, so no orphan trains on after a crash
    (the job is requeued and resumed by the next worker instead)."""
    die_with_parent(signal.SIGKILL)


def _tail(path: Path, n: int = 300) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-n:].replace("\n", " | ") or "(empty)"
