"""`from_hf_model` and `hf_output_repo_name` through the together SDK on a live server: a job
that names a model folder trains those weights (not the base model's), is served from them, and
a hub the server cannot reach is refused at create with what to do instead."""

from __future__ import annotations

import httpx
import pytest
import torch
from together import Together
from transformers import AutoModelForCausalLM

from jobs_support import untar_zst, wait_for, write_chat
from tunehouse.models.tiny import build_tiny_model

TINY = "tunehouse/tiny-llama"


def _post(live, body: dict) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/fine-tunes", json=body, headers={"Authorization": f"Bearer {live.key}"},
                      timeout=60)


def test_from_hf_model_folder_trains_those_weights(live_worker, tmp_path):
    other = build_tiny_model(tmp_path / "other-tiny", seed=7)  # same architecture, other weights
    base_dir = live_worker.app.state.registry.path(TINY)
    c = Together(base_url=live_worker.url, api_key=live_worker.key, max_retries=0)
    train = c.files.upload(write_chat(tmp_path / "train.jsonl", 8))
    job = c.fine_tuning.create(training_file=train.id, model=TINY, from_hf_model=str(other), n_epochs=1,
                               learning_rate=1e-3, batch_size=4, lora=True)
    done = wait_for(c, job.id)
    assert done.status == "completed", [e.message for e in c.fine_tuning.list_events(job.id).data]
    assert c.fine_tuning.retrieve(job.id).from_hf_model == str(other)

    untar_zst(c.fine_tuning.content(ft_id=job.id, checkpoint="merged").read(), tmp_path / "m")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "merged").state_dict()
    start = AutoModelForCausalLM.from_pretrained(other).state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    emb = "model.embed_tokens.weight"  # not a LoRA target: equal to the weights it started from
    assert torch.equal(merged[emb], start[emb]) and not torch.allclose(merged[emb], base[emb])
    q = "model.layers.0.self_attn.q_proj.weight"  # a LoRA target: moved away from the start
    assert (merged[q] - start[q]).abs().max() > 0

    # Served from those weights: greedy replies equal the merged model's, not base + adapter.
    reply = c.chat.completions.create(model=done.output_name, messages=[{"role": "user", "content": "Say red"}],
                                      max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None


def test_from_hf_model_refusals(live, tmp_path, monkeypatch):
    c = Together(base_url=live.url, api_key=live.key, max_retries=0)
    train = c.files.upload(write_chat(tmp_path / "train.jsonl", 4)).id
    # A hub id while the hub is unreachable (a closed loopback port stands for "no network").
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "ENDPOINT", "http://127.0.0.1:9")
    r = _post(live, {"model": TINY, "training_file": train, "from_hf_model": "someone/some-model"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "from_hf_model" and "cannot reach the Hugging Face hub" in err["message"]
    assert "pass the folder" in err["message"]
    # A folder that is not a model.
    (tmp_path / "empty").mkdir()
    r = _post(live, {"model": TINY, "training_file": train, "from_hf_model": str(tmp_path / "empty")})
    assert r.status_code == 400 and "without config.json" in r.json()["error"]["message"]
    # With from_checkpoint: one source of weights only.
    r = _post(live, {"training_file": train, "from_checkpoint": "ft-x", "from_hf_model": str(tmp_path)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "from_checkpoint"


@pytest.mark.parametrize("extra, words", [
    ({}, "needs hf_api_token"),
    ({"hf_api_token": "hf_x"}, "cannot reach the Hugging Face hub"),
])
def test_hf_output_repo_refused_when_it_cannot_be_pushed(live, tmp_path, monkeypatch, extra, words):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "ENDPOINT", "http://127.0.0.1:9")
    c = Together(base_url=live.url, api_key=live.key, max_retries=0)
    train = c.files.upload(write_chat(tmp_path / "train.jsonl", 4)).id
    r = _post(live, {"model": TINY, "training_file": train, "hf_output_repo_name": "me/out", **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "hf_output_repo_name" and words in err["message"], err
