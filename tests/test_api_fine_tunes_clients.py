"""Fine-tuning through the other official clients: the together 1.x SDK (strict pydantic, its own
venv) and the v3 and v1 CLIs, against one live server with its worker."""

from __future__ import annotations

import subprocess

import pytest
from together import Together

from conftest import DATA, _serve, bin_path, sdk_env, require_together1
from jobs_support import wait_for
from test_api_files_v1_and_clis import run_v1
from tunehouse.settings import Settings

TINY = "tunehouse/tiny-llama"
CHAT = DATA / "api" / "chat.jsonl"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_cache):
    live, bg = _serve(Settings(home=tmp_path_factory.mktemp("clients") / "home", model_cache=model_cache,
                               embedded_worker=True))
    yield live
    bg.stop()


def test_v1_sdk_job_roundtrip(server, tmp_path):
    v1 = require_together1()
    res = run_v1(v1, server, f"""
        import time
        c = Together()
        f = c.files.upload({str(CHAT)!r})
        limits = c.fine_tuning.get_model_limits(model={TINY!r})
        j = c.fine_tuning.create(training_file=f.id, model={TINY!r}, n_epochs=2, n_checkpoints=2,
                                 learning_rate=1e-3, suffix="v1")
        while c.fine_tuning.retrieve(j.id).status not in ("completed", "error", "user_error", "cancelled"):
            time.sleep(0.5)
        job = c.fine_tuning.retrieve(j.id)
        events = c.fine_tuning.list_events(j.id).data
        cps = c.fine_tuning.list_checkpoints(j.id)
        out = c.fine_tuning.download(j.id, output={str(tmp_path / "m.tar.zst")!r})
        print(json.dumps(dict(status=str(job.status), r=job.training_type.lora_r, max_rank=limits.lora_training.max_rank,
                              events=[str(e.type) for e in events], cps=[c.type for c in cps],
                              size=out.size, batch=job.batch_size, out=job.output_name)))
    """)
    assert res["status"].lower().endswith("completed") and res["r"] == res["max_rank"]
    assert any(t.endswith("JOB_COMPLETE") for t in res["events"])
    assert res["size"] == (tmp_path / "m.tar.zst").stat().st_size > 0
    assert isinstance(res["batch"], int) and res["out"].startswith("alice/tiny-llama-v1-")


def _tg(server, *args, cwd=None):
    out = subprocess.run([bin_path("together"), *args], capture_output=True, text=True, env=sdk_env(server),
                         timeout=300, cwd=cwd)
    assert out.returncode == 0, f"together {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def test_v3_cli_job_commands(server, tmp_path):
    out = _tg(server, "ft", "create", "--training-file", str(CHAT), "--model", TINY, "--lora", "-y",
              "--n-epochs", "2", "--n-checkpoints", "2", "--learning-rate", "0.001")
    assert "Fine-tuning job has been submitted" in out or "submitted" in out.lower(), out
    job_id = next(w for w in out.replace("'", " ").replace('"', " ").split() if w.startswith("ft-"))
    job_id = job_id.strip(".,:")
    client = Together(base_url=server.url, api_key=server.key, max_retries=0)
    assert wait_for(client, job_id).status == "completed"
    assert job_id in _tg(server, "ft", "ls")
    assert "completed" in _tg(server, "ft", "get", job_id)
    assert "Job finished" in _tg(server, "ft", "list-events", job_id)
    assert "Final" in _tg(server, "ft", "list-checkpoints", job_id)
    _tg(server, "ft", "download", job_id, cwd=tmp_path)
    got = list(tmp_path.rglob("*.tar.zst"))
    assert len(got) == 1 and got[0].stat().st_size > 0


def test_v1_cli_lists_jobs(server):
    v1 = require_together1()
    out = subprocess.run([str(v1.parent / "together"), "--base-url", server.url + "/v1", "--api-key", server.key,
                          "fine-tuning", "list"], capture_output=True, text=True, env=sdk_env(server), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
