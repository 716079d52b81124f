"""Jobs whose worker runs 2 training processes (torchrun, gloo, the tiny model), end to end over
a live server and the together SDK: completion with both processes in the events, a killed rank
(the attempt fails, the job resumes from its checkpoint), cancel reaching every rank."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from together import Together

from conftest import _serve
from jobs_support import wait_for, write_chat
from tunehouse import jobs
from tunehouse.settings import Settings
from tunehouse.worker.loop import training_devices

TINY = "tunehouse/tiny-llama"


@pytest.fixture
def live2(tmp_path, model_cache):
    """A live server whose embedded worker trains each job on 2 processes."""
    server, bg = _serve(Settings(home=tmp_path / "home", model_cache=model_cache, embedded_worker=True,
                                 num_processes=2, dist_timeout_s=60))
    yield server
    bg.stop()


def sdk(live) -> Together:
    return Together(base_url=live.url, api_key=live.key, max_retries=0)


def ranks_of(live) -> dict[int, int]:
    """{RANK: pid} of the training processes torchrun started for the running job."""
    torchrun = live.app.state.worker.child.pid
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == torchrun:
                env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
                found[int(env["RANK"])] = int(proc.name)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return found


def wait_checkpoint(live, job_id: str, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with live.app.state.home.db.session() as s:
            cps = jobs.checkpoints(s, job_id)
        if cps:
            return cps[0].step
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


def long_job(c, tmp_path, rows: int = 120):
    f = c.files.upload(write_chat(tmp_path / "long.jsonl", rows))
    return c.fine_tuning.create(training_file=f.id, model=TINY, lora=True, n_epochs=2, n_checkpoints=4,
                                batch_size=2, packing=False, learning_rate=1e-3)


def test_devices_of_a_worker(tmp_path):
    from tunehouse.serve.hardware import local_devices

    if not local_devices().count:
        assert training_devices(Settings(home=tmp_path)) == (None, 1)  # a CPU: one process
    assert training_devices(Settings(home=tmp_path, num_processes=2)) == (None, 2)
    assert training_devices(Settings(home=tmp_path, gpus="2,3")) == ([2, 3], 2)
    assert training_devices(Settings(home=tmp_path, gpus="0,1,2,3", num_processes=2)) == ([0, 1], 2)
    with pytest.raises(ValueError, match="num_processes 3 is more than the 2 GPUs"):
        training_devices(Settings(home=tmp_path, gpus="0,1", num_processes=3))


def test_a_job_through_the_sdk_trains_on_two_processes(live2, tmp_path):
    import httpx

    c = sdk(live2)
    limits = c.fine_tuning.model_limits(model_name=TINY)
    assert limits.training_hardware == {"processes": 2, "backend": "gloo", "gpus": None, "gpu_type": None}
    hardware = httpx.get(f"{live2.url}/v1/hardware", headers={"Authorization": f"Bearer {live2.key}"}).json()
    assert hardware["training"]["processes"] == 2
    f = c.files.upload(write_chat(tmp_path / "train.jsonl", 12))
    job = c.fine_tuning.create(training_file=f.id, model=TINY, lora=True, n_epochs=2, n_checkpoints=2,
                               batch_size=4, learning_rate=3e-3)
    done = wait_for(c, job.id, timeout=300)
    messages = [e.message for e in c.fine_tuning.list_events(job.id).data]
    assert done.status == "completed", messages
    assert "Training started on 2 processes (gloo)" in messages
    assert messages.count("Training started on 2 processes (gloo)") == 1  # rank 1 wrote nothing
    cps = c.fine_tuning.list_checkpoints(job.id).data
    assert sorted(cp.checkpoint_type for cp in cps) == ["Final", "Intermediate"]
    rows = [r for r in c.fine_tuning.list_metrics(job.id).metrics if "train_loss" in r]
    assert len(rows) == done.total_steps  # one row per step: rank 0's


def test_a_killed_rank_fails_the_attempt_and_the_job_resumes(live2, tmp_path):
    c = sdk(live2)
    job = long_job(c, tmp_path)
    step = wait_checkpoint(live2, job.id)
    ranks = ranks_of(live2)
    assert sorted(ranks) == [0, 1]  # the ranks really exist, as processes of torchrun
    os.kill(ranks[1], signal.SIGKILL)
    done = wait_for(c, job.id, timeout=400)
    events = c.fine_tuning.list_events(job.id).data
    assert done.status == "completed", [e.message for e in events]
    assert [e.type for e in events].count("JOB_RESTARTED") == 1
    assert any("Resuming from the checkpoint at step" in e.message for e in events)
    assert step < done.total_steps
    rows = [r for r in c.fine_tuning.list_metrics(job.id).metrics if "train_loss" in r]
    assert rows[-1]["train/global_step"] == done.total_steps


def test_cancel_reaches_every_rank_and_leaves_no_partial_checkpoint(live2, tmp_path):
    c = sdk(live2)
    job = long_job(c, tmp_path, rows=200)  # 200 steps: the cancel lands mid-training (48 sometimes all ran)
    wait_checkpoint(live2, job.id)
    ranks = ranks_of(live2)
    assert sorted(ranks) == [0, 1]
    assert c.fine_tuning.cancel(job.id).status == "cancel_requested"
    assert wait_for(c, job.id, timeout=120).status == "cancelled"
    for pid in ranks.values():  # every rank has exited (or is a zombie being reaped)
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    cps = c.fine_tuning.list_checkpoints(job.id).data
    assert cps and all(cp.checkpoint_type == "Intermediate" for cp in cps)
    out = live2.settings.blobs_path / "jobs" / job.id / "out"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(f"step-{cp.step:06d}" for cp in cps)
    assert not (out / "final").exists()


@pytest.mark.slow
def test_a_hung_rank_times_out_and_the_job_resumes(tmp_path, model_cache):
    """A rank that stops answering (SIGSTOP) makes the others' next collective time out after
    dist_timeout_s: the attempt fails (torchrun ends the stopped rank) and the job is requeued,
    never left in `running`."""
    server, bg = _serve(Settings(home=tmp_path / "home", model_cache=model_cache, embedded_worker=True,
                                 num_processes=2, dist_timeout_s=20))
    try:
        c = sdk(server)
        job = long_job(c, tmp_path)
        wait_checkpoint(server, job.id)
        os.kill(ranks_of(server)[1], signal.SIGSTOP)
        done = wait_for(c, job.id, timeout=400)
        events = c.fine_tuning.list_events(job.id).data
        assert done.status == "completed", [e.message for e in events]
        assert [e.type for e in events].count("JOB_RESTARTED") == 1
        assert any("Resuming from the checkpoint at step" in e.message for e in events)
    finally:
        bg.stop()
