"""Issue 9 over a live server with the official openai SDK (and raw httpx for error shapes), on the
tiny random base model: `response_format` (json_schema, json_object, regex) holds the output to
the grammar, streamed and not, with n=2, beside an unconstrained request; `logit_bias`,
`max_completion_tokens`, list prompts, `logprobs: 0`, `stream_options`; every option tunehouse
cannot act on answers 400 naming it."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from conftest import _serve
from tunehouse.settings import Settings

TINY = "tunehouse/tiny-llama"
HELLO = [{"role": "user", "content": "Describe a person as JSON."}]

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "color", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["ok", "size", "items"],
         "properties": {"ok": {"type": "boolean"},
                        "size": {"enum": ["small", "large"]},
                        "items": {"type": "array", "minItems": 1, "maxItems": 4,
                                  "items": {"type": "object", "additionalProperties": False,
                                            "required": ["sku", "qty"],
                                            "properties": {"sku": {"type": "string", "maxLength": 4},
                                                           "qty": {"type": "integer", "minimum": 1,
                                                                   "maximum": 9}}}}}}
FLAG = {"type": "object", "additionalProperties": False, "required": ["level"],
        "properties": {"level": {"type": "integer", "minimum": -5, "maximum": 5}}}
SCHEMAS = {"person": PERSON, "order": ORDER, "flag": FLAG}


def check(value, schema: dict, path: str = "$") -> None:
    """A small JSON Schema validator for the keywords these tests use (jsonschema is not installed)."""
    if "enum" in schema:
        assert value in schema["enum"], (path, value)
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict), (path, value)
        assert set(schema.get("required", [])) <= set(value), (path, value)
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"]), (path, value)
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                check(value[key], sub, f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list), (path, value)
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9), (path, value)
        for i, item in enumerate(value):
            check(item, schema["items"], f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", 10**9), (path, value)
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), (path, value)
        assert schema.get("minimum", -10**18) <= value <= schema.get("maximum", 10**18), (path, value)
    elif kind == "boolean":
        assert isinstance(value, bool), (path, value)
    else:
        raise AssertionError(f"validator does not know type {kind}")


def test_validator_rejects_what_it_should():
    """The validator itself can fail: each bad value breaks one rule."""
    good = {"name": "ab", "age": 3, "color": "red", "tags": []}
    check(good, PERSON)
    for bad in ({**good, "age": 121}, {**good, "color": "pink"}, {**good, "extra": 1},
                {**good, "tags": ["toolong"]}, {k: v for k, v in good.items() if k != "age"}, {**good, "age": True}):
        with pytest.raises(AssertionError):
            check(bad, PERSON)


@pytest.fixture(scope="module", params=["torch", "llama.cpp"])
def server(request, tmp_path_factory, model_cache):
    """Part of the inference contract suite with test_api_inference.py: each test runs against both
    backends (on llama.cpp's, grammar-constrained requests are decoded by torch beside it)."""
    home = tmp_path_factory.mktemp("decoding") / "home"
    binary = request.getfixturevalue("llama_server") if request.param == "llama.cpp" else None
    live, bg = _serve(Settings(home=home, model_cache=model_cache, embedded_worker=False, serve_max_batch_size=16,
                               serve_backend=request.param, llama_server=binary))
    yield live
    bg.stop()


def oai(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=live.key, max_retries=0)


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/{path}", json=body, headers={"Authorization": f"Bearer {live.key}"},
                      timeout=60)


def schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_parses_and_fits_streamed_and_not(server, name):
    c, fmt = oai(server), schema_format(name)
    r = c.chat.completions.create(model=TINY, messages=HELLO, max_tokens=400, temperature=1.0, seed=11, n=2,
                                  response_format=fmt)
    texts = [ch.message.content for ch in r.choices]
    for ch in r.choices:
        assert ch.finish_reason == "stop", ch
        check(json.loads(ch.message.content), SCHEMAS[name])
    assert texts[0] != texts[1]  # seeds 11 and 12: two different documents, both valid
    streamed = list(c.chat.completions.create(model=TINY, messages=HELLO, max_tokens=400, temperature=1.0,
                                              seed=11, n=2, response_format=fmt, stream=True))
    got = ["", ""]
    for chunk in streamed:
        for ch in chunk.choices:
            got[ch.index] += ch.delta.content or ""
    assert got == texts
    assert sorted(ch.choices[0].finish_reason for ch in streamed if ch.choices[0].finish_reason) == ["stop", "stop"]


def test_constrained_and_free_requests_share_batches(server):
    """A schema request (n=2) and a free greedy request at the same time: the free one gives what
    it gives alone, the constrained ones fit the schema."""
    free = {"model": TINY, "messages": HELLO, "max_tokens": 24, "temperature": 0}
    alone = post(server, "chat/completions", free).json()["choices"][0]["message"]["content"]
    constrained = {"model": TINY, "messages": HELLO, "max_tokens": 400, "temperature": 1.0, "seed": 3, "n": 2,
                   "response_format": schema_format("order")}
    engine = server.app.state.engine()
    before = engine.stats()["max_batch_size"]

    async def both():
        async with httpx.AsyncClient(base_url=server.url + "/v1", timeout=60,
                                     headers={"Authorization": f"Bearer {server.key}"}) as http:
            return await asyncio.gather(*[http.post("/chat/completions", json=b) for b in (constrained, free) * 2])

    answers = [r.json() for r in asyncio.run(both())]
    assert engine.stats()["max_batch_size"] >= max(before, 3)
    for a in answers[0::2]:
        for ch in a["choices"]:
            assert ch["finish_reason"] == "stop"
            check(json.loads(ch["message"]["content"]), ORDER)
    assert [a["choices"][0]["message"]["content"] for a in answers[1::2]] == [alone, alone]


def test_json_object_and_regex_and_together_shapes(server):
    c = oai(server)
    # Any object: the random model has no reason to close a free key string, so a +20 bias on "}"
    # makes it end early. The bias cannot put "}" first: the grammar forbids it there.
    close = server.app.state.engine().tokenizer(_ref(server)).convert_tokens_to_ids("}")
    r = c.chat.completions.create(model=TINY, messages=HELLO, max_tokens=60, temperature=0,
                                  response_format={"type": "json_object"}, logit_bias={str(close): 20})
    assert r.choices[0].message.content == "{}" and r.choices[0].finish_reason == "stop"
    cut = c.chat.completions.create(model=TINY, messages=HELLO, max_tokens=30, temperature=0,
                                    response_format={"type": "json_object"})
    assert cut.choices[0].message.content.startswith("{") and cut.choices[0].finish_reason == "length"
    # Together's shapes: the schema beside the type, and a regex (here on text completions).
    tg = post(server, "chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 60, "temperature": 0.7,
                                           "seed": 1, "response_format": {"type": "json_object", "schema": FLAG}})
    check(json.loads(tg.json()["choices"][0]["message"]["content"]), FLAG)
    rx = post(server, "completions", {"model": TINY, "prompt": "Code:", "max_tokens": 20, "temperature": 1.0,
                                      "seed": 2, "response_format": {"type": "regex", "pattern": "[A-Z]{2}-[0-9]{3}"}})
    choice = rx.json()["choices"][0]
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", choice["text"]) and choice["finish_reason"] == "stop"
    text = c.chat.completions.create(model=TINY, messages=HELLO, max_tokens=8, temperature=0,
                                     response_format={"type": "text"})
    plain = c.chat.completions.create(model=TINY, messages=HELLO, max_tokens=8, temperature=0)
    assert text.choices[0].message.content == plain.choices[0].message.content


def test_together_sdks_structured_outputs(server, v1_python):
    """The together 3.x SDK (OpenAI's json_schema shape) and the 1.x SDK (its own `schema` beside
    the type, and a regex), streamed on 1.x: every answer fits."""
    from together import Together

    from test_api_files_v1_and_clis import run_v1

    r = Together(base_url=server.url, api_key=server.key, max_retries=0).chat.completions.create(
        model=TINY, messages=HELLO, max_tokens=200, temperature=0.8, seed=4, response_format=schema_format("flag"))
    check(json.loads(r.choices[0].message.content), FLAG)
    res = run_v1(v1_python, server, f"""
        c = Together()
        r = c.chat.completions.create(model={TINY!r}, messages={HELLO!r}, max_tokens=200, temperature=0.8, seed=4,
                                      response_format={{"type": "json_object", "schema": {FLAG!r}}})
        s = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model={TINY!r}, messages={HELLO!r}, max_tokens=20, temperature=1.0, seed=5, stream=True,
            response_format={{"type": "regex", "pattern": "(yes|no)-[0-9]"}}))
        print(json.dumps(dict(doc=r.choices[0].message.content, finish=r.choices[0].finish_reason, regex=s)))
    """)
    check(json.loads(res["doc"]), FLAG)
    assert res["finish"] == "stop"
    assert re.fullmatch(r"(yes|no)-[0-9]", res["regex"]), res


def test_max_tokens_cuts_a_document_with_length(server):
    r = oai(server).chat.completions.create(model=TINY, messages=HELLO, max_completion_tokens=5, temperature=0,
                                            response_format=schema_format("person"))
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


@pytest.mark.parametrize("response_format, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3,
                                                                     "maximum": 1}}}, "cannot be enforced"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wibble"}}}, "cannot be enforced"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "json_schema.name"),
    ({"type": "yaml"}, "type must be one of"),
    ({"type": "regex", "pattern": "(("}, "cannot be enforced"),
    ({"type": "json_object", "schemas": {}}, "not 'schemas'"),
])
def test_bad_response_format_is_400_naming_it(server, response_format, words):
    r = post(server, "chat/completions", {"model": TINY, "messages": HELLO, "response_format": response_format})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and words in err["message"], err


def test_logit_bias_forces_and_bans_tokens(server):
    c = oai(server)
    tok = server.app.state.engine().tokenizer(_ref(server))
    forced = tok.convert_tokens_to_ids("Ġblue")
    r = c.completions.create(model=TINY, prompt="Hello", max_tokens=6, temperature=0, logit_bias={str(forced): 100})
    assert r.choices[0].text == " blue" * 6
    base = c.completions.create(model=TINY, prompt="Hello", max_tokens=6, temperature=0, logprobs=0)
    first = tok.convert_tokens_to_ids(tok.tokenize(base.choices[0].text))[0]
    banned = c.completions.create(model=TINY, prompt="Hello", max_tokens=6, temperature=0,
                                  logit_bias={str(first): -100}, logprobs=0)
    ids = tok.convert_tokens_to_ids(tok.tokenize(banned.choices[0].text))
    assert first not in ids and banned.choices[0].text != base.choices[0].text
    for bias, words in (({"x": 1}, "token ids written as strings"), ({"5": 101}, "from -100 to 100"),
                        ({"99999": 1}, "past this model's vocabulary")):
        bad = post(server, "completions", {"model": TINY, "prompt": "Hi", "logit_bias": bias})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias", bad.text
        assert words in bad.json()["error"]["message"]


def test_max_completion_tokens_and_logprobs_zero(server):
    c = oai(server)
    r = c.chat.completions.create(model=TINY, messages=HELLO, max_completion_tokens=3, temperature=0,
                                  logprobs=True, top_logprobs=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].logprobs.content) == 3
    assert all(e.logprob <= 0 and e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    same = post(server, "chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 3,
                                             "max_completion_tokens": 3})
    assert same.status_code == 200
    clash = post(server, "chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 3,
                                              "max_completion_tokens": 4})
    assert clash.status_code == 400 and clash.json()["error"]["param"] == "max_completion_tokens"

    t = c.completions.create(model=TINY, prompt="Hello", max_tokens=4, temperature=0, logprobs=0)
    lp = t.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs) and lp.top_logprobs is None
    one = c.completions.create(model=TINY, prompt="Hello", max_tokens=4, temperature=0, logprobs=1)
    assert one.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert post(server, "completions", {"model": TINY, "prompt": "Hi", "logprobs": 21}).status_code == 400
    orphan = post(server, "chat/completions", {"model": TINY, "messages": HELLO, "top_logprobs": 2})
    assert orphan.status_code == 400 and orphan.json()["error"]["param"] == "top_logprobs"
    both = post(server, "completions", {"model": TINY, "prompt": "Hi", "logprobs": 2, "top_logprobs": 3})
    assert both.status_code == 400 and both.json()["error"]["param"] == "top_logprobs"


def test_list_prompts_give_n_choices_each_in_order(server):
    c = oai(server)
    prompts = ["Hello", "The quick brown fox", "red green"]
    alone = [c.completions.create(model=TINY, prompt=p, max_tokens=5, temperature=0).choices[0].text for p in prompts]
    r = c.completions.create(model=TINY, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == list(range(6))
    assert [ch.text for ch in r.choices] == [t for t in alone for _ in range(2)]
    tok = server.app.state.engine().tokenizer(_ref(server))
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)

    streamed = list(c.completions.create(model=TINY, prompt=prompts, max_tokens=5, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    got = ["", "", ""]
    for chunk in streamed[:-1]:
        for ch in chunk.choices:
            got[ch.index] += ch.text
    assert got == alone
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens == 15

    ids = [tok.encode(p) for p in prompts[:2]]
    by_ids = c.completions.create(model=TINY, prompt=ids, max_tokens=5, temperature=0)
    assert [ch.text for ch in by_ids.choices] == alone[:2]
    one = c.completions.create(model=TINY, prompt=ids[1], max_tokens=5, temperature=0)
    assert one.choices[0].text == alone[1]
    echoed = post(server, "completions", {"model": TINY, "prompt": prompts, "max_tokens": 0, "echo": True,
                                          "logprobs": 1}).json()
    assert [p["text"] for p in echoed["prompt"]] == prompts and len(echoed["choices"]) == 3
    assert all(p["logprobs"]["token_logprobs"][0] is None for p in echoed["prompt"])
    assert echoed["prompt"][0]["logprobs"]["token_logprobs"] == [None]  # one token: nothing to score (was a 500)
    bad = post(server, "completions", {"model": TINY, "prompt": [1, 10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    empty = post(server, "completions", {"model": TINY, "prompt": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"


def test_stream_options_and_context_truncation(server):
    c = oai(server)
    chunks = list(c.chat.completions.create(model=TINY, messages=HELLO, max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert post(server, "chat/completions", {"model": TINY, "messages": HELLO,
                                             "stream_options": {"include_usage": True}}).status_code == 400
    n = len(server.app.state.engine().tokenizer(_ref(server)).encode("hello " * 10))
    cut = post(server, "completions", {"model": TINY, "prompt": "hello " * 10, "max_tokens": 5000, "temperature": 0,
                                       "context_length_exceeded_behavior": "truncate", "logit_bias": {"2": -100}})
    assert cut.status_code == 200 and cut.json()["usage"]["completion_tokens"] == 2048 - n
    refused = post(server, "completions", {"model": TINY, "prompt": "hi", "max_tokens": 5000,
                                           "context_length_exceeded_behavior": "error"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


REFUSED = [
    ("chat", "audio", {"voice": "alloy", "format": "wav"}), ("chat", "modalities", ["text", "audio"]),
    ("chat", "prediction", {"type": "content", "content": "x"}), ("chat", "web_search_options", {}),
    ("chat", "functions", [{"name": "f", "parameters": {}}]), ("chat", "function_call", "auto"),
    ("chat", "reasoning_effort", "high"),
    ("chat", "reasoning", {"enabled": True}), ("chat", "verbosity", "low"), ("chat", "safety_model", "guard"),
    ("chat", "moderation", {"model": "m"}), ("chat", "compliance", "hipaa"), ("chat", "store", True),
    ("chat", "service_tier", "flex"), ("chat", "guided_json", {"type": "object"}),
    ("chat", "frobnicate", 1), ("completions", "suffix", "end"), ("completions", "best_of", 3),
    ("completions", "messages", [{"role": "user", "content": "hi"}]), ("completions", "safety_model", "guard"),
]


def test_every_refused_name_in_the_policy_table_is_tested():
    from tunehouse.api.inference_policy import REFUSED as TABLE

    tested = {field for _, field, _ in REFUSED}
    assert set(TABLE) - tested <= {"guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
                                   "structured_outputs"}  # the same rule as guided_json


@pytest.mark.parametrize("endpoint, field, value", REFUSED)
def test_unsupported_options_are_refused_by_name(server, endpoint, field, value):
    body = {"model": TINY, "max_tokens": 2, field: value}
    body |= {"messages": HELLO} if endpoint == "chat" else {"prompt": "Hi"}
    r = post(server, f"{endpoint}/completions" if endpoint == "chat" else "completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and err["type"] == "invalid_request_error"


def test_refusals_through_the_sdk_and_metadata_accepted(server):
    c = oai(server)
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=TINY, messages=HELLO, max_tokens=2, modalities=["audio"])
    assert exc.value.body["param"] == "modalities" and "text only" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model=TINY, prompt="Hi", max_tokens=2, suffix="!")
    assert exc.value.body["param"] == "suffix"
    # Harmless metadata and values that ask for nothing extra are accepted.
    ok = c.chat.completions.create(model=TINY, messages=HELLO, max_tokens=2, user="u-1", store=False,
                                   metadata={"run": "7"}, modalities=["text"], service_tier="auto",
                                   safety_identifier="h-1", prompt_cache_key="k", reasoning_effort="none",
                                   extra_body={"functions": [], "function_call": "none", "safety_model": None})
    assert ok.usage.completion_tokens == 2
    assert c.completions.create(model=TINY, prompt="Hi", max_tokens=2, n=2, best_of=2, user="u").usage


def test_chat_template_kwargs_reach_the_template(server):
    from tunehouse.serve.completions import chat_prompt

    tok = server.app.state.engine().tokenizer(_ref(server))
    plain = chat_prompt(tok, HELLO)
    templated = chat_prompt(tok, HELLO, template_kwargs={"unused_flag": True})
    assert templated == plain  # an unknown variable changes nothing in this template
    from copy import copy

    custom = copy(tok)
    custom.chat_template = "{% if shout %}LOUD {% endif %}{{ messages[0]['content'] }}"
    assert chat_prompt(custom, HELLO, template_kwargs={"shout": True}) == "LOUD " + HELLO[0]["content"]
    r = post(server, "chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 2,
                                          "chat_template_kwargs": {"tokenize": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    assert post(server, "chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 2,
                                             "chat_template_kwargs": {"enable_thinking": False}}).status_code == 200


def _ref(live):
    from tunehouse.serve.models import resolve_for

    return resolve_for(live.app.state.home, live.app.state.registry, "alice", TINY)
