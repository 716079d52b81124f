"""LlamaCppEngine without HTTP in front, on the tiny model: llama-server gives the torch engine's
greedy tokens, base and two adapters; a new adapter moves new requests to a new server while the
old one finishes its stream; forgetting, a crash, models llama.cpp cannot load, and requests it
would answer differently (penalties, grammars) all end up where they should. The API contract
(SDKs, streaming, stop, n, logprobs, cancel) is tests/test_api_inference.py, run on both engines."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from test_engine import collect  # (tokens, text) of one request, no error events
from tunehouse.models.tiny import build_tiny_model, random_lora_adapter
from tunehouse.serve.engine import ModelRef, TorchEngine
from tunehouse.serve.llama_engine import LlamaCppEngine, _request, gguf_type_for
from tunehouse.serve.weights import eos_ids
from tunehouse.serve.sampling import SamplingParams

PROMPTS = ["The quick brown fox", "Hello", "a b c d e f g h"]


@pytest.fixture(scope="module")
def models(model_cache, tmp_path_factory):
    base = build_tiny_model(model_cache / "models" / "tunehouse--tiny-llama")
    tmp = tmp_path_factory.mktemp("llama-engine")
    adapters = [random_lora_adapter(base, tmp / f"lora{i}", seed=i) for i in range(3)]
    return base, adapters, tmp


def ref(base, adapter=None, weights="tiny"):
    return ModelRef("m", weights, base, 2048, adapter_path=adapter)


def engines(binary, cache, **kw):
    """The llama.cpp engine in f32 (an f32 GGUF and KV cache: the torch engine's precision) and the
    torch engine it wraps."""
    torch_engine = TorchEngine(max_batch_size=16, threads=1, dtype="float32")
    return LlamaCppEngine(binary, cache, torch_engine, slots=8, threads=1, dtype="float32", **kw), torch_engine


def test_request_body_maps_tunehouse_sampling_and_turns_llama_cpp_extras_off():
    p = SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, top_k=4, min_p=0.1, repetition_penalty=1.3,
                       logprobs=0, logit_bias=((7, -100.0),))
    body = _request([1, 2, 3], p, 42, [{"id": 0, "scale": 1.0}])
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 5 and body["seed"] == 42
    assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"]) == (0.7, 0.9, 4, 0.1)
    # HF's repetition penalty covers prompt and output: the window is all of both.
    assert body["repeat_penalty"] == 1.3 and body["repeat_last_n"] == 8
    assert body["samplers"] == ["penalties", "temperature", "top_k", "top_p", "min_p"]  # tunehouse's order
    # Only the samplers that act; greedy is top-k 1 (no softmax over the vocabulary per token).
    assert _request([1], SamplingParams(temperature=0.5, top_p=0.9), None, [])["samplers"] == ["temperature", "top_p"]
    greedy = _request([1], SamplingParams(temperature=0), None, [])
    assert greedy["samplers"] == ["top_k"] and greedy["top_k"] == 1
    assert (body["typical_p"], body["dry_multiplier"], body["xtc_probability"], body["mirostat"]) == (1.0, 0, 0, 0)
    assert body["n_probs"] == 1 and body["logit_bias"] == [[7, -100.0]] and body["stream"] and body["return_tokens"]
    assert "seed" not in _request([1], SamplingParams(), None, []) and "n_probs" not in _request([1], SamplingParams(), None, [])


def test_gguf_type_and_eos_ids(models, tmp_path):
    assert [gguf_type_for(d) for d in ("float32", "bfloat16", "float16")] == ["f32", "bf16", "f16"]
    assert gguf_type_for("auto") in ("bf16", "f16")
    from transformers import AutoTokenizer

    base = models[0]
    tok = AutoTokenizer.from_pretrained(base)
    assert eos_ids(base, tok) == {tok.eos_token_id}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    assert eos_ids(tmp_path, tok) == {5, 6, tok.eos_token_id}


def test_greedy_tokens_equal_the_torch_engines_for_base_and_adapters(models, llama_server, tmp_path):
    base, adapters, _ = models
    refs = [ref(base), ref(base, adapters[0]), ref(base, adapters[1])]

    async def main():
        llama, torch_engine = engines(llama_server, tmp_path)
        try:
            ids = [torch_engine.tokenizer(refs[0]).encode(p) for p in PROMPTS]
            jobs = [(r, p) for r in refs for p in ids]
            on_torch = [await collect(torch_engine, r, p) for r, p in jobs]
            alone = [await collect(llama, r, p) for r, p in jobs]
            together = await asyncio.gather(*[collect(llama, r, p) for r, p in jobs])  # all in flight at once
            return on_torch, alone, together, llama.stats()
        finally:
            llama.close()

    on_torch, alone, together, stats = asyncio.run(main())
    assert alone == on_torch and together == on_torch
    assert len({tuple(t) for t, _ in alone}) > 3  # the adapters change the output
    # One start for the base, one per new adapter (the last server holds both); then all nine
    # streams shared the one server.
    assert stats["server_starts"] == 3 and stats["loaded"]["tiny"] == [str(a) for a in adapters[:2]], stats
    assert stats["max_batch_size"] >= 6 and stats["torch_requests"] == 0, stats


def test_a_new_adapter_moves_new_requests_while_the_old_server_finishes(models, llama_server, tmp_path):
    """A stream in flight (held open here by taking a slot the way a request does) keeps the old
    server alive after a new adapter moved new requests to a new one; it stops when that stream ends."""
    base, adapters, _ = models

    async def main():
        llama, torch_engine = engines(llama_server, tmp_path, max_adapters=2)
        try:
            ids = torch_engine.tokenizer(ref(base)).encode("Hello")
            alone = await collect(llama, ref(base, adapters[1]), ids)
            first, _ = await asyncio.to_thread(llama._acquire, ref(base))  # a stream in flight on it
            await collect(llama, ref(base, adapters[0]), ids)  # a new server: adapters 1 and 0
            second = llama._servers["tiny"]
            old_alive_meanwhile = first.proc.alive
            llama._release(first)  # the stream ends
            await asyncio.sleep(0.5)
            with_two = await collect(llama, ref(base, adapters[1]), ids)
            await collect(llama, ref(base, adapters[2]), ids)  # max_adapters=2: 0 is the least recent
            return first, second, old_alive_meanwhile, alone, with_two, llama._servers["tiny"], llama.stats()
        finally:
            llama.close()

    first, second, old_alive_meanwhile, alone, with_two, third, stats = asyncio.run(main())
    assert second is not first and old_alive_meanwhile and not first.proc.alive
    assert second.adapters == [str(adapters[1]), str(adapters[0])]
    assert with_two == alone  # adapter 1 gives the same tokens on the server that also holds 0
    assert third.adapters == [str(adapters[1]), str(adapters[2])]
    assert stats["loaded"]["tiny"] == third.adapters and stats["server_starts"] == 3


def test_forget_and_a_crashed_server(models, llama_server, tmp_path):
    base, adapters, _ = models

    async def main():
        llama, torch_engine = engines(llama_server, tmp_path)
        try:
            ids = torch_engine.tokenizer(ref(base)).encode("Hello")
            want = await collect(llama, ref(base, adapters[0]), ids)
            srv = llama._servers["tiny"]
            srv.proc.proc.send_signal(signal.SIGKILL)
            srv.proc.proc.wait()
            after_crash = await collect(llama, ref(base, adapters[0]), ids)  # started again
            llama.forget(str(adapters[0]))
            gone = llama.stats()["loaded"]
            return want, after_crash, gone, llama.stats()
        finally:
            llama.close()

    want, after_crash, gone, stats = asyncio.run(main())
    assert after_crash == want and stats["server_starts"] == 2
    assert gone == {}


def test_what_llama_cpp_would_answer_differently_runs_on_torch(models, llama_server, tmp_path):
    """Presence/frequency penalties (llama.cpp counts prompt tokens too), grammars, and weights the
    GGUF exporter refuses (here a GPT-2) decode on the torch engine, with its exact output."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    base, _, _ = models
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=768, n_positions=128, n_embd=32, n_layer=2, n_head=2)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(base).save_pretrained(gpt2)
    penalised = SamplingParams(max_tokens=12, temperature=0, presence_penalty=2.0)

    async def main():
        llama, torch_engine = engines(llama_server, tmp_path / "cache")
        try:
            ids = torch_engine.tokenizer(ref(base)).encode("Hello")
            got = [await collect(llama, ref(base), ids, penalised),
                   await collect(llama, ModelRef("g", "gpt2", gpt2, 128), ids)]
            want = [await collect(torch_engine, ref(base), ids, penalised),
                    await collect(torch_engine, ModelRef("g", "gpt2", gpt2, 128), ids)]
            return got, want, llama.stats()
        finally:
            llama.close()

    got, want, stats = asyncio.run(main())
    assert got == want
    assert stats["server_starts"] == 0 and stats["torch_requests"] == 1  # the GPT-2 is found out at export


def test_tokens_ending_inside_a_character_are_streamed_too(models, llama_server, tmp_path):
    """tunehouse's patch to llama-server: a token that ends inside a UTF-8 character still arrives
    (with its id), so every token is counted and the text is the tokenizer's decode of all of them."""
    base, _, _ = models

    async def main():
        llama, torch_engine = engines(llama_server, tmp_path)
        try:
            tok = torch_engine.tokenizer(ref(base))
            ids = tok.encode("é ü ö ß")
            outs = await asyncio.gather(*[collect(llama, ref(base), ids, SamplingParams(
                max_tokens=64, temperature=1.5, seed=s, ignore_eos=True)) for s in range(8)])
            return tok, outs
        finally:
            llama.close()

    tok, outs = asyncio.run(main())
    split = 0
    for tokens, text in outs:
        assert len(tokens) == 64 and text == tok.decode(tokens, skip_special_tokens=True)
        split += any("\ufffd" in tok.decode([t]) for t in tokens)
    assert split, "precondition: some sampled token ends inside a character"


def test_requests_that_would_overfill_the_kv_cache_wait_their_turn(models, llama_server, tmp_path):
    """llama-server fails every running request when its shared KV cache fills up; the engine admits
    a stream only while prompt + max_tokens of all admitted ones fit (here 8 × 700 tokens against
    a 2048-token cache), so all eight finish, two at a time at most."""
    base, _, _ = models

    async def main():
        llama, torch_engine = engines(llama_server, tmp_path, kv_tokens=256)  # the context length wins: 2048
        try:
            ids = (torch_engine.tokenizer(ref(base)).encode("hello world " * 200))[:300]
            srv_cells = []

            async def one(seed):
                n = 0
                async for ev in llama.submit(ref(base), ids, SamplingParams(max_tokens=400, temperature=1.0, seed=seed,
                                                                             ignore_eos=True)):
                    assert ev.error is None, ev.error
                    n += 1
                    srv_cells.append(llama._servers["tiny"].reserved)
                return n

            return await asyncio.gather(*[one(s) for s in range(8)]), srv_cells, llama._servers["tiny"].capacity
        finally:
            llama.close()

    counts, cells, capacity = asyncio.run(main())
    assert counts == [400] * 8 and capacity == 2048
    assert max(cells) <= capacity and max(cells) >= 2 * 700  # several at once, never more than fits
