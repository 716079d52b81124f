"""Third-party keys given to a job (W&B, Hugging Face) are never readable at rest: not in the
database file, not in events, not on the wire; the home is private to the server's user."""

from __future__ import annotations

import json
import secrets
import stat
from types import SimpleNamespace

import httpx
import pytest
from together import Together

from conftest import DATA, _serve
from jobs_support import wait_for
from tunehouse.job_spec import JobSpec
from tunehouse.settings import Settings
from tunehouse.store.tables import Job
from tunehouse.train.config import SFTConfig

pytest.importorskip("wandb")


@pytest.fixture
def server(tmp_path, model_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # inherited by the training child: nothing leaves
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-runs"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-runs").mkdir()
    live, bg = _serve(Settings(home=tmp_path / "home", model_cache=model_cache, embedded_worker=True))
    yield live
    bg.stop()


def _mode(path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


def test_job_keys_are_not_stored_readable(server):
    wandb_key, hf_token = secrets.token_hex(20), "hf_" + secrets.token_hex(17)
    c = Together(base_url=server.url, api_key=server.key, max_retries=0)
    f = c.files.upload(DATA / "api" / "chat.jsonl")
    r = httpx.post(f"{server.url}/v1/fine-tunes", headers={"Authorization": f"Bearer {server.key}"}, timeout=60,
                   json={"model": "tunehouse/tiny-llama", "training_file": f.id, "n_epochs": 1, "batch_size": 8,
                         "wandb_api_key": wandb_key, "wandb_project_name": "secrets-test", "hf_api_token": hf_token})
    assert r.status_code == 200, r.text
    assert wandb_key not in r.text and hf_token not in r.text
    job = wait_for(c, r.json()["id"])
    assert job.status == "completed", [e.message for e in c.fine_tuning.list_events(job.id).data]

    events = httpx.get(f"{server.url}/v1/fine-tunes/{job.id}/events",
                       headers={"Authorization": f"Bearer {server.key}"}).text
    echo = httpx.get(f"{server.url}/v1/fine-tunes/{job.id}", headers={"Authorization": f"Bearer {server.key}"}).text
    assert "WANDB_INIT" in events, "the training child did read the W&B key"
    home = server.settings.home
    server.app.state.home.db.dispose()  # checkpoint the WAL so the main file holds everything
    stored = b"".join(p.read_bytes() for p in home.glob("tunehouse.db*"))
    for needle in (wandb_key, hf_token, str(home)):
        assert needle.encode() not in stored, f"{needle!r} is in the database file"
        assert needle not in events and needle not in echo, f"{needle!r} is on the wire"

    assert _mode(home) == "0o700" and _mode(home / "blobs") == "0o700" and _mode(home / "blobs" / "files") == "0o700"
    assert _mode(home / "tunehouse.db") == "0o600"
    assert _mode(home / "blobs" / "files" / f"{f.id}.jsonl") == "0o600"
    assert all(_mode(p) == "0o700" for p in (home / "blobs").rglob("*") if p.is_dir())
    assert all(_mode(p) == "0o600" for p in (home / "blobs").rglob("*") if p.is_file())
    with server.app.state.home.db.session() as s:
        stored_config = s.get(Job, job.id).config
    assert stored_config["train"]["wandb_api_key"] is None and stored_config["extra"]["hf_api_token"] is None, \
        "an ended job keeps no keys, not even sealed"


def test_spec_secrets_are_sealed_and_opened_only_with_the_home_secret():
    spec = JobSpec(method="sft", train=SFTConfig(model="m", training_file="file-x", wandb_api_key="wk-123"),
                   hf_api_token="hf_456")
    home_secret = secrets.token_bytes(32)
    stored = spec.to_json(home_secret)
    assert "wk-123" not in json.dumps(stored) and "hf_456" not in json.dumps(stored)
    job = SimpleNamespace(method="sft", config=stored)
    opened = JobSpec.of(job, home_secret)
    assert opened.train.wandb_api_key == "wk-123" and opened.hf_api_token == "hf_456"
    assert JobSpec.of(job).train.wandb_api_key is None and JobSpec.of(job).hf_api_token is None
    with pytest.raises(ValueError, match="secret"):
        JobSpec.of(job, secrets.token_bytes(32))
    legacy = SimpleNamespace(method="sft", config=spec.to_json(home_secret) | {
        "extra": {**stored["extra"], "hf_api_token": "hf_old"}})  # stored in clear by an older version
    assert JobSpec.of(legacy, home_secret).hf_api_token == "hf_old"
