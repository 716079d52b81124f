"""Many machines, really: two API servers (`tunehouse serve --no-worker`) and two workers
(`tunehouse worker`), each with its own home and no folder in common, on one PostgreSQL database
and one S3 bucket (the real servers of tests/services). Driven by the together SDK as a team
would: files go in through one server, jobs through the other; each job is claimed by exactly
one worker; a worker killed mid-job leaves its job to the other, which resumes it from the
last checkpoint in the store."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from together import Together

from conftest import backend_settings, bin_path
from jobs_support import untar_zst, wait_for, write_chat
from test_serve_and_keys import _free_port, _wait_health

TINY = "tunehouse/tiny-llama"


@dataclass
class Machine:
    name: str
    proc: subprocess.Popen
    log: Path
    url: str | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    servers: list[Machine]
    workers: list[Machine]
    admin_key: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def sdk(self, i: int = 0) -> Together:
        return Together(base_url=self.servers[i].url, api_key=self.admin_key, max_retries=0)

    def ran(self, worker: Machine) -> list[str]:
        """The jobs a worker started, from its own narration (`running ft-… (attempt N)`)."""
        return re.findall(r"running (ft-[\w-]+) \(attempt", worker.output())


def _start(name: str, args: list[str], env: dict, tmp_path: Path) -> Machine:
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([bin_path("tunehouse"), *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Machine(name, proc, log)


@pytest.fixture
def cluster(tmp_path, model_cache, request):
    shared = backend_settings(request, "remote")  # a fresh PostgreSQL database and S3 bucket
    admin_key = "th-" + secrets.token_urlsafe(32)
    base = dict(os.environ, TUNEHOUSE_DATABASE_URL=shared["database_url"], TUNEHOUSE_BLOB_URL=shared["blob_url"],
                TUNEHOUSE_SECRET=secrets.token_hex(32), TUNEHOUSE_ADMIN_KEY=admin_key,
                TUNEHOUSE_HEARTBEAT_TIMEOUT_S="6", NO_COLOR="1", COLUMNS="200")
    base.pop("TUNEHOUSE_BLOB_DIR", None)
    machines: list[Machine] = []
    try:
        servers = []
        for i in range(2):
            port = _free_port()
            env = dict(base, TUNEHOUSE_HOME=str(tmp_path / f"api{i}"))
            m = _start(f"api{i}", ["serve", "--no-worker", "--port", str(port)], env, tmp_path)
            m.url = f"http://127.0.0.1:{port}"
            machines.append(m)
            servers.append(m)
        workers = []
        for i in range(2):
            # Each worker machine has its own home and its own model cache: nothing on disk is shared.
            env = dict(base, TUNEHOUSE_HOME=str(tmp_path / f"gpu{i}"), TUNEHOUSE_MODEL_CACHE=str(tmp_path / f"mc{i}"))
            m = _start(f"gpu{i}", ["worker"], env, tmp_path)
            machines.append(m)
            workers.append(m)
        for m in servers:
            _wait_health(m.url, m.proc)
        yield Cluster(servers, workers, admin_key)
    finally:
        for m in machines:
            if m.proc.poll() is None:
                os.killpg(m.proc.pid, signal.SIGTERM)
        for m in machines:
            try:
                m.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(m.proc.pid, signal.SIGKILL)
                m.proc.wait()


def test_two_servers_two_workers_share_one_database_and_bucket(cluster, tmp_path):
    a, b = cluster.sdk(0), cluster.sdk(1)
    # Files uploaded through one server are the other's too (the bytes went to the bucket).
    train = a.files.upload(write_chat(tmp_path / "train.jsonl", 16))
    assert train.id in [f.id for f in b.files.list().data]
    assert b.files.content(train.id).read().decode().count("\n") == 16

    created = [b.fine_tuning.create(training_file=train.id, model=TINY, lora=True, suffix=f"m{i}", n_epochs=1,
                                    batch_size=4, learning_rate=3e-3) for i in range(6)]
    done = [wait_for(a, job.id, timeout=600) for job in created]
    assert [d.status for d in done] == ["completed"] * 6, [
        [e.message for e in a.fine_tuning.list_events(d.id).data] for d in done if d.status != "completed"]

    # Each job claimed exactly once: one start event each, and one worker's narration names it.
    for d in done:
        starts = [e.message for e in a.fine_tuning.list_events(d.id).data if e.message.startswith("Job started")]
        assert starts == ["Job started"], (d.id, starts)
    ran = [cluster.ran(w) for w in cluster.workers]
    assert sorted(ran[0] + ran[1]) == sorted(d.id for d in done), ran
    assert all(ran), f"both workers should have trained: {ran}"

    # Every output downloads from either server and answers a chat request on the other.
    for i, d in enumerate(done):
        names = untar_zst(a.fine_tuning.content(ft_id=d.id, checkpoint="adapter").read(), tmp_path / f"out{i}")
        assert "adapter/adapter_model.safetensors" in names
        reply = (b if i % 2 else a).chat.completions.create(
            model=d.model_output_name, messages=[{"role": "user", "content": "Say red then blue."}], max_tokens=4)
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0


def test_a_job_whose_worker_dies_is_resumed_by_the_other_from_the_store(cluster, tmp_path):
    c = cluster.sdk(0)
    train = c.files.upload(write_chat(tmp_path / "train.jsonl", 96))
    job = c.fine_tuning.create(training_file=train.id, model=TINY, lora=True, suffix="kill", n_epochs=4,
                               n_checkpoints=8, batch_size=2, learning_rate=1e-3)
    deadline = time.monotonic() + 300
    while not any(cp.checkpoint_type == "Intermediate" for cp in c.fine_tuning.list_checkpoints(job.id).data):
        assert c.fine_tuning.retrieve(job.id).status in ("pending", "queued", "running"), "finished before a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    victim = next(w for w in cluster.workers if job.id in cluster.ran(w))
    survivor = next(w for w in cluster.workers if w is not victim)
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the machine dies: worker and training child together
    victim.proc.wait()

    done = wait_for(c, job.id, timeout=600)
    messages = [e.message for e in c.fine_tuning.list_events(job.id).data]
    assert done.status == "completed", messages
    assert job.id in cluster.ran(survivor)
    resumed = [int(m.rsplit(" ", 1)[-1]) for m in messages if m.startswith("Resuming from the checkpoint at step")]
    assert resumed and resumed[0] > 0, messages
    assert any(m.startswith("Job restarted") for m in messages), messages
    steps = [r["train/global_step"] for r in c.fine_tuning.list_metrics(job.id).metrics if "train_loss" in r]
    assert steps == list(range(1, done.total_steps + 1)), "one metric row per step, the redone ones rewritten"
    names = untar_zst(c.fine_tuning.content(ft_id=job.id, checkpoint="adapter").read(), tmp_path / "out")
    assert "adapter/adapter_model.safetensors" in names
