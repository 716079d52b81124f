"""Database faults and crashes during training, on a live server with its embedded worker, the
tiny model and a real SQLite file: the worker loop and the training child survive a transient
database error, and a killed child or a crash inside a checkpoint save leaves metrics exactly one
row per step, no half-written folder, and a job that completes."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.exc import OperationalError
from together import Together

from jobs_support import wait_for, write_chat
from tunehouse import jobs
from tunehouse.store.db import Database
from tunehouse.train.checkpoint import STATE_FILE, list_files

TINY = "tunehouse/tiny-llama"
FAULTS = Path(__file__).resolve().parent / "faults"  # sitecustomize.py: faults inside the training child


def sdk(live) -> Together:
    return Together(base_url=live.url, api_key=live.key, max_retries=0)


def _job(c, tmp_path, rows: int = 40, **kw):
    f = c.files.upload(write_chat(tmp_path / "train.jsonl", rows))
    return c.fine_tuning.create(training_file=f.id, model=TINY, lora=True, n_epochs=2, n_checkpoints=4,
                                batch_size=1, packing=False, learning_rate=1e-3, **kw)


def _steps(live, job_id: str) -> list[int]:
    r = httpx.get(f"{live.url}/v1/fine-tunes/{job_id}/metrics", headers={"Authorization": f"Bearer {live.key}"})
    assert r.status_code == 200, r.text
    return [m["train/global_step"] for m in r.json()["metrics"]]


def _event_types(c, job_id: str) -> list[str]:
    return [e.type for e in c.fine_tuning.list_events(job_id).data]


def _locked() -> OperationalError:
    return OperationalError("UPDATE jobs", {}, sqlite3.OperationalError("database is locked"))


def _inject_child_faults(monkeypatch, spec: str) -> None:
    monkeypatch.setenv("TUNEHOUSE_TEST_FAULTS", spec)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])))


def test_existing_home_gets_unique_metrics(tmp_path):
    """A database made before metrics were unique (and before migrations), holding the rows a
    resume duplicated: opening it keeps the last row of each step, adds the unique index, and
    brings the schema to the newest revision."""
    from sqlalchemy import create_engine

    from tunehouse.store.tables import Base

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    with engine.begin() as con:
        con.exec_driver_sql("DROP INDEX ux_metrics_job_step")
        con.exec_driver_sql("INSERT INTO jobs (id, owner, status, method, model, training_file, config, attempts, "
                            "created_at, updated_at) VALUES ('ft-a', 'alice', 'completed', 'sft', 'm', 'file-x', "
                            "'{}', 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
        con.exec_driver_sql("""INSERT INTO metrics (job_id, step, "values", created_at) VALUES
            ('ft-a', 1, '{"v": 1}', '2026-01-01'), ('ft-a', 2, '{"v": 2}', '2026-01-01'),
            ('ft-a', 3, '{"v": 3}', '2026-01-01'), ('ft-a', 2, '{"v": 20}', '2026-01-01'),
            ('ft-a', 3, '{"v": 30}', '2026-01-01'), ('ft-a', 4, '{"v": 40}', '2026-01-01')""")
    engine.dispose()
    db = Database(f"sqlite:///{path}")
    db.create()
    db.create()  # idempotent
    with db.session() as s:
        assert [(m.step, m.values["v"]) for m in jobs.metrics(s, "ft-a")] == [(1, 1), (2, 20), (3, 30), (4, 40)]
    with pytest.raises(Exception, match="UNIQUE"), db.session() as s:
        s.execute(jobs.Metric.__table__.insert().values(job_id="ft-a", step=1, values={}))
    with db.session() as s:  # a resumed run reporting step 2 drops what the dead one wrote from there
        jobs.record_metric(s, "ft-a", 2, {"v": 200}, drop_later=True)
        jobs.record_metric(s, "ft-a", 2, {"v": 201})  # a retried write replaces, never duplicates
    with db.session() as s:
        assert [(m.step, m.values["v"]) for m in jobs.metrics(s, "ft-a")] == [(1, 1), (2, 201)]


def test_retrying_runs_again_after_transient_errors_only(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create()
    calls = []

    def flaky(s):
        calls.append(1)
        if len(calls) < 3:
            raise _locked()
        return "done"

    assert db.retrying(flaky) == "done" and len(calls) == 3
    with pytest.raises(ValueError):
        db.retrying(lambda s: (calls.append(1), int("x")))
    assert len(calls) == 4, "a bug is not retried"


def test_worker_loop_survives_database_errors(live_worker, tmp_path, monkeypatch):
    """A claim and a heartbeat that fail once with `database is locked`: the worker thread used to
    die on either, leaving the job queued (or running with no progress) until a restart."""
    failures = {"claim_next": 1, "heartbeat": 1}

    def flaky(name):
        real = getattr(jobs, name)

        def call(*args, **kwargs):
            if failures[name]:
                failures[name] -= 1
                raise _locked()
            return real(*args, **kwargs)
        return call

    for name in failures:
        monkeypatch.setattr(jobs, name, flaky(name))
    c = sdk(live_worker)
    job = _job(c, tmp_path, rows=8)
    done = wait_for(c, job.id, timeout=90)
    assert done.status == "completed", _event_types(c, job.id)
    assert failures == {"claim_next": 0, "heartbeat": 0}, "both faults fired"
    assert live_worker.app.state.worker.thread.is_alive()
    assert "JOB_RESTARTED" not in _event_types(c, job.id)


def test_training_child_survives_metric_write_errors(live_worker, tmp_path, monkeypatch):
    """The child's first 3 metric writes fail with `database is locked`: it retries and goes on;
    the job completes in one attempt with every step recorded once."""
    marker = tmp_path / "fired"
    _inject_child_faults(monkeypatch, f"metric_db_error:3:{marker}")
    c = sdk(live_worker)
    job = _job(c, tmp_path, rows=8)
    done = wait_for(c, job.id, timeout=90)
    assert marker.read_text().count("metric_db_error") == 3, "the fault fired in the child"
    assert done.status == "completed", _event_types(c, job.id)
    assert "JOB_RESTARTED" not in _event_types(c, job.id), "the child survived the errors"
    assert _steps(live_worker, job.id) == list(range(1, done.total_steps + 1))


def test_killed_child_leaves_one_metric_row_per_step(live_worker, tmp_path):
    """SIGKILL a few steps after a checkpoint: the job is restarted (the event names the signal),
    the resumed run redoes the steps after that checkpoint, and the metrics still list 1…total once
    each (the report: 208 rows for 198 steps)."""
    c = sdk(live_worker)
    job = _job(c, tmp_path)
    home = live_worker.app.state.home
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # wait for steps recorded past the first checkpoint
        with home.db.session() as s:
            cps, rows = jobs.checkpoints(s, job.id), jobs.metrics(s, job.id)
        if cps and rows and rows[-1].step >= cps[0].step + 3:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no checkpoint followed by steps appeared")
    os.kill(live_worker.app.state.worker.child.pid, signal.SIGKILL)
    done = wait_for(c, job.id, timeout=120)
    assert done.status == "completed"
    events = c.fine_tuning.list_events(job.id).data
    restarted = [e for e in events if e.type == "JOB_RESTARTED"]
    assert len(restarted) == 1 and "signal 9" in restarted[0].message
    assert any(e.message.startswith("Resuming from the checkpoint at step") for e in events)
    assert _steps(live_worker, job.id) == list(range(1, done.total_steps + 1))


def test_crash_inside_checkpoint_save_resumes_cleanly(live_worker, tmp_path, monkeypatch):
    """The child is killed inside its second checkpoint save, after the weights are written and
    before the state file: no half folder is left under a real name or as a temporary, the job
    resumes from the first checkpoint and completes, and every step is recorded once."""
    marker = tmp_path / "fired"
    _inject_child_faults(monkeypatch, f"checkpoint_crash:2:{marker}")
    c = sdk(live_worker)
    job = _job(c, tmp_path)
    done = wait_for(c, job.id, timeout=120)
    assert marker.exists(), "the crash fired in the child"
    assert done.status == "completed", _event_types(c, job.id)
    events = c.fine_tuning.list_events(job.id).data
    assert [e.type for e in events].count("JOB_RESTARTED") == 1
    assert any("Resuming from the checkpoint at step" in e.message for e in events)
    out = live_worker.settings.blobs_path / "jobs" / job.id / "out"
    cps = c.fine_tuning.list_checkpoints(job.id).data
    intermediate = sorted(cp.step for cp in cps if cp.checkpoint_type == "Intermediate")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{n:06d}" for n in intermediate]
    assert not [p for p in out.rglob(".*") if p.is_dir()], "no temporary folder left"
    for folder in (out / "checkpoints").iterdir():
        assert STATE_FILE in list_files(folder), f"{folder.name} is complete"
    assert _steps(live_worker, job.id) == list(range(1, done.total_steps + 1))
