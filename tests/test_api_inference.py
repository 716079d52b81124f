"""Inference over a live server: the openai SDK, the together 3.x SDK and the together 1.x SDK call
chat and text completions, streamed and not, on the tiny base model and on ONE tiny LoRA fine-tune
trained once for the module; batching, disconnects, errors, `/v1/models`, and the fine-tune served
merged (`serve_lora=merged`) by a second server over the same home."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import together
from together import Together

from conftest import _serve
from jobs_support import wait_for, write_chat
from test_api_files_v1_and_clis import run_v1
from tunehouse.settings import Settings
from tunehouse.store.tables import Job

TINY = "tunehouse/tiny-llama"
HELLO = [{"role": "user", "content": "Say red then blue."}]


@pytest.fixture(scope="module", params=["torch", "llama.cpp"])
def server(request, tmp_path_factory, model_cache):
    """The contract suite: every test here runs against each inference backend, the torch engine
    and llama.cpp's llama-server (`serve/llama_engine.py`, which leaves scoring to torch).

    On the local store only: serving a fine-tuned model out of PostgreSQL + S3 (its adapter
    fetched into this server's cache) is test_many_machines.py's (each job's output answered by
    a server with a home of its own); deleting a job's objects from S3 is test_api_fine_tunes.py's.
    Decoding itself never reads the store."""
    home = tmp_path_factory.mktemp("inference") / "home"
    binary = request.getfixturevalue("llama_server") if request.param == "llama.cpp" else None
    backend = dict(serve_backend=request.param, llama_server=binary)
    live, bg = _serve(Settings(home=home, model_cache=model_cache, embedded_worker=True, serve_max_batch_size=16,
                               **backend))
    live.backend = request.param
    c = Together(base_url=live.url, api_key=live.key, max_retries=0)
    f = c.files.upload(write_chat(tmp_path_factory.mktemp("data") / "train.jsonl", 16))
    job = c.fine_tuning.create(training_file=f.id, model=TINY, lora=True, suffix="inf", n_epochs=3,
                               batch_size=4, learning_rate=1e-2)
    done = wait_for(c, job.id)
    assert done.status == "completed"
    live.tuned = done.model_output_name
    live.job_id = job.id
    yield live
    bg.stop()


def oai(live, key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key or live.key, max_retries=0)


def tg(live) -> Together:
    return Together(base_url=live.url, api_key=live.key, max_retries=0)


def engine(live):
    return live.app.state.engine()


def test_openai_chat_base_vs_fine_tuned_greedy(server):
    c = oai(server)
    outs = {}
    for model in (TINY, server.tuned):
        r = c.chat.completions.create(model=model, messages=HELLO, max_tokens=12, temperature=0)
        text = r.choices[0].message.content
        assert text and r.object == "chat.completion" and r.model == model
        assert r.choices[0].finish_reason in ("eos", "length")
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        streamed = c.chat.completions.create(model=model, messages=HELLO, max_tokens=12, temperature=0, stream=True)
        chunks = list(streamed)
        assert all(ch.object == "chat.completion.chunk" for ch in chunks)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        outs[model] = text
    assert outs[TINY] != outs[server.tuned]
    # The adapter learned the training answers ("red blue" for this prompt).
    assert "red" in outs[server.tuned]


def test_openai_completions_max_tokens_stop_seed_n(server):
    c = oai(server)
    r = c.completions.create(model=TINY, prompt="The quick brown fox", max_tokens=7, temperature=0, n=2)
    assert [ch.finish_reason for ch in r.choices] == ["length", "length"]
    assert r.usage.completion_tokens == 14 and r.usage.prompt_tokens == len(
        engine(server).tokenizer(_ref(server, TINY)).encode("The quick brown fox"))
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices agree

    sampled = [c.completions.create(model=TINY, prompt="Hello", max_tokens=16, temperature=1.0, seed=s, n=2)
               for s in (7, 7, 8)]
    texts = [[ch.text for ch in r.choices] for r in sampled]
    assert texts[0] == texts[1] and texts[0] != texts[2] and texts[0][0] != texts[0][1]

    full = c.completions.create(model=TINY, prompt="The quick brown fox", max_tokens=12, temperature=0).choices[0]
    stop = full.text[3:6]
    cut = c.completions.create(model=TINY, prompt="The quick brown fox", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.text[:full.text.index(stop)]
    streamed = list(c.completions.create(model=TINY, prompt="The quick brown fox", max_tokens=12, temperature=0,
                                         stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text

    # Each knob acts: a filter that keeps one token makes sampling greedy, a penalty breaks the
    # greedy output's repeats (the tiny model's greedy text repeats itself).
    def text(max_tokens=16, **kw):
        extra = {k: kw.pop(k) for k in ("top_k", "min_p", "repetition_penalty") if k in kw}
        return c.completions.create(model=TINY, prompt="Hello", max_tokens=max_tokens, extra_body=extra,
                                    **kw).choices[0].text

    greedy, sampled = text(temperature=0), text(temperature=1.0, seed=3)
    assert sampled != greedy
    for one_token in ({"top_k": 1}, {"top_p": 1e-9}, {"min_p": 1.0}):
        assert text(temperature=1.0, seed=3, **one_token) == greedy, one_token
    longer = text(max_tokens=48, temperature=0)
    ids = engine(server).tokenizer(_ref(server, TINY)).encode(longer, add_special_tokens=False)
    assert len(set(ids)) < len(ids), "precondition: the greedy text repeats a token"
    for penalty in ({"repetition_penalty": 1.5}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        assert text(max_tokens=48, temperature=0, **penalty) != longer, penalty

    lp = c.completions.create(model=TINY, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 3 and all(len(t) == 2 for t in lp.choices[0].logprobs.top_logprobs)
    chat_lp = c.chat.completions.create(model=TINY, messages=HELLO, max_tokens=3, logprobs=True, top_logprobs=2)
    assert len(chat_lp.choices[0].logprobs.content) == 3
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in chat_lp.choices[0].logprobs.content)


def test_together_v3_chat_and_completions(server):
    c = tg(server)
    for model in (TINY, server.tuned):
        r = c.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens >= 1
        chunks = list(c.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
        t = c.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
        assert t.choices[0].text and t.choices[0].finish_reason in ("length", "eos")
        parts = list(c.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, stream=True))
        assert "".join(p.choices[0].text for p in parts if p.choices) == t.choices[0].text


def test_together_v1_sdk_chat_completions_models(server, v1_python):
    res = run_v1(v1_python, server, f"""
        c = Together()
        out = {{}}
        for model in ({TINY!r}, {server.tuned!r}):
            r = c.chat.completions.create(model=model, messages={HELLO!r}, max_tokens=8, temperature=0)
            s = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model=model, messages={HELLO!r}, max_tokens=8, temperature=0, stream=True))
            t = c.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
            ts = "".join(ch.choices[0].delta.content or "" for ch in c.completions.create(
                model=model, prompt="Hello", max_tokens=5, temperature=0, stream=True, logprobs=1))
            out[model] = dict(chat=r.choices[0].message.content, stream=s, finish=r.choices[0].finish_reason,
                              usage=r.usage.completion_tokens, text=t.choices[0].text, text_stream=ts)
        out["models"] = [m.id for m in c.models.list()]
        print(json.dumps(out))
    """)
    for model in (TINY, server.tuned):
        assert res[model]["chat"] and res[model]["chat"] == res[model]["stream"]
        assert res[model]["text"] and res[model]["text"] == res[model]["text_stream"]
    assert res[TINY]["chat"] != res[server.tuned]["chat"]
    assert TINY in res["models"] and server.tuned in res["models"]


def test_models_list_both_shapes(server):
    ids = [m.id for m in oai(server).models.list()]
    assert TINY in ids and server.tuned in ids
    assert server.tuned not in [m.id for m in oai(server, server.other_key).models.list()]
    v1_shape = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {server.key}",
                                                             "User-Agent": "Together/v1 PythonBindings/1.6.0"}).json()
    assert isinstance(v1_shape, list) and all("pricing" in m and m["object"] == "model" for m in v1_shape)


def test_fifty_concurrent_requests_are_batched(server):
    before = engine(server).stats()

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     headers={"Authorization": f"Bearer {server.key}"}) as http:
            async def one(i):
                model = TINY if i % 2 else server.tuned  # base and adapter rows mix in one batch
                r = await http.post("/v1/chat/completions", json={"model": model, "max_tokens": 8, "temperature": 0,
                                                                  "messages": [{"role": "user", "content": f"hi {i}"}]})
                return r.status_code, r.json()
            return await asyncio.gather(*[one(i) for i in range(50)])

    results = asyncio.run(main())
    assert [s for s, _ in results] == [200] * 50
    assert all(b["choices"][0]["message"]["content"] for _, b in results)
    stats = engine(server).stats()
    assert stats["requests"] - before["requests"] == 50
    assert stats["max_batch_size"] >= 8, stats  # many sequences shared each forward


def test_disconnected_stream_stops_generating(server):
    eng = engine(server)
    before = eng.stats()["cancelled"]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", headers={"Authorization": f"Bearer {server.key}"},
                         json={"model": TINY, "prompt": "The quick brown fox", "max_tokens": 1900,
                               "temperature": 1.0, "seed": 1, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert all(line.startswith("data: {") or not line for line in got)
    deadline = time.monotonic() + 10
    while eng.stats()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = eng.stats()
    assert stats["cancelled"] == before + 1 and stats["running"] == 0


def test_errors_use_the_error_shape(server):
    c = oai(server)
    for model, key in (("acme/nope-7b", server.key), (server.tuned, server.other_key)):
        with pytest.raises(openai.NotFoundError) as exc:
            oai(server, key).chat.completions.create(model=model, messages=HELLO)
        err = exc.value.body
        assert f"The model {model!r} does not exist" in err["message"] and "GET /v1/models" in err["message"]
        assert err["param"] == "model" and err["code"] == "model_not_found"

    with server.app.state.home.db.session() as s:
        s.add(Job(id="ft-running", owner="alice", status="running", model=TINY, training_file="file-x",
                  config={"train": {"lora": True}}, model_output_name="alice/tiny-llama-running"))
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model="alice/tiny-llama-running", prompt="Hi")
    assert exc.value.body["message"] == ("The model 'alice/tiny-llama-running' is not ready: its fine-tuning job "
                                         "ft-running is running. It can be used once the job has completed.")

    r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {server.key}"},
                   json={"model": TINY, "prompt": "hello " * 10, "max_tokens": 2045})
    assert r.status_code == 400
    n = len(engine(server).tokenizer(_ref(server, TINY)).encode("hello " * 10))
    assert r.json()["error"]["message"] == (
        f"The prompt is {n} tokens and max_tokens is 2045: together {n + 2045}, more than the model's context "
        "length of 2048 tokens. Shorten the prompt or lower max_tokens.")
    with pytest.raises(together.BadRequestError):
        tg(server).chat.completions.create(model=TINY, messages=HELLO, temperature=5)


def test_deleted_job_model_is_evicted(server, tmp_path):
    c = tg(server)
    f = c.files.upload(write_chat(tmp_path / "t.jsonl", 4))
    job = wait_for(c, c.fine_tuning.create(training_file=f.id, model=TINY, lora=True, n_epochs=1, batch_size=4).id)
    assert c.completions.create(model=job.model_output_name, prompt="Hi", max_tokens=2).choices[0].text is not None
    loaded = lambda: [a for adapters in engine(server).stats()["loaded"].values() for a in adapters]  # noqa: E731
    adapter = str(_ref(server, job.model_output_name).adapter_path)  # this server's copy from the store
    assert adapter in loaded()
    c.fine_tuning.delete(job.id)
    deadline = time.monotonic() + 5
    while adapter in loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert adapter not in loaded()
    assert server.app.state.home.blobs.list(f"jobs/{job.id}") == [], "no object of the job is left in the store"
    with pytest.raises(together.NotFoundError):
        c.completions.create(model=job.model_output_name, prompt="Hi", max_tokens=2)


def test_merged_serving_answers_as_the_adapter_does(server):
    """`serve_lora=merged` (a second server over the same home): the fine-tune runs from its merged
    weights as a model of its own, no base, no adapter, and its greedy answer is the adapter's (f32
    weights on both servers, so they agree token for token)."""
    live, bg = _serve(server.settings.model_copy(update={"serve_lora": "merged", "embedded_worker": False}))
    try:
        kw = dict(model=server.tuned, messages=HELLO, max_tokens=12, temperature=0)
        on_base = oai(server).chat.completions.create(**kw).choices[0].message.content
        merged = oai(live).chat.completions.create(**kw).choices[0].message.content
        assert merged == on_base and "red" in merged
        shared, own = _ref(server, server.tuned), _ref(live, server.tuned)
        assert shared.weights == TINY and shared.adapter_path is not None
        assert own.weights == server.tuned and own.adapter_path is None and own.weights_path.name == "merged"
        stats = engine(live).stats()
        assert stats["loaded"] == {server.tuned: []}
        if server.backend == "llama.cpp":
            assert stats["server_starts"] == 1 and stats["torch_requests"] == 0
    finally:
        bg.stop()


def _ref(live, name):
    from tunehouse.serve.models import resolve_for

    return resolve_for(live.app.state.home, live.app.state.registry, "alice", name)



def test_chat_cli_streams_and_keeps_the_conversation(server):
    """Two lines piped in: two replies, the second one answered with the first exchange as history
    (greedy, so the expected replies can be computed with the openai SDK)."""
    import subprocess
    import sys

    c, first, second = oai(server), "Say red then blue.", "Say cat then dog."
    kw = dict(model=TINY, max_tokens=8, temperature=0)
    system = [{"role": "system", "content": "Be brief."}]
    r1 = c.chat.completions.create(messages=system + [{"role": "user", "content": first}], **kw).choices[0].message.content
    history = system + [{"role": "user", "content": first}, {"role": "assistant", "content": r1},
                        {"role": "user", "content": second}]
    r2 = c.chat.completions.create(messages=history, **kw).choices[0].message.content
    alone = c.chat.completions.create(messages=system + [{"role": "user", "content": second}], **kw)
    assert alone.choices[0].message.content != r2  # so matching r2 proves the history was sent

    out = subprocess.run([sys.executable, "-m", "tunehouse", "chat", TINY, "--base-url", server.url,
                          "--api-key", server.key, "--system", "Be brief.", "--max-tokens", "8",
                          "--temperature", "0"], input=f"{first}\n{second}\n/exit\n", capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{r1}\n{r2}\n"

    bad = subprocess.run([sys.executable, "-m", "tunehouse", "chat", "acme/nope", "--base-url", server.url,
                          "--api-key", server.key], input="hi\n", capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "does not exist" in bad.stderr


def test_echo_returns_prompt_logprobs_and_eval_reports_validation_loss(server, tmp_path):
    """`echo: true, logprobs: 1, max_tokens: 0` (Together's prompt log-probs): the token pieces
    spell the rendered prompt exactly, each log-prob equals PEFT's log-softmax on the same ids, and
    `compare` turns them into a validation loss that is lower for the fine-tune on its own data."""
    import math

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunehouse.evaluate.compare import compare

    conv = [{"role": "user", "content": "Say red then blue."}, {"role": "assistant", "content": "red blue"}]
    r = tg(server).chat.completions.create(model=server.tuned, messages=conv, max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 0
    part = r.prompt[0]
    tokens, values = part.logprobs.tokens, part.logprobs.token_logprobs
    assert "".join(tokens) == part.text and "red blue" in part.text and values[0] is None

    ref = _ref(server, server.tuned)
    ids = AutoTokenizer.from_pretrained(ref.weights_path).encode(part.text, add_special_tokens=False)
    assert len(ids) == len(values) == r.usage.prompt_tokens
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ref.weights_path), ref.adapter_path)
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert values[1:] == pytest.approx([float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1)], abs=1e-4)

    # Streamed, the prompt rides on the first chunk; text completions echo and still generate.
    chunks = list(tg(server).chat.completions.create(model=TINY, messages=conv, max_tokens=0, echo=True,
                                                     logprobs=1, stream=True))
    assert chunks[0].prompt[0]["text"] == part.text  # not in the chunk type: an extra field
    assert chunks[-1].choices[0].finish_reason == "length"
    done = oai(server).completions.create(model=TINY, prompt="red blue green", max_tokens=3, temperature=0,
                                          echo=True, logprobs=1)
    prompt = done.model_extra["prompt"][0]
    assert prompt["text"] == "red blue green" and "".join(prompt["logprobs"]["tokens"]) == "red blue green"
    assert done.choices[0].text and done.usage.completion_tokens == 3

    with pytest.raises(openai.BadRequestError, match="echo"):
        oai(server).chat.completions.create(model=TINY, messages=conv, max_tokens=0)

    held_out = write_chat(tmp_path / "valid.jsonl", 6)
    result = compare([TINY, server.tuned], held_out, base_url=server.url, api_key=server.key, max_tokens=4)
    base, tuned = result["models"]
    assert tuned["valid_loss"] < base["valid_loss"]
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["valid_loss"]))
