"""The lean llama decoder (serve/decoder.py) against the transformers forward on the tiny model:
packed prefill and slot decoding give the same logits as each sequence run alone, with base and
LoRA rows mixed, rows leaving, and the cache growing; the engine gives the same tokens on either
path; models the decoder does not run (GPT-2 here) decode through the transformers path."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tunehouse.models.tiny import build_tiny_model, random_lora_adapter
from tunehouse.serve import decoder as decoders
from tunehouse.serve.engine import ModelRef, TorchEngine
from tunehouse.serve.sampling import SamplingParams
from tunehouse.serve.weights import LoadedWeights


@pytest.fixture(scope="module")
def tiny(model_cache, tmp_path_factory):
    base = build_tiny_model(model_cache / "models" / "tunehouse--tiny-llama")
    tmp = tmp_path_factory.mktemp("decoder")
    return base, [random_lora_adapter(base, tmp / f"lora{i}", seed=i) for i in range(2)]


def alone(loaded: LoadedWeights, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """Next-token logits of `ids` through the transformers forward, one sequence, no cache."""
    with torch.no_grad():
        return loaded.forward([adapter], input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.25)])
def test_prefill_and_decode_match_the_transformers_forward(tiny, dtype, atol):
    base, adapters = tiny
    loaded = LoadedWeights(base, dtype, "cpu")
    for a in adapters:
        loaded.attach(a)
    assert loaded.decoder is not None
    paths = [None, str(adapters[0]), str(adapters[1])]
    names = [loaded.adapters[p] if p else None for p in paths]
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], list(range(20, 90))]  # the last outgrows a 64-column cache
    cache = loaded.decoder.new_cache(8)
    seqs, routes = [], []  # each slot's tokens and adapter path
    with torch.no_grad():
        first = loaded.decoder.prefill(cache, prompts, [[0], [1, 2], [3]], names)  # prompt 1 has two choices
        for p, (ids, path) in enumerate(zip(prompts, paths)):
            torch.testing.assert_close(first[p].float(), alone(loaded, path, ids), atol=atol, rtol=0)
        for p, n in zip(range(3), (1, 2, 1)):
            seqs += [list(prompts[p]) for _ in range(n)]
            routes += [paths[p]] * n
        for step in range(3):
            if step == 2:  # slots 0 and 2 finish; 1 and 3 move down
                cache.keep([1, 3])
                seqs, routes = [seqs[1], seqs[3]], [routes[1], routes[3]]
            tokens = torch.tensor([30 + step + i for i in range(len(seqs))])
            out = loaded.decoder.decode(cache, tokens, [loaded.adapters[r] if r else None for r in routes])
            for i, t in enumerate(tokens.tolist()):
                seqs[i].append(t)
                torch.testing.assert_close(out[i].float(), alone(loaded, routes[i], seqs[i]), atol=atol, rtol=0)
    assert cache.lens[:2].tolist() == [len(seqs[0]), len(seqs[1])]
    cache.keep([])
    assert cache.k.numel() == 0  # an emptied cache lets its memory go


def test_the_adapter_changes_the_logits_and_detaching_restores_the_base(tiny):
    base, adapters = tiny
    loaded = LoadedWeights(base, torch.float32, "cpu")
    loaded.attach(adapters[0])
    name = loaded.adapters[str(adapters[0])]
    with torch.no_grad():
        plain = loaded.decoder.prefill(loaded.decoder.new_cache(1), [[5, 6, 7]], [[0]], [None])
        tuned = loaded.decoder.prefill(loaded.decoder.new_cache(1), [[5, 6, 7]], [[0]], [name])
        assert (plain - tuned).abs().max() > 1e-2
        loaded.detach(str(adapters[0]))
        after = loaded.decoder.prefill(loaded.decoder.new_cache(1), [[5, 6, 7]], [[0]], [name])
    torch.testing.assert_close(after, plain)


def test_a_prompt_longer_than_the_context_is_refused(tiny):
    base, _ = tiny
    loaded = LoadedWeights(base, torch.float32, "cpu")
    limit = loaded.decoder.context
    with pytest.raises(ValueError, match="context length"):
        loaded.decoder.prefill(loaded.decoder.new_cache(1), [[5] * (limit + 1)], [[0]], [None])


def _generate(base, adapters, prompts, n=2):
    params = SamplingParams(max_tokens=10, temperature=0)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, seed=7)

    async def main():
        engine = TorchEngine(max_batch_size=8, threads=1)
        try:
            refs = [ModelRef("m", "w", base, 2048, adapter_path=a) for a in [None, *adapters]]
            ids = [engine.tokenizer(refs[0]).encode(p) for p in prompts]

            async def one(ref, prompt, p, k):
                out: dict[int, list[int]] = {}
                async for ev in engine.submit(ref, prompt, p, n=k):
                    assert ev.error is None, ev.error
                    out.setdefault(ev.index, []).append(ev.token_id)
                return [out[i] for i in sorted(out)]

            jobs = [one(r, i, params, 1) for r in refs for i in ids] + [one(refs[1], ids[0], sampled, n)]
            return await asyncio.gather(*jobs), engine.stats()
        finally:
            engine.close()

    return asyncio.run(main())


def test_the_engine_gives_the_same_tokens_through_either_forward(tiny, monkeypatch):
    base, adapters = tiny
    prompts = ["The quick brown fox", "Hello", "a b c d e f g h"]
    fast, stats = _generate(base, adapters, prompts)
    monkeypatch.setattr(decoders, "supports", lambda config: "forced off for the test")
    slow, _ = _generate(base, adapters, prompts)
    assert fast == slow
    assert stats["max_batch_size"] > 3
    sampled = fast[-1]
    assert len(sampled) == 2 and sampled[0] != sampled[1]  # n=2 choices share the prefill, not the sample


def test_other_architectures_decode_through_transformers(tmp_path, model_cache):
    """A GPT-2 (no rotary, LayerNorm, fused c_attn) is not the llama graph: the decoder declines
    it and the engine's greedy tokens equal `generate`'s."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(build_tiny_model(model_cache / "models" / "tunehouse--tiny-llama"))
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    assert decoders.supports(config) == "model_type 'gpt2'"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    ids = tok.encode("The quick brown fox")
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()

    async def main():
        engine = TorchEngine(threads=1)
        try:
            ref = ModelRef("g", "gpt2", tmp_path / "gpt2", 256)
            got = [ev.token_id async for ev in engine.submit(ref, ids, SamplingParams(max_tokens=8, temperature=0,
                                                                                       ignore_eos=True))]
            return got, engine._models["gpt2"].decoder
        finally:
            engine.close()

    got, decoder = asyncio.run(main())
    assert decoder is None and got == want
