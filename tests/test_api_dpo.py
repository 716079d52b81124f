"""Preference fine-tuning through the API: the together 3.x SDK and CLI run DPO jobs (and an
SFT → DPO chain) on the tiny model to completed, with the DPO metrics on /metrics and the events;
create-time rules for the DPO fields and the file's format."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import together
from together import Together

from conftest import _serve, bin_path, sdk_env
from jobs_support import wait_for, write_chat
from tunehouse.settings import Settings

TINY = "tunehouse/tiny-llama"
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def write_pairs(path, n: int):
    with open(path, "w") as fh:
        for i in range(n):
            good, bad = WORDS[i % 10], WORDS[(i + 3) % 10]
            fh.write(json.dumps({"input": {"messages": [{"role": "user", "content": f"Say {good}."}]},
                                 "preferred_output": [{"role": "assistant", "content": good}],
                                 "non_preferred_output": [{"role": "assistant", "content": bad}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_cache):
    """On the local store only: what DPO jobs do on PostgreSQL + S3 that these would add (a parent
    checkpoint read from the store, then continued or merged) test_api_fine_tunes.py's end-to-end
    job does on both stores; the recipe never touches the store itself."""
    live, bg = _serve(Settings(home=tmp_path_factory.mktemp("dpo") / "home", model_cache=model_cache,
                               embedded_worker=True))
    yield live
    bg.stop()


def test_sft_then_dpo_chain_with_metrics(server, tmp_path):
    c = Together(base_url=server.url, api_key=server.key, max_retries=0)
    chat = c.files.upload(write_chat(tmp_path / "sft.jsonl", 16))
    pairs = c.files.upload(write_pairs(tmp_path / "pairs.jsonl", 16), check=False)
    assert pairs.processing_status == "COMPLETED"

    sft = c.fine_tuning.create(training_file=chat.id, model=TINY, lora=True, n_epochs=1, learning_rate=1e-3,
                               batch_size=4)
    assert wait_for(c, sft.id).status == "completed"
    dpo = c.fine_tuning.create(training_file=pairs.id, validation_file=pairs.id, n_evals=2, from_checkpoint=sft.id,
                               training_method="dpo", dpo_beta=0.2, rpo_alpha=0.5, n_epochs=2, learning_rate=1e-3,
                               batch_size=4)
    job = c.fine_tuning.retrieve(dpo.id)
    assert job.training_method.method == "dpo" and job.training_method.dpo_beta == 0.2
    done = wait_for(c, dpo.id)
    assert done.status == "completed", [e.message for e in c.fine_tuning.list_events(dpo.id).data]
    rows = c.fine_tuning.list_metrics(dpo.id).metrics
    keys = set().union(*rows)
    for k in ("train_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected", "kl/estimate", "kl", "valid/rewards/accuracies"):
        assert k in keys, sorted(keys)
    train_steps = [r["train/global_step"] for r in rows if "train_loss" in r]
    assert train_steps == list(range(1, done.total_steps + 1))  # each optimizer step once, in order
    messages = [e.message for e in c.fine_tuning.list_events(dpo.id).data]
    assert "Continuing the LoRA adapter" in " ".join(messages) and "Job finished" in messages


def test_dpo_create_rules(server, tmp_path):
    c = Together(base_url=server.url, api_key=server.key, max_retries=0)
    chat = c.files.upload(write_chat(tmp_path / "c.jsonl", 4))
    pairs = c.files.upload(write_pairs(tmp_path / "p.jsonl", 4), check=False)
    with pytest.raises(together.BadRequestError) as exc:
        c.fine_tuning.create(training_file=chat.id, model=TINY, training_method="dpo")
    assert "preference dataset" in exc.value.body["error"]["message"]
    with pytest.raises(together.BadRequestError) as exc:
        c.fine_tuning.create(training_file=pairs.id, model=TINY)
    assert "training_method dpo" in exc.value.body["error"]["message"]
    r = httpx.post(f"{server.url}/v1/fine-tunes", headers={"Authorization": f"Bearer {server.key}"},
                   json={"training_file": pairs.id, "model": TINY, "training_method": {
                       "method": "dpo", "dpo_beta": -1, "rpo_alpha": -2, "simpo_gamma": -3}})
    msg = r.json()["error"]["message"]  # the SDK checks these too; other clients do not
    assert r.status_code == 400 and "dpo_beta" in msg and "rpo_alpha" in msg and "simpo_gamma" in msg
    r = httpx.post(f"{server.url}/v1/fine-tunes", headers={"Authorization": f"Bearer {server.key}"},
                   json={"training_file": pairs.id, "model": TINY, "train_on_inputs": True,
                         "training_method": {"method": "dpo"}})  # DPO scores completions only: refused, not ignored
    assert r.status_code == 400 and r.json()["error"]["param"] == "train_on_inputs"
    assert "applies to training_method sft only" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/fine-tunes", headers={"Authorization": f"Bearer {server.key}"},
                   json={"training_file": pairs.id, "model": TINY, "training_method": {"method": "dpo", "dpo_beta": 2.0}})
    assert r.status_code == 200, r.text
    c.fine_tuning.cancel(r.json()["id"])
    warnings = [e.message for e in c.fine_tuning.list_events(r.json()["id"]).data if e.type == "WARNING"]
    assert any("dpo_beta 2.0 is outside the usual 0.05-0.9" in w for w in warnings), warnings
    r = httpx.post(f"{server.url}/v1/fine-tunes", headers={"Authorization": f"Bearer {server.key}"},
                   json={"training_file": pairs.id, "model": TINY, "learning_rate": 1e-3,
                         "training_method": {"method": "dpo", "dpo_beta": 2.0, "simpo_gamma": 0.5}})
    assert r.status_code == 200, r.text
    job = c.fine_tuning.retrieve(r.json()["id"])
    assert not [e for e in c.fine_tuning.list_events(job.id).data if e.type == "WARNING"]  # β ≈ 2 is SimPO's usual
    got = job.training_method
    assert got.simpo_gamma == 0.5 and got.dpo_reference_free is True  # SimPO forces reference-free
    assert wait_for(c, job.id).status == "completed"


def test_v3_cli_dpo_job(server, tmp_path):
    data = write_pairs(tmp_path / "cli_pairs.jsonl", 8)
    out = subprocess.run([bin_path("together"), "ft", "create", "--training-file", str(data), "--model", TINY,
                          "--lora", "-y", "--training-method", "dpo", "--dpo-beta", "0.2",
                          "--dpo-normalize-logratios-by-length", "--learning-rate", "0.001"],
                         capture_output=True, text=True, env=sdk_env(server), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    job_id = next(w.strip(".,:'\"") for w in out.stdout.split() if w.strip(".,:'\"").startswith("ft-"))
    c = Together(base_url=server.url, api_key=server.key, max_retries=0)
    done = wait_for(c, job_id)
    assert done.status == "completed" and done.training_method.dpo_normalize_logratios_by_length is True
