"""TorchEngine without HTTP, on the tiny model: batched decoding gives the same tokens as one
request at a time (KV merge, left padding, position ids), base and LoRA rows share a batch, LRU
eviction of adapters, FIFO across weights, forgetting deleted files."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from tunehouse.models.tiny import build_tiny_model, random_lora_adapter
from tunehouse.serve.engine import ModelRef, TorchEngine
from tunehouse.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = ["The quick brown fox", "Hello", "What is the capital of France? The capital", "a b c d e f g h"]


@pytest.fixture(scope="module")
def models(model_cache, tmp_path_factory):
    base = build_tiny_model(model_cache / "models" / "tunehouse--tiny-llama")
    tmp = tmp_path_factory.mktemp("engine")
    adapters = [random_lora_adapter(base, tmp / f"lora{i}", seed=i) for i in range(2)]
    full = shutil.copytree(base, tmp / "full")  # stands in for a full fine-tune: other weights
    return base, adapters, full


def ref(base, adapter=None, weights="tiny"):
    return ModelRef("m", weights, base, 2048, adapter_path=adapter)


async def until(condition, tries: int = 100) -> None:
    """Poll `condition` every 20 ms until true or `tries` run out (the caller asserts the outcome)."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.02)


async def collect(engine, model, prompt_ids, params=GREEDY, delay=0.0):
    await asyncio.sleep(delay)
    tokens, text = [], ""
    async for ev in engine.submit(model, prompt_ids, params):
        assert ev.error is None, ev.error
        tokens.append(ev.token_id)
        text += ev.text
    return tokens, text


def test_batched_equals_one_at_a_time_with_base_and_lora_rows(models):
    base, adapters, _ = models
    refs = [ref(base), ref(base, adapters[0]), ref(base, adapters[1])]

    async def main():
        engine = TorchEngine(max_batch_size=16, threads=1)
        try:
            ids = [engine.tokenizer(refs[0]).encode(p) for p in PROMPTS]
            jobs = [(r, p) for r in refs for p in ids]
            alone = [await collect(engine, r, p) for r, p in jobs]
            assert engine.stats()["max_batch_size"] == 1
            # Staggered arrivals join the running batch at later steps.
            together = await asyncio.gather(*[collect(engine, r, p, delay=0.003 * i) for i, (r, p) in enumerate(jobs)])
            return alone, together, engine.stats()
        finally:
            engine.close()

    alone, together, stats = asyncio.run(main())
    assert together == alone
    assert stats["max_batch_size"] > 4 and stats["adapter_loads"] == 2
    by_model = [alone[i * len(PROMPTS)][0] for i in range(3)]
    assert by_model[0] != by_model[1] != by_model[2]  # each adapter changes the output


def test_adapters_lru_and_fifo_across_weights(models):
    base, adapters, full = models

    async def main():
        engine = TorchEngine(max_batch_size=4, max_adapters=1, max_models=1, threads=1)
        try:
            ids = engine.tokenizer(ref(base)).encode("Hello")
            first = await collect(engine, ref(base, adapters[0]), ids)
            await collect(engine, ref(base, adapters[1]), ids)
            again = await collect(engine, ref(base, adapters[0]), ids)
            mid = engine.stats()
            # Requests for two sets of weights, interleaved: all finish, each weights loaded as needed.
            mixed = [ref(base), ref(full, weights="full")] * 3
            outs = await asyncio.gather(*[collect(engine, r, ids) for r in mixed])
            return first, again, mid, outs, engine.stats()
        finally:
            engine.close()

    first, again, mid, outs, stats = asyncio.run(main())
    assert first == again
    assert mid["adapter_loads"] == 3 and mid["adapter_evictions"] == 2
    assert all(o == outs[0] for o in outs)  # same weights (copied), same greedy text
    assert stats["model_loads"] >= 2 and stats["model_evictions"] >= 1
    assert list(stats["loaded"]) in (["tiny"], ["full"])


def test_adapters_are_evicted_by_memory_budget(models):
    """A budget that holds one adapter's tensors (but not two) keeps one attached, whatever the
    count limit; the evicted one is reloaded when asked for again."""
    base, adapters, _ = models

    async def main():
        probe = TorchEngine(threads=1)
        try:
            ids = probe.tokenizer(ref(base)).encode("Hello")
            await collect(probe, ref(base, adapters[0]), ids)
            one = probe.stats()["adapter_bytes"]
        finally:
            probe.close()
        engine = TorchEngine(max_adapters=8, adapter_memory_mb=1.5 * one / 2**20, threads=1)
        try:
            for a in (adapters[0], adapters[1], adapters[0]):
                await collect(engine, ref(base, a), ids)
            return one, engine.stats()
        finally:
            engine.close()

    one, stats = asyncio.run(main())
    assert one > 0 and stats["adapter_bytes"] == one
    assert stats["adapter_loads"] == 3 and stats["adapter_evictions"] == 2


def test_forget_drops_an_adapter_whose_files_are_gone(models, tmp_path):
    base, adapters, _ = models
    doomed = shutil.copytree(adapters[0], tmp_path / "job" / "final")

    async def main():
        engine = TorchEngine(threads=1, sweep_s=0.05)
        try:
            ids = engine.tokenizer(ref(base)).encode("Hello")
            await collect(engine, ref(base, doomed), ids)
            assert str(doomed) in engine.stats()["loaded"]["tiny"]
            shutil.rmtree(tmp_path / "job")  # deleted by another process: the sweep notices
            await until(lambda: not engine.stats()["loaded"]["tiny"])
            return engine.stats()
        finally:
            engine.close()

    stats = asyncio.run(main())
    assert stats["loaded"]["tiny"] == [] and stats["adapter_evictions"] == 1


def test_forget_by_store_key_drops_weights_read_from_its_local_copy(models):
    """A deleted job is forgotten by its store folder (`jobs/<id>`): the adapter's local copy (an
    S3 cache entry names no job) is matched through the ModelRef's source; another job's stays."""
    from dataclasses import replace

    base, adapters, _ = models

    async def main():
        engine = TorchEngine(threads=1)
        try:
            ids = engine.tokenizer(ref(base)).encode("Hello")
            for i, a in enumerate(adapters[:2]):
                await collect(engine, replace(ref(base, a), source=f"jobs/ft-{i}"), ids)
            engine.forget("jobs/ft-0")
            await until(lambda: str(adapters[0]) not in engine.stats()["loaded"]["tiny"])
            return engine.stats()
        finally:
            engine.close()

    stats = asyncio.run(main())
    assert stats["loaded"]["tiny"] == [str(adapters[1])] and stats["adapter_evictions"] == 1


def test_stop_sequence_is_cut_and_never_streamed(models):
    base, _, _ = models

    async def main():
        engine = TorchEngine(threads=1)
        try:
            ids = engine.tokenizer(ref(base)).encode("The quick brown fox")
            _, full = await collect(engine, ref(base), ids)
            stop = full[4:7]
            deltas = []
            async for ev in engine.submit(ref(base), ids, SamplingParams(max_tokens=12, temperature=0, stop=(stop,))):
                deltas.append((ev.text, ev.finish_reason))
            return full, stop, deltas
        finally:
            engine.close()

    full, stop, deltas = asyncio.run(main())
    assert "".join(t for t, _ in deltas) == full[:full.index(stop)]
    assert deltas[-1][1] == "stop"


def test_serving_lora_matches_peft(models):
    """The serving-side LoRA gives PEFT's logits for one adapter, and for a mixed batch each row
    gets its own adapter (or none)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunehouse.serve import lora

    base, adapters, _ = models
    ids = torch.tensor([[1, 5, 9, 13, 17]] * 3)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        expected = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), a)(ids).logits
                    for a in adapters]
        model, routing = AutoModelForCausalLM.from_pretrained(base), lora.Routing()
        for i, a in enumerate(adapters):
            lora.load_adapter(model, routing, a, f"x{i}")
        routing.current = "x1"
        assert torch.allclose(model(ids).logits, expected[1], atol=1e-5)
        routing.current = [("x0", torch.tensor([0])), ("x1", torch.tensor([2]))]
        mixed = model(ids).logits
        assert torch.allclose(mixed[0], expected[0][0], atol=1e-5)
        assert torch.allclose(mixed[1], plain[1], atol=1e-5)
        assert torch.allclose(mixed[2], expected[1][2], atol=1e-5)
        lora.remove_adapter(model, "x1")
        routing.current = "x1"
        assert torch.allclose(model(ids).logits, plain, atol=1e-6)


def test_prompt_scores_equal_peft_log_softmax_in_mixed_batches(models):
    """Scoring (echo) gives log p(token | earlier tokens) equal to a PEFT model's log-softmax, for
    rows of different lengths and adapters scored in one forward, with the top-k alternatives."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapters, _ = models
    rows = [[1, 5, 9, 13, 17, 21, 2], [1, 7, 3], [1, 30, 31, 32, 33]]
    refs = [ref(base), ref(base, adapters[0]), ref(base, adapters[1])]

    def expected(adapter, ids):
        model = AutoModelForCausalLM.from_pretrained(base)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        return [None] + [float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1)], lp

    async def main():
        engine = TorchEngine(threads=1)
        try:
            scored = await asyncio.gather(*[engine.score(r, ids, top=3) for r, ids in zip(refs, rows)])
            return scored, engine.stats()
        finally:
            engine.close()

    scored, stats = asyncio.run(main())
    assert stats["scored"] == 3 and stats["scored_tokens"] == sum(map(len, rows))
    assert stats["score_forwards"] <= 2  # queued together: scored in one forward (two if the first ran alone)
    for r, ids, got in zip(refs, rows, scored):
        want, lp = expected(r.adapter_path, ids)
        assert got.logprobs[0] is None and len(got.logprobs) == len(ids)
        assert got.logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
        values, top_ids = lp[1].topk(3)  # token 2 is predicted at position 1
        assert [i for i, _ in got.top[2]] == top_ids.tolist()
        assert [v for _, v in got.top[2]] == pytest.approx(values.tolist(), abs=1e-4)
