"""One finished LoRA job (with an offline W&B run) on a live server with its embedded worker, read
through the SDKs: the documented tail of the event log (compression, upload), `wandb_url` on the
job and its WANDB_INIT event, the metrics time and resolution filters, `models.retrieve` for the
fine-tuned name; and the price estimate as both together SDK lines and the v3 CLI read it."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import openai
import pytest
from together import Together

from conftest import DATA, _serve, bin_path, sdk_env, require_together1
from jobs_support import wait_for, write_chat
from test_api_files_v1_and_clis import run_v1
from tunehouse.settings import Settings

TINY = "tunehouse/tiny-llama"
USER_USER = DATA / "api" / "user_user.jsonl"
TAIL = ["TRAINING_COMPLETE", "COMPRESSING_MODEL", "MODEL_COMPRESSION_COMPLETE", "MODEL_UPLOADING",
        "MODEL_UPLOAD_COMPLETE", "JOB_COMPLETE"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model_cache):
    """(live server, together 3.x client, the completed job, its training file)."""
    tmp = tmp_path_factory.mktemp("extras")
    with pytest.MonkeyPatch.context() as mp:  # the training child inherits these: nothing leaves the machine
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp))
        mp.setenv("WANDB_SILENT", "true")
        live, bg = _serve(Settings(home=tmp / "home", model_cache=model_cache, embedded_worker=True))
        c = Together(base_url=live.url, api_key=live.key, max_retries=0)
        train = c.files.upload(write_chat(tmp / "train.jsonl", 16))
        job = c.fine_tuning.create(training_file=train.id, model=TINY, lora=True, suffix="extras", n_epochs=2,
                                   packing=False, batch_size=4, learning_rate=3e-3, wandb_api_key="x" * 40,
                                   wandb_project_name="tunehouse-test", wandb_name="extras")
        done = wait_for(c, job.id)
        assert done.status == "completed", [e.message for e in c.fine_tuning.list_events(job.id).data]
        yield live, c, done, train
    bg.stop()


def test_compression_and_upload_events_in_documented_order(finished, tmp_path):
    live, c, job, _ = finished
    events = c.fine_tuning.list_events(job.id).data
    types = [e.type for e in events]
    assert types[-len(TAIL):] == TAIL, types
    by_type = {e.type: e for e in events}
    assert [e.message for e in events][-len(TAIL) + 1:] == [
        "Compressing output model", by_type["MODEL_COMPRESSION_COMPLETE"].message, "Uploading output model",
        "Model upload complete", "Job finished"]
    assert by_type["MODEL_COMPRESSION_COMPLETE"].message.startswith("Model compression complete: merged.tar.zst, ")
    # The upload event names the model and carries the SHA-256 of the archive a default download serves.
    archive = httpx.get(f"{live.url}/v1/finetune/download", params={"ft_id": job.id},
                        headers={"Authorization": f"Bearer {live.key}"}).content
    upload = by_type["MODEL_UPLOAD_COMPLETE"].to_dict()
    assert upload["model_path"] == job.model_output_name and upload["hash"] == hashlib.sha256(archive).hexdigest()

    v1 = require_together1()
    res = run_v1(v1, live, f"print(json.dumps({{'types': [str(e.type.value) for e in "
                           f"Together().fine_tuning.list_events({job.id!r}).data]}}))")
    assert res["types"][-len(TAIL):] == TAIL, "the 1.x SDK validates every event type"


def test_wandb_url_on_job_and_event(finished):
    _, c, job, _ = finished
    assert job.wandb_url and job.wandb_url.startswith("file://")
    init = [e for e in c.fine_tuning.list_events(job.id).data if e.type == "WANDB_INIT"]
    assert len(init) == 1 and init[0].wandb_url == job.wandb_url
    folder = Path(job.wandb_url.removeprefix("file://"))
    assert folder.is_dir() and folder.name.startswith("offline-run-") and list(folder.glob("run-*.wandb"))
    assert f"wandb sync {folder}" in init[0].message


def test_metrics_time_and_resolution_filters(finished):
    live, c, job, _ = finished
    everything = c.fine_tuning.list_metrics(job.id).metrics
    steps = [r["train/global_step"] for r in everything]
    assert steps == list(range(1, job.total_steps + 1))
    # Metrics of an epoch are logged before its EPOCH_COMPLETE event: cut there by time.
    first_epoch = next(e for e in c.fine_tuning.list_events(job.id).data if e.type == "EPOCH_COMPLETE")
    half = job.total_steps // 2
    assert first_epoch.step == half and half >= 3  # packing off: 16 examples / batch 4 per epoch
    before = c.fine_tuning.list_metrics(job.id, logged_at_to=first_epoch.created_at).metrics
    after = c.fine_tuning.list_metrics(job.id, logged_at_from=first_epoch.created_at).metrics
    assert [r["train/global_step"] for r in before] == list(range(1, half + 1))
    assert [r["train/global_step"] for r in after] == list(range(half + 1, job.total_steps + 1))
    # ISO strings with Z and naive (taken as UTC) work too, and combine with the step bounds.
    now = datetime.now(timezone.utc)
    h = {"Authorization": f"Bearer {live.key}"}
    url = f"{live.url}/v1/fine-tunes/{job.id}/metrics"
    assert httpx.get(url, headers=h, params={"logged_at_from": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}).json() == {
        "metrics": []}
    old = (now - timedelta(days=1)).replace(tzinfo=None).isoformat()
    got = httpx.get(url, headers=h, params={"logged_at_from": old, "global_step_from": 2, "global_step_to": 3})
    assert [r["train/global_step"] for r in got.json()["metrics"]] == [2, 3]

    thinned = c.fine_tuning.list_metrics(job.id, resolution=2).metrics
    assert len(thinned) == 2 and thinned[-1]["train/global_step"] == job.total_steps
    for bad in ("0", "-1"):
        r = httpx.get(url, headers=h, params={"resolution": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "resolution", r.text
    r = httpx.get(url, headers=h, params={"logged_at_from": "yesterday"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logged_at_from"


def test_models_retrieve_fine_tuned(finished):
    live, _, job, _ = finished
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=live.key, max_retries=0)
    name = job.model_output_name
    assert name.count("/") == 1
    m = client.models.retrieve(name)
    assert (m.id, m.owned_by, m.object) == (name, "alice", "model")
    assert m.id in [x.id for x in client.models.list()]
    bob = openai.OpenAI(base_url=live.url + "/v1", api_key=live.other_key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        bob.models.retrieve(name)
    assert exc.value.body["code"] == "model_not_found"


def test_estimate_shape_read_by_both_sdk_lines(finished, tmp_path):
    live, c, _, train = finished
    ok = c.fine_tuning.estimate_price(training_file=train.id, model=TINY, n_epochs=2)
    assert ok.estimation_available is True and ok.allowed_to_proceed is True
    assert ok.estimated_total_price == 0.0 and ok.estimated_train_token_count > 0

    bad_file = c.files.upload(USER_USER)  # the v3 client does not check roles; the server does
    assert bad_file.processing_status == "FAILED"
    bad = c.fine_tuning.estimate_price(training_file=bad_file.id, model=TINY).to_dict()
    assert bad["estimation_available"] is False and bad["unavailable_reason"] == "train_file_invalid"
    assert bad["allowed_to_proceed"] is True and bad["message"].startswith(f"File {bad_file.id} is invalid: ")
    unknown = c.fine_tuning.estimate_price(training_file=train.id, model="tunehouse/nope").to_dict()
    assert unknown["estimation_available"] is False and unknown["unavailable_reason"] is None
    assert unknown["message"].startswith("Unknown model 'tunehouse/nope'.")

    # The v3 CLI prints the reason, never the "insufficient funds" warning; the create is then refused.
    cli = subprocess.run([bin_path("together"), "ft", "create", "--training-file", bad_file.id, "--model", TINY,
                          "--lora"], capture_output=True, text=True, env=sdk_env(live), timeout=120, cwd=tmp_path)
    out = cli.stdout + cli.stderr
    assert "the training file is invalid" in out and "insufficient funds" not in out, out
    assert cli.returncode != 0 and bad_file.id in out

    v1 = require_together1()
    res = run_v1(v1, live, f"""
        c = Together()
        out = {{}}
        for name, fid in (("ok", {train.id!r}), ("bad", {bad_file.id!r})):
            e = c.fine_tuning.estimate_price(training_file=fid, model={TINY!r})
            out[name] = dict(allowed=e.allowed_to_proceed, price=e.estimated_total_price,
                             tokens=e.estimated_train_token_count)
        print(json.dumps(out))
    """)
    assert res["ok"]["allowed"] is True and res["ok"]["tokens"] > 0 and res["ok"]["price"] == 0.0
    assert res["bad"] == {"allowed": True, "price": 0.0, "tokens": 0}
