"""Tool calling end to end over a live server: a tool-calling dataset passes the server's checks,
trains the tiny model until it recalls its calls, and the fine-tune's calls come back parsed in
`message.tool_calls` through the official openai SDK, streamed and not; tool_choice, history with
calls and results, the limits and the 400s."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from together import Together

from conftest import _serve
from jobs_support import wait_for
from tunehouse.settings import Settings

TINY = "tunehouse/tiny-llama"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather by city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time now",
                                         "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
TEMPS = {"Paris": "18C", "Rome": "25C"}


def conversation(city: str) -> list[dict]:
    call = {"id": f"call_{city}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    return [{"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{city}", "content": TEMPS[city]},
            {"role": "assistant", "content": f"It is {TEMPS[city]}."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_cache):
    # This module checks how calls are rendered, parsed and streamed, on a model that has learnt two
    # calls by heart at a steep constant rate; bf16 rounding (the default on this CPU) can leave
    # one token off after these 20 epochs, so the training child runs fp32. The bf16 default's
    # training quality is tested in test_train_sft.py (test_bf16_default_trains_like_fp32).
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNEHOUSE_BF16", "0")
    home = tmp_path_factory.mktemp("tools") / "home"
    live, bg = _serve(Settings(home=home, model_cache=model_cache, embedded_worker=True))
    path = tmp_path_factory.mktemp("data") / "tools.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(city), "tools": TOOLS}) + "\n"
                            for city in TEMPS for _ in range(2)))
    c = Together(base_url=live.url, api_key=live.key, max_retries=0)
    f = c.files.upload(path)
    assert f.model_extra.get("validation_report", {}).get("dataset_has_tools") is not False
    # Every step sees the whole set; at a constant 1e-2 without clipping, full weights recall both
    # calls exactly after ~15 steps (LoRA needed ~35, measured in-process).
    job = c.fine_tuning.create(training_file=f.id, model=TINY, lora=False, suffix="tools", n_epochs=20,
                               batch_size=4, learning_rate=1e-2, min_lr_ratio=1.0, max_grad_norm=0)
    done = wait_for(c, job.id)
    assert done.status == "completed"
    live.tuned = done.model_output_name
    yield live
    bg.stop()
    mp.undo()


def oai(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=live.key, max_retries=0)


def ask(city: str) -> list[dict]:
    return conversation(city)[:1]


def test_fine_tune_emits_a_parsed_tool_call(server):
    r = oai(server).chat.completions.create(model=server.tuned, messages=ask("Paris"), tools=TOOLS,
                                            temperature=0, max_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    # The base model, with tool_choice "none", or without tools: no call is read.
    for kw in ({"model": TINY, "tools": TOOLS}, {"model": server.tuned, "tools": TOOLS, "tool_choice": "none"}):
        plain = oai(server).chat.completions.create(messages=ask("Paris"), temperature=0, max_tokens=16, **kw)
        assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason != "tool_calls"


def test_streamed_tool_call_accumulates_like_the_non_streamed_one(server):
    c = oai(server)
    kw = dict(model=server.tuned, messages=ask("Rome"), tools=TOOLS, temperature=0, max_tokens=100)
    whole = c.chat.completions.create(**kw).choices[0]
    chunks = list(c.chat.completions.create(stream=True, **kw))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Rome"})]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the SDK's own stream accumulator
    with c.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.message.tool_calls[0].function.name == whole.message.tool_calls[0].function.name
    assert final.message.tool_calls[0].function.arguments == whole.message.tool_calls[0].function.arguments


def test_history_with_call_and_result_gets_the_trained_answer(server):
    """The request's assistant tool_calls and tool message render as in training, so the
    fine-tune answers from the result with its trained text."""
    r = oai(server).chat.completions.create(model=server.tuned, messages=conversation("Paris")[:3], tools=TOOLS,
                                            temperature=0, max_tokens=16)
    assert r.choices[0].message.content == "It is 18C." and r.choices[0].message.tool_calls is None


def test_tool_choice_forces_a_call(server):
    c = oai(server)
    named = c.chat.completions.create(model=server.tuned, messages=ask("Rome"), tools=TOOLS, temperature=0,
                                      max_tokens=100, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(named.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
    # "required" among two tools: the fine-tune's own probabilities pick get_weather
    required = c.chat.completions.create(model=server.tuned, messages=ask("Paris"), tools=TOOLS, temperature=0,
                                         max_tokens=100, tool_choice="required")
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"
    # a forced call to the other tool: its name is prefilled, whatever the model would prefer
    other = c.chat.completions.create(model=server.tuned, messages=ask("Paris"), tools=TOOLS, temperature=0,
                                      max_tokens=100, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert other.choices[0].message.tool_calls[0].function.name == "get_time"


def limits(server, model: str) -> dict:
    r = httpx.get(f"{server.url}/v1/fine-tunes/models/limits", params={"model_name": model},
                  headers={"Authorization": f"Bearer {server.key}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_limits_report_tool_support(server, tmp_path):
    tiny = limits(server, TINY)
    assert (tiny["supports_tools"], tiny["tool_call_format"]) == (True, "fallback")
    assert (tiny["supports_reasoning"], tiny["reasoning_format"]) == (True, "fallback")
    # A model folder whose template lays tools out itself (test_tools.NATIVE) reports "native".
    from transformers import AutoTokenizer

    from test_tools import NATIVE

    folder = tmp_path / "native-model"
    tiny_dir = server.app.state.registry.path(TINY)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = NATIVE
    tok.save_pretrained(folder)
    (folder / "config.json").write_text((tiny_dir / "config.json").read_text())
    server.app.state.registry.add("acme/native-tools", str(folder))
    native = limits(server, "acme/native-tools")
    assert (native["supports_tools"], native["tool_call_format"], native["reasoning_format"]) == (
        True, "native", "native")


@pytest.mark.parametrize("extra, param, message", [
    ({"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", 'tool_choice must be "none"'),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name", "expected a string, found null"),
    ({"tools": []}, "tools", "tools is empty"),
    ({"functions": [WEATHER["function"]]}, "functions", "`functions` is deprecated"),
])
def test_bad_tool_fields_are_400s(server, extra, param, message):
    r = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {server.key}"},
                   json={"model": TINY, "messages": ask("Paris"), "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"]


def test_malformed_history_call_is_a_400(server):
    msgs = conversation("Paris")[:3]
    msgs[1] = {**msgs[1], "tool_calls": [{"id": "c", "type": "function",
                                          "function": {"name": "get_weather", "arguments": "{city"}}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {server.key}"},
                   json={"model": TINY, "messages": msgs, "tools": TOOLS, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"
