"""Constrained decoding (`serve/grammar.py`): the bitmask maths against hand-computed values, the
compile cache and its 400s, and TorchEngine rows held to a grammar next to free rows in one batch."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from tunehouse.errors import InvalidInput
from tunehouse.models.tiny import build_tiny_model
from tunehouse.serve import grammar as G
from tunehouse.serve.engine import ModelRef, TorchEngine
from tunehouse.serve.grammar import Spec
from tunehouse.serve.sampling import SamplingParams

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "color"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "color": {"enum": ["red", "green", "blue"]}}}


@pytest.fixture(scope="module")
def base(model_cache):
    return build_tiny_model(model_cache / "models" / "tunehouse--tiny-llama")


@pytest.fixture(scope="module")
def tokenizer(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def test_unpack_bitmask_least_significant_bit_first():
    """Word 0 = 0b101 → tokens 0 and 2; word 1 = 1 << 3 → token 32 + 3 = 35; word 1 = −2**31 (the
    sign bit) → token 63. vocab 36 cuts row 1 before 63; vocab 70 pads past 64 with False."""
    words = torch.tensor([[0b101, 1 << 3], [0, -2**31]], dtype=torch.int32)
    cut = G.unpack_bitmask(words, 36)
    assert cut.shape == (2, 36)
    assert cut[0].nonzero().flatten().tolist() == [0, 2, 35] and not cut[1].any()
    wide = G.unpack_bitmask(words, 70)
    assert wide[1].nonzero().flatten().tolist() == [63] and not wide[:, 64:].any()


def test_spec_canonicalises_the_schema():
    assert Spec.json_schema({"b": 1, "a": {"y": 2, "x": 1}}) == Spec.json_schema({"a": {"x": 1, "y": 2}, "b": 1})
    assert Spec.json_schema({"a": 1}).source == '{"a":1}'


def test_compile_is_cached_and_refuses_bad_schemas(tokenizer):
    cache = G.GrammarCache(size=2)
    first = cache.compile("tiny", tokenizer, Spec.json_schema(PERSON))
    assert cache.compile("tiny", tokenizer, Spec.json_schema(json.loads(json.dumps(PERSON)))) is first
    for spec, words in [(Spec.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "JSON schema"),
                        (Spec.json_schema({"type": "frobnicate"}), "JSON schema"),
                        (Spec.regex("(unclosed"), "regex")]:
        with pytest.raises(InvalidInput) as exc:
            cache.compile("tiny", tokenizer, spec)
        assert exc.value.param == "response_format" and words in exc.value.message
    cache.compile("tiny", tokenizer, Spec.regex("a+"))
    cache.compile("tiny", tokenizer, Spec.regex("b+"))
    again = cache.compile("tiny", tokenizer, Spec.json_schema(PERSON))
    assert again is not first  # LRU: evicted
    cache.compile("other", tokenizer, Spec.regex("a+"))
    cache.forget(lambda key: key == "tiny")  # the weights were deleted
    assert cache.compile("tiny", tokenizer, Spec.json_schema(PERSON)) is not again
    assert len(cache._grammars) == 2 and set(cache._tokenizers) == {"tiny", "other"}


def test_masks_walk_a_regex_and_leave_free_rows_alone(tokenizer):
    """Regex `ab`: first only tokens spelling a prefix of "ab"; after "a", only "b"; then complete,
    end-of-sequence allowed. The unconstrained row allows everything throughout."""
    cache = G.GrammarCache()
    c = cache.compile("tiny", tokenizer, Spec.regex("ab")).start()
    vocab, eos = len(tokenizer), {tokenizer.eos_token_id}
    allowed = G.masks([None, c], vocab, eos, cache.executor)
    assert allowed[0].all()
    first = {tokenizer.decode([t]) for t in allowed[1].nonzero().flatten().tolist()}
    assert first and first <= {"a", "ab"}, first
    c.accept(tokenizer.convert_tokens_to_ids("a"))
    second = G.masks([c], vocab, eos, cache.executor)[0].nonzero().flatten().tolist()
    assert [tokenizer.decode([t]) for t in second] == ["b"]
    c.accept(second[0])
    assert c.complete and c.accepting and c.error is None


def _validate(value, schema):
    assert set(value) == set(schema["required"])
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 99
    assert value["color"] in ("red", "green", "blue")


def test_engine_batch_mixes_constrained_and_free_rows(base):
    """One batch: a free greedy row, a schema row (n=2, sampled) and a free sampled row. The free
    rows give exactly what they give alone; the schema rows parse, fit and end with `stop`."""
    model = ModelRef("m", "tiny", base, 2048)
    free = SamplingParams(max_tokens=20, temperature=0)
    sampled = SamplingParams(max_tokens=20, temperature=1.0, seed=3)
    json_params = SamplingParams(max_tokens=80, temperature=1.0, seed=5)

    async def collect(gen):
        out: dict[int, list] = {}
        async for ev in gen:
            assert ev.error is None, ev.error
            text, reason = out.get(ev.index, ["", None])
            out[ev.index] = [text + ev.text, ev.finish_reason or reason]
        return [tuple(out[i]) for i in sorted(out)]

    async def main():
        engine = TorchEngine(max_batch_size=8, threads=1)
        try:
            ids = engine.tokenizer(model).encode("Hello there")
            alone = [await collect(engine.submit(model, ids, p)) for p in (free, sampled)]
            grammar = await asyncio.to_thread(engine.grammar, model, Spec.json_schema(PERSON))
            mixed = await asyncio.gather(collect(engine.submit(model, ids, free)),
                                         collect(engine.submit(model, ids, json_params, n=2, grammar=grammar)),
                                         collect(engine.submit(model, ids, sampled)))
            return alone, mixed, engine.stats()
        finally:
            engine.close()

    alone, (free_out, json_out, sampled_out), stats = asyncio.run(main())
    assert stats["max_batch_size"] >= 3 and stats["constrained"] == 1
    assert free_out == alone[0] and sampled_out == alone[1]
    assert len(json_out) == 2 and json_out[0][0] != json_out[1][0]  # seeds 5 and 6
    for text, reason in json_out:
        assert reason == "stop", (text, reason)
        _validate(json.loads(text), PERSON)
    with pytest.raises(json.JSONDecodeError):
        json.loads(alone[0][0][0])  # the free text is not JSON: the mask did the work


def test_max_tokens_cuts_a_document_short_with_length(base):
    model = ModelRef("m", "tiny", base, 2048)

    async def main():
        engine = TorchEngine(threads=1)
        try:
            ids = engine.tokenizer(model).encode("Hello")
            grammar = engine.grammar(model, Spec.json_schema(PERSON))
            events = [ev async for ev in engine.submit(model, ids, SamplingParams(max_tokens=4, temperature=0),
                                                       grammar=grammar)]
            return events
        finally:
            engine.close()

    events = asyncio.run(main())
    assert len(events) == 4 and events[-1].finish_reason == "length"
    assert "".join(e.text for e in events).startswith('{"')


def test_masks_on_logits_wider_than_the_tokenizer_and_with_several_eos(tokenizer):
    """Logits 40 columns wider than the tokenizer (padded embeddings): a constrained row never
    allows the padding ids, a free row does. Every end-of-sequence id follows llguidance's one:
    forbidden before the document is whole, allowed once it is."""
    cache = G.GrammarCache()
    c = cache.compile("tiny", tokenizer, Spec.regex("a")).start()
    vocab, eos = len(tokenizer) + 40, {tokenizer.eos_token_id, 0}
    allowed = G.masks([c, None], vocab, eos, cache.executor)
    assert allowed.shape == (2, vocab) and allowed[1].all() and not allowed[0, len(tokenizer):].any()
    assert not allowed[0, sorted(eos)].any()
    c.accept(tokenizer.convert_tokens_to_ids("a"))
    assert G.masks([c], vocab, eos, cache.executor)[0, sorted(eos)].all()
