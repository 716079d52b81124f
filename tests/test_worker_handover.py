"""Workers share nothing but the database and the blob store. One API server and two workers,
each with its own home and model cache: worker A (a process of its own) takes a job, and once
its first checkpoint is recorded A and its training child are SIGKILLed; worker B, which never
saw the job, requeues it when A's heartbeat goes stale, resumes it from the checkpoint in the
store (training on from the step after it) and completes it. The API server (no worker) answers
a chat request with the result, read from the store, and deleting the job leaves no object
under `jobs/<id>/`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from sqlalchemy import select
from together import Together

from conftest import BACKENDS, _serve, backend_settings
from jobs_support import wait_for, write_chat
from tunehouse import jobs
from tunehouse.settings import Settings
from tunehouse.store.home import open_home
from tunehouse.store.tables import Event, Job, Metric
from tunehouse.worker.loop import Worker, settings_env

TINY = "tunehouse/tiny-llama"


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_job_moves_to_a_worker_with_its_own_home(tmp_path):
    """On a shared SQLite file and folder only: the same handover on PostgreSQL + S3, with worker
    processes killed and resumed from the bucket, is test_many_machines.py's."""
    # One database, one blob store and the server secret; every home (API server, worker A,
    # worker B) is its own.
    shared = {"database_url": f"sqlite:///{tmp_path / 'shared.db'}", "blob_url": str(tmp_path / "store"),
              "secret": "s" * 64}
    live, bg = _serve(Settings(home=tmp_path / "api", embedded_worker=False, **shared))
    a = Settings(home=tmp_path / "a", model_cache=tmp_path / "a-models", **shared)
    worker_a = subprocess.Popen([sys.executable, "-m", "tunehouse", "worker"], env={**os.environ, **settings_env(a)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker_b = None
    try:
        c = Together(base_url=live.url, api_key=live.key, max_retries=0)
        f = c.files.upload(write_chat(tmp_path / "train.jsonl", 40))
        job = c.fine_tuning.create(training_file=f.id, model=TINY, lora=True, n_epochs=2, n_checkpoints=4,
                                   batch_size=1, packing=False, learning_rate=1e-3)
        db = live.app.state.home.db

        def checkpoint():
            with db.session() as s:
                return jobs.checkpoints(s, job.id)

        _wait(checkpoint, 180, "worker A's first checkpoint")
        child = _children(worker_a.pid)
        os.kill(worker_a.pid, signal.SIGKILL)  # the worker and its training child die mid-job
        for pid in child:
            os.kill(pid, signal.SIGKILL)
        worker_a.wait()
        assert (a.work_path / "jobs" / job.id).is_dir(), "A's scratch outlives it"
        last = checkpoint()[-1]  # A may have recorded another one before it died
        assert last.checkpoint_type == "Intermediate"

        b = Settings(home=tmp_path / "b", model_cache=tmp_path / "b-models", **shared)
        worker_b = Worker(open_home(b), poll_s=0.2, stale_after_s=3)
        worker_b.start_thread()
        done = wait_for(c, job.id, timeout=240)
        assert done.status == "completed", [e.message for e in c.fine_tuning.list_events(job.id).data]

        with db.session() as s:
            row = s.get(Job, job.id)
            assert row.attempts == 2 and row.worker_id == worker_b.worker_id
            restarted = s.scalars(select(Event).where(Event.job_id == job.id, Event.type == "JOB_START")
                                  .order_by(Event.id)).all()[-1]
            assert restarted.message == "Job started (attempt 2)"
            metrics = s.scalars(select(Metric).where(Metric.job_id == job.id)).all()
        assert sorted(m.step for m in metrics) == list(range(1, done.total_steps + 1))
        # B trained on from the step after the checkpoint: A's rows up to it are still there
        assert all((m.created_at < restarted.created_at) == (m.step <= last.step) for m in metrics)
        messages = [e.message for e in c.fine_tuning.list_events(job.id).data]
        assert f"Resuming from the checkpoint at step {last.step}" in messages
        saved = [e.to_dict() for e in c.fine_tuning.list_events(job.id).data if e.type == "CHECKPOINT_SAVE"]
        assert saved and all(e["checkpoint_path"] == f"jobs/{job.id}/out/checkpoints/step-{e['step']:06d}"
                             for e in saved), saved  # store keys, never a machine's path
        assert not any(str(tmp_path) in str(e.to_dict()) for e in c.fine_tuning.list_events(job.id).data)
        assert not (b.work_path / "jobs" / job.id).exists(), "B's scratch goes with the attempt"
        Worker(open_home(a)).sweep_scratch()  # A, started again, drops what its dead try left
        assert not (a.work_path / "jobs").exists() or not any((a.work_path / "jobs").iterdir())

        # The API server has no worker and no shared folder: the model comes from the store.
        chat = openai.OpenAI(base_url=live.url + "/v1", api_key=live.key, max_retries=0)
        answer = chat.chat.completions.create(model=done.model_output_name, max_tokens=3,
                                              messages=[{"role": "user", "content": "Say red then blue."}])
        assert answer.choices[0].message.content is not None
        from tunehouse.serve.endpoints import model_dir_for

        with db.session() as s:  # what a dedicated endpoint loads: the merged weights, this server's copy
            merged = model_dir_for(s, live.app.state.home, live.app.state.registry, "alice", done.model_output_name)
        assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
        c.fine_tuning.delete(job.id)
        assert live.app.state.home.blobs.list(f"jobs/{job.id}") == []
    finally:
        if worker_a.poll() is None:
            worker_a.kill()
        if worker_b is not None:
            worker_b.stop()
        bg.stop()


@pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
def test_a_model_added_from_a_folder_is_in_the_store(tmp_path, store_backend, request, model_cache):
    """`tunehouse models add NAME FOLDER` copies the folder into the store: another machine (its own
    home, the same database and store) loads it from there, after the folder is gone."""
    import shutil

    from tunehouse.models.registry import Registry

    shared = {"database_url": f"sqlite:///{tmp_path / 'shared.db'}", "blob_url": str(tmp_path / "store"),
              **backend_settings(request, store_backend)}
    here = Registry(open_home(Settings(home=tmp_path / "a", model_cache=model_cache, **shared)))
    folder = tmp_path / "my-model"
    shutil.copytree(here.path(TINY), folder)
    added = here.add("acme/tiny-copy", str(folder))
    assert added.source == "store:models/acme--tiny-copy" and added.context_length == 2048
    shutil.rmtree(folder)

    there = Registry(open_home(Settings(home=tmp_path / "b", **shared)))
    assert [(m.name, m.source) for m in there.list()][-1] == ("acme/tiny-copy", added.source)
    copy = there.path("acme/tiny-copy")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in here.path(TINY).iterdir())
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(copy).config.num_hidden_layers == 2
    with open_home(Settings(home=tmp_path / "b", **shared)).db.session() as s:
        assert there.limits("acme/tiny-copy", s)["model_name"] == "acme/tiny-copy"
