"""Fine-tuning jobs over a live server with its embedded worker and the tiny model, driven by the
together 3.x SDK: create → completed with events, checkpoints, metrics and downloads; create-time
validation; cancel; delete; continuation from `ID:STEP`; crash and restart recovery."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
import together
from together import Together

from conftest import BACKENDS, DATA, _serve
from jobs_support import untar_zst, wait_for, write_chat
from tunehouse.settings import Settings

TINY = "tunehouse/tiny-llama"
CHAT = DATA / "api" / "chat.jsonl"
# On both stores: the end-to-end job (checkpoints written to and continued from the store, archives
# downloaded from it), create-time checks and cancel (no partial checkpoint, delete empties the
# store). On the local store only: restart (the remote one keeps its state outside the server
# anyway) and early stopping (no store path of its own). A killed child resuming from a checkpoint
# is test_db_faults.py's, on PostgreSQL + S3 test_many_machines.py's.
both_stores = pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)


def sdk(live, key=None) -> Together:
    return Together(base_url=live.url, api_key=key or live.key, max_retries=0)


@both_stores
def test_lora_job_end_to_end(live_worker, tmp_path):
    c = sdk(live_worker)
    train = c.files.upload(write_chat(tmp_path / "train.jsonl", 24))
    val = c.files.upload(write_chat(tmp_path / "val.jsonl", 6, seed=5))
    limits = c.fine_tuning.model_limits(model_name=TINY)
    assert limits.lora_training.default_rank > 0 and limits.supports_vision is False

    job = c.fine_tuning.create(training_file=train.id, validation_file=val.id, model=TINY, lora=True,
                               suffix="e2e", n_epochs=3, n_checkpoints=3, n_evals=3, batch_size=4,
                               learning_rate=3e-3)
    assert job.status in ("pending", "queued") and job.id.startswith("ft-")
    assert job.model_output_name == f"alice/tiny-llama-e2e-{job.id[3:11]}"
    assert job.training_type.type == "Lora" and job.training_type.lora_r == limits.lora_training.default_rank
    done = wait_for(c, job.id)
    assert done.status == "completed", [e.message for e in c.fine_tuning.list_events(job.id).data]

    events = c.fine_tuning.list_events(job.id).data
    messages = [e.message for e in events]
    for expected in ("Fine tune request created", "Job started", "Model data downloaded", "Training started",
                     "Training completed", "Uploading output model", "Job finished"):
        assert expected in messages
    assert any(m.startswith("Epoch completed, at step") for m in messages)
    assert any(m.startswith("Evaluation complete, valid loss") for m in messages)
    assert any(m.startswith("Checkpoint saved at step") for m in messages)
    assert all(e.type.isupper() and e.created_at.endswith("Z") and e.object == "fine-tune-event" for e in events)
    assert "JOB_COMPLETE" in [e.type for e in events]

    cps = c.fine_tuning.list_checkpoints(job.id).data
    assert [cp.checkpoint_type for cp in cps].count("Final") == 1
    steps = sorted(cp.step for cp in cps if cp.checkpoint_type == "Intermediate")
    assert len(steps) == 2 and all(isinstance(s, int) for s in steps)

    rows = c.fine_tuning.list_metrics(job.id).metrics
    assert [r["train/global_step"] for r in rows if "train_loss" in r] == list(range(1, done.total_steps + 1))
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0], losses
    assert any("valid_loss" in r for r in rows)

    # The adapter loads with PEFT unchanged and changes the model; merged weights match it.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = untar_zst(c.fine_tuning.content(ft_id=job.id, checkpoint="adapter").read(), tmp_path / "a")
    assert "adapter/adapter_model.safetensors" in names and not any("optimizer" in n for n in names)
    base_dir = live_worker.app.state.registry.path(TINY)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "a" / "adapter")
        tuned_logits = tuned(ids).logits
        untar_zst(c.fine_tuning.content(ft_id=job.id, checkpoint="merged").read(), tmp_path / "m")
        merged_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "merged")(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-3
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-4)

    # Continue from an intermediate checkpoint with the same LoRA shape: `ID:STEP`.
    child = c.fine_tuning.create(training_file=train.id, from_checkpoint=f"{job.id}:{steps[0]}", n_epochs=1,
                                 learning_rate=1e-3, batch_size=4)
    assert wait_for(c, child.id).status == "completed"
    assert c.fine_tuning.retrieve(child.id).model == TINY
    assert any("Continuing the LoRA adapter" in e.message for e in c.fine_tuning.list_events(child.id).data)

    # Another LoRA shape: the parent is merged into the base first, then a new adapter is trained.
    other = c.fine_tuning.create(training_file=train.id, from_checkpoint=done.model_output_name, n_epochs=1,
                                 learning_rate=1e-3, batch_size=4, lora=True, lora_r=4)
    assert wait_for(c, other.id).status == "completed"
    assert c.fine_tuning.retrieve(other.id).training_type.lora_r == 4
    assert any("Merged the adapter" in e.message for e in c.fine_tuning.list_events(other.id).data)


@both_stores
def test_create_reports_every_bad_field_at_once(live_worker, tmp_path):
    c = sdk(live_worker)
    f = c.files.upload(CHAT)
    r = httpx.post(f"{live_worker.url}/v1/fine-tunes", headers={"Authorization": f"Bearer {live_worker.key}"},
                   json={"training_file": f.id, "model": TINY, "n_epochs": 0, "learning_rate": -1,
                         "batch_size": 1000, "warmup_ratio": 2,
                         "training_type": {"type": "Lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 1.5}})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    for field in ("n_epochs", "learning_rate", "batch_size", "warmup_ratio", "lora_dropout"):
        assert field in msg, msg
    assert "1000" in msg and "between 1 and 64" in msg

    with pytest.raises(together.BadRequestError) as exc:
        c.fine_tuning.create(training_file="file-nope", model=TINY)
    assert "file-nope" in exc.value.body["error"]["message"]
    with pytest.raises(together.APIStatusError) as exc:
        c.fine_tuning.create(training_file=f.id, model="acme/unknown-7b")
    assert "acme/unknown-7b" in exc.value.body["error"]["message"]
    bobs = sdk(live_worker, live_worker.other_key).files.upload(write_chat(tmp_path / "b.jsonl", 3))
    with pytest.raises(together.BadRequestError):
        c.fine_tuning.create(training_file=bobs.id, model=TINY)
    failed = c.files.upload(DATA / "api" / "user_user.jsonl", check=False)
    with pytest.raises(together.BadRequestError) as exc:
        c.fine_tuning.create(training_file=failed.id, model=TINY)
    assert "failed validation" in exc.value.body["error"]["message"]
    assert c.fine_tuning.list().data == []


def _long_job(c, tmp_path, rows: int = 40, **kw):
    f = c.files.upload(write_chat(tmp_path / "long.jsonl", rows))
    return c.fine_tuning.create(training_file=f.id, model=TINY, lora=True, n_epochs=2, n_checkpoints=4,
                                batch_size=1, packing=False, learning_rate=1e-3, **kw)


def _wait_checkpoint(live, job_id: str, timeout: float = 120) -> int:
    from tunehouse import jobs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with live.app.state.home.db.session() as s:
            cps = jobs.checkpoints(s, job_id)
        if cps:
            return cps[0].step
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@both_stores
def test_cancel_mid_run_leaves_no_partial_checkpoint(live_worker, tmp_path):
    c = sdk(live_worker)
    job = _long_job(c, tmp_path, rows=100)  # long enough that the cancel lands mid-training
    _wait_checkpoint(live_worker, job.id)
    assert c.fine_tuning.cancel(job.id).status == "cancel_requested"
    done = wait_for(c, job.id)
    assert done.status == "cancelled"
    cps = c.fine_tuning.list_checkpoints(job.id).data
    assert cps and all(cp.checkpoint_type == "Intermediate" for cp in cps)
    blobs = live_worker.app.state.home.blobs
    out = f"jobs/{job.id}/out"
    stored = {b.key.removeprefix(f"{out}/checkpoints/").split("/")[0] for b in blobs.list(f"{out}/checkpoints")}
    assert sorted(stored) == sorted(f"step-{cp.step:06d}" for cp in cps), "no half-written folder left"
    assert not blobs.list(f"{out}/final")
    with pytest.raises(together.APIStatusError):
        c.fine_tuning.cancel(job.id)

    deleted = httpx.delete(f"{live_worker.url}/v1/fine-tunes/{job.id}",
                           headers={"Authorization": f"Bearer {live_worker.key}"})
    assert deleted.status_code == 200 and "message" in deleted.json()
    with pytest.raises(together.NotFoundError) as exc:
        c.fine_tuning.retrieve(job.id)
    assert exc.value.body["error"]["message"]
    assert blobs.list(f"jobs/{job.id}") == [], "no object of the job is left in the store"


def test_server_restart_mid_run_keeps_state(tmp_path, model_cache):
    settings = Settings(home=tmp_path / "home", model_cache=model_cache, embedded_worker=True)
    live, bg = _serve(settings)
    c = sdk(live)
    job = _long_job(c, tmp_path)  # 80 steps: stopped after the first checkpoint, at step 20
    _wait_checkpoint(live, job.id)
    bg.stop()  # the worker stops its child and requeues the job
    live2, bg2 = _serve_again(settings, live)
    try:
        c2 = sdk(live2)
        assert wait_for(c2, job.id).status == "completed"
        types = [e.type for e in c2.fine_tuning.list_events(job.id).data]
        assert "JOB_RESTARTED" in types and types[-1] == "JOB_COMPLETE"
        assert job.training_file in [f.id for f in c2.files.list().data]
    finally:
        bg2.stop()


def _serve_again(settings, old):
    from conftest import Live
    from tunehouse.api.app import create_app
    from tunehouse.api.server import serve_in_thread

    app = create_app(settings)
    bg = serve_in_thread(app)
    return Live(bg.url, old.key, old.other_key, settings, app), bg


def test_early_stopping_through_the_sdk(live_worker, tmp_path):
    """The v3 SDK's early-stopping fields: refused without a validation file or with too few
    evaluations; with validation answers that contradict the training ones, the job stops early,
    completes, and says at which step and from which evaluation its weights are."""
    import json

    c = sdk(live_worker)
    train = c.files.upload(write_chat(tmp_path / "train.jsonl", 16))
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    for row in rows:  # "red blue" → "blue red": what training teaches makes these answers less likely
        row["messages"][1]["content"] = " ".join(reversed(row["messages"][1]["content"].split()))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    val = c.files.upload(tmp_path / "val.jsonl")
    kw = dict(training_file=train.id, model=TINY, lora=True, n_epochs=6, batch_size=2, learning_rate=1e-2,
              packing=False)
    # The SDK checks these itself; the server refuses them too, for every other client.
    for body, field in (({"n_evals": 0}, "validation_file"), ({"validation_file": val.id, "n_evals": 3}, "n_evals")):
        r = httpx.post(f"{live_worker.url}/v1/fine-tunes", headers={"Authorization": f"Bearer {live_worker.key}"},
                       json={"training_file": train.id, "model": TINY, "early_stopping_enabled": True, **body})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text

    job = c.fine_tuning.create(**kw, validation_file=val.id, n_evals=16, early_stopping_enabled=True,
                               early_stopping_patience=2, early_stopping_warmup_evals=1)
    done = wait_for(c, job.id)
    assert done.status == "completed"
    raw = httpx.get(f"{live_worker.url}/v1/fine-tunes/{job.id}",
                    headers={"Authorization": f"Bearer {live_worker.key}"}).json()
    assert raw["early_stopping_enabled"] is True and raw["early_stopped"] is True
    assert raw["steps_completed"] < raw["total_steps"] == 48
    assert 0 < raw["early_stopping_best_step"] < raw["steps_completed"]
    stop = [e for e in c.fine_tuning.list_events(job.id).data if "stopped early" in e.message]
    assert len(stop) == 1 and stop[0].type == "TRAINING_COMPLETE"
    final = [cp for cp in c.fine_tuning.list_checkpoints(job.id).data if cp.checkpoint_type == "Final"]
    assert final[0].step == raw["early_stopping_best_step"]
