"""`tunehouse fine-tuning` (alias `ft`), `models` and `worker`, driven as subprocesses against a
live server with its embedded worker and the tiny model. One LoRA job, created by the CLI from a
local path, is shared by the module: watch, list, retrieve, events, checkpoints, metrics,
downloads, cancel, and finally delete. Plus in-process checks of the request body the CLI builds,
the download's resume after a broken connection, and flag names = config field names; and the
standalone worker, stopped with Ctrl-C mid-job."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import threading
import time

import httpx
import pytest
import typer
from typer.testing import CliRunner

from conftest import DATA, ROOT, _serve, bin_path
from jobs_support import untar_zst, write_chat
from tunehouse import cli
from tunehouse.client import Client
from tunehouse.settings import Settings
from tunehouse.train.config import SFTConfig

TINY = "tunehouse/tiny-llama"
CHAT = DATA / "api" / "chat.jsonl"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_cache):
    live, bg = _serve(Settings(home=tmp_path_factory.mktemp("cli-ft") / "home", model_cache=model_cache,
                               embedded_worker=True))
    yield live
    bg.stop()


def run(server, *args: str, cwd=ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, TUNEHOUSE_BASE_URL=server.url, TUNEHOUSE_API_KEY=server.key,
               TUNEHOUSE_HOME=str(server.settings.home), COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return subprocess.run([bin_path("tunehouse"), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


@pytest.fixture(scope="module")
def job(server):
    """A completed LoRA job: `ft create` from a local path, then `ft watch` until it ends."""
    created = run(server, "ft", "create", "-t", str(CHAT.relative_to(ROOT)), "-m", TINY, "--lora", "--n-epochs", "2",
                  "--n-checkpoints", "2", "--learning-rate", "1e-3", "--suffix", "cli", "-y", "--json")
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    watched = run(server, "ft", "watch", body["id"], "--interval", "0.3", timeout=180)
    return {"id": body["id"], "created": body, "watch": watched}


def test_create_uploads_the_local_file_and_watch_exits_0_when_completed(job):
    created, watched = job["created"], job["watch"]
    assert created["id"].startswith("ft-") and created["training_file"].startswith("file-")
    assert created["training_type"]["type"] == "Lora" and created["n_epochs"] == 2 and created["n_checkpoints"] == 2
    assert created["learning_rate"] == 1e-3 and created["model_output_name"].endswith(f"-cli-{job['id'][3:11]}")
    assert watched.returncode == 0, watched.stdout + watched.stderr
    for line in ("Fine tune request created", "Job started", "Training started", "Job finished", "Completed."):
        assert line in watched.stdout, watched.stdout


def test_list_retrieve_events_checkpoints_metrics(server, job):
    listed = run(server, "ft", "list")
    assert listed.returncode == 0 and job["id"] in listed.stdout and "completed" in listed.stdout
    got = json.loads(run(server, "ft", "retrieve", job["id"], "--json").stdout)
    assert got["status"] == "completed" and got["steps_completed"] == got["total_steps"] > 0
    events = run(server, "fine-tuning", "list-events", job["id"])
    assert events.returncode == 0 and "Job finished" in events.stdout
    cps = json.loads(run(server, "ft", "list-checkpoints", job["id"], "--json").stdout)
    assert sorted(c["checkpoint_type"] for c in cps) == ["Final", "Intermediate"]
    table = run(server, "ft", "list-checkpoints", job["id"]).stdout
    assert "Final" in table and "Intermediate" in table
    rows = json.loads(run(server, "ft", "list-metrics", job["id"], "--json").stdout)
    assert rows and all("train/global_step" in r for r in rows)
    assert [r["train/global_step"] for r in rows if "train_loss" in r] == list(range(1, got["total_steps"] + 1))


def test_download_adapter_and_intermediate_step(server, job, tmp_path):
    out = run(server, "ft", "download", job["id"], "-o", "out.tar.zst", "--checkpoint-type", "adapter", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    names = untar_zst((tmp_path / "out.tar.zst").read_bytes(), tmp_path / "a")
    assert "adapter/adapter_model.safetensors" in names and not (tmp_path / "out.tar.zst.part").exists()

    cps = json.loads(run(server, "ft", "list-checkpoints", job["id"], "--json").stdout)
    ref = next(c["path"] for c in cps if c["checkpoint_type"] == "Intermediate")  # "ft-…:STEP"
    step = int(ref.rsplit(":", 1)[1])
    out = run(server, "ft", "download", ref, cwd=tmp_path / "a")  # no -o: the server's name, plus the step
    assert out.returncode == 0, out.stderr
    [tar] = (tmp_path / "a").glob(f"*-step-{step}.tar.zst")
    assert tar.name.startswith("alice--tiny-llama-cli-")
    assert any(n.startswith(f"step-{step:06d}/") for n in untar_zst(tar.read_bytes(), tmp_path / "s"))


def test_cancel_a_completed_job_is_a_clear_error(server, job):
    out = run(server, "ft", "cancel", job["id"])
    assert out.returncode == 1 and "already completed" in out.stderr and job["id"] in out.stderr


def test_create_with_bad_flags_names_every_field(server, job):
    out = run(server, "ft", "create", "-t", job["created"]["training_file"], "-m", TINY, "--n-epochs", "0",
              "--learning-rate", "-1", "-y")
    assert out.returncode == 1
    assert "n_epochs" in out.stderr and "learning_rate" in out.stderr, out.stderr


def test_create_flags_are_the_config_fields():
    """STYLE principle 5: every SFTConfig field is a `--field-name` flag of `fine-tuning create`."""
    group = typer.main.get_command(cli.app)
    create = group.commands["fine-tuning"].commands["create"]
    flags = {opt for p in create.params for opt in [*p.opts, *p.secondary_opts]}
    fields = {f.name for f in dataclasses.fields(SFTConfig)} - {"model", "training_file", "validation_file"}
    missing = sorted(f for f in fields if f"--{f.replace('_', '-')}" not in flags)
    assert not missing, missing
    assert {"--model", "-m", "--training-file", "-t", "--validation-file", "-v", "--no-lora", "--lr"} <= flags
    assert group.commands["ft"] is not None  # the together CLI's alias


def test_create_body_is_the_sdk_shape(monkeypatch):
    """Nested training_type / training_method / lr_scheduler as the SDK sends them; unset flags
    are absent so the server's defaults apply."""
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, json.loads(request.content or b"{}")))
        return httpx.Response(200, json={"id": "ft-1", "status": "queued", "model_output_name": "x/y"})

    client = Client("http://test", "k")
    client.http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    monkeypatch.setattr(cli.common, "client_for", lambda *a: client)  # what `ft` commands call
    res = CliRunner().invoke(cli.app, ["ft", "create", "-t", "file-1", "-m", TINY, "--lora-r", "4", "--lr", "0.01",
                                       "--min-lr-ratio", "0.1", "--train-on-inputs", "false", "-b", "max",
                                       "--wandb-api-key", "w", "-y"])
    assert res.exit_code == 0, res.output
    assert sent == [("/v1/fine-tunes", {
        "training_file": "file-1", "model": TINY, "batch_size": "max", "learning_rate": 0.01,
        "lr_scheduler": {"lr_scheduler_args": {"min_lr_ratio": 0.1}},
        "training_type": {"type": "Lora", "lora_r": 4},
        "training_method": {"method": "sft", "train_on_inputs": False}, "wandb_api_key": "w"})]
    res = CliRunner().invoke(cli.app, ["ft", "create", "-t", "file-1", "-m", TINY, "--training-method", "dpo",
                                       "--no-lora", "--simpo-gamma", "0.5", "-y"])
    assert res.exit_code == 0, res.output
    assert sent[-1][1] == {"training_file": "file-1", "model": TINY, "training_type": {"type": "Full"},
                           "training_method": {"method": "dpo", "simpo_gamma": 0.5}}  # SimPO's flags: the config's rule


def test_download_resumes_after_a_broken_connection(tmp_path):
    payload = bytes(range(256)) * 4096  # 1 MiB
    seen = []

    class Broken(httpx.SyncByteStream):
        def __iter__(self):
            yield payload[:300_000]
            raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        rng = request.headers.get("range")
        seen.append(rng)
        if rng is None:
            return httpx.Response(200, stream=Broken())
        start, _, end = rng.removeprefix("bytes=").partition("-")
        end = int(end) if end else len(payload) - 1
        return httpx.Response(206, content=payload[int(start):end + 1],
                              headers={"Content-Range": f"bytes {start}-{end}/{len(payload)}",
                                       "Content-Disposition": 'attachment; filename="o--m.tar.zst"'})

    client = Client("http://test", "k")
    client.http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    path = client.download("ft-1", tmp_path, step=3)
    assert path == tmp_path / "o--m-step-3.tar.zst" and path.read_bytes() == payload
    assert seen == ["bytes=0-1", None, "bytes=300000-"]


def test_models_list_and_add(server, tmp_path):
    home = str(tmp_path / "home")
    names = [m["name"] for m in json.loads(run(server, "models", "list", "--home", home, "--json").stdout)]
    assert TINY in names and "HuggingFaceTB/SmolLM2-135M-Instruct" in names
    folder = server.app.state.registry.path(TINY)  # build_tiny_model's folder, shared with the job above
    added = run(server, "models", "add", "me/my-model", str(folder), "--home", home)
    assert added.returncode == 0, added.stderr
    listed = run(server, "models", "list", "--home", home)
    # the folder was copied into the blob store, where every worker and server finds it
    assert "me/my-model" in listed.stdout and "store:models/me--my-model" in listed.stdout
    bad = run(server, "models", "add", "me/nothing", str(tmp_path), "--home", home)
    assert bad.returncode == 1 and "config.json" in bad.stderr


def test_worker_runs_a_job_and_requeues_it_on_ctrl_c(live, model_cache, tmp_path):
    """`tunehouse worker` beside a server without an embedded worker: it claims the job, and
    Ctrl-C mid-run stops the training child and puts the job back in the queue."""
    client = Client(live.url, live.key)
    f = client.upload(write_chat(tmp_path / "long.jsonl", 2000))
    job = client.create_job({"training_file": f["id"], "model": TINY, "batch_size": 1})
    env = dict(os.environ, TUNEHOUSE_MODEL_CACHE=str(model_cache), COLUMNS="200", NO_COLOR="1")
    proc = subprocess.Popen([bin_path("tunehouse"), "worker", "--home", str(live.settings.home)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        assert "waiting for jobs" in lines.get(timeout=30)
        assert f"running {job['id']} (attempt 1)" in lines.get(timeout=30)
        deadline = time.monotonic() + 60
        while client.retrieve_job(job["id"])["steps_completed"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    reader.join(timeout=10)  # the pipe is closed: every line is in the queue before we read it
    assert not reader.is_alive()
    rest = "".join(lines.get_nowait() for _ in range(lines.qsize()))
    assert "SIGINT: stopping" in rest and f"{job['id']}: queued" in rest and "worker stopped" in rest, rest
    assert client.retrieve_job(job["id"])["status"] == "queued"


def test_delete_then_retrieve_names_the_id(server, job):
    """A job of its own (the shared one stays for the other tests, whatever their order)."""
    created = run(server, "ft", "create", "-t", job["created"]["training_file"], "-m", TINY, "-y", "--json")
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]
    out = run(server, "ft", "delete", job_id)
    assert out.returncode == 0 and f"Deleted {job_id}" in out.stdout
    out = run(server, "ft", "retrieve", job_id)
    assert out.returncode == 1 and job_id in out.stderr
    assert run(server, "ft", "retrieve", job["id"]).returncode == 0
