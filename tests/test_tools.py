"""Tool calling and reasoning in the data layer (data/tools.py, data/tokenize.py): the rendering on a
template with native tool support and on the fallback, loss masks worked out by hand for both,
per-message weights on every role, the reply reader, and Parquet position_ids."""

from __future__ import annotations

import copy
import json

import pytest
from train_fixtures import tiny_model_dir, tiny_tokenizer  # noqa: F401  (fixtures)

from tunehouse.data import tools
from tunehouse.data.tokenize import IGNORE, split_packed, tokenize_row
from tunehouse.models.registry import SMOLLM2_SUPPORT
from tunehouse.serve.tool_calls import CallReader, ToolPlan

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ROW = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL], "reasoning": "Need the weather."},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "assistant", "content": "It is 18C."}]}

# A minimal Hermes/Qwen-style template written for these tests: tools in the system turn, calls as
# <tool_call>\n{json}\n</tool_call>, reasoning as <think>, consecutive tool results sharing ONE user
# turn that closes after the last of them (so results do not render one by one as prefixes).
NATIVE = (  # newlines inside {{ }}: HF renders with trim_blocks, which eats one after a tag
    "{%- if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}{% endif %}"
    "{{ '# Tools\n<tools>' }}{% for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}"
    "{{ '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{ '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% if m.reasoning_content %}{{ '<think>\n' + m.reasoning_content + '\n</think>\n' }}{% endif %}"
    "{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{% if m.content or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' + (c.function.arguments | tojson)"
    " + '}\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{% if messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + m.content + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{%- elif m.role != 'system' %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def native_tokenizer(tiny_tokenizer):  # noqa: F811
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = NATIVE
    return tok


def pieces_of(tok, pieces):
    """ids and labels from (text, trained) pieces, each encoded alone."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def trained_text(tok, got) -> list[str]:
    """The runs of trained tokens, decoded."""
    runs, run = [], []
    for i, label in zip(got.input_ids, got.labels):
        if label != IGNORE:
            run.append(i)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs + ([tok.decode(run)] if run else [])


def test_template_support_is_probed(tiny_tokenizer, native_tokenizer):  # noqa: F811
    assert tools.template_support(tiny_tokenizer) == SMOLLM2_SUPPORT  # the tiny template is SmolLM2's
    native = tools.template_support(native_tokenizer)
    assert (native.tools, native.tool_role, native.reasoning_key, native.call_prefix) == (
        True, True, "reasoning_content", "<tool_call>\n")
    assert (native.tool_format, SMOLLM2_SUPPORT.tool_format, SMOLLM2_SUPPORT.reasoning_format) == (
        "native", "fallback", "fallback")
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    assert tools.template_support(bare).tool_format is None
    # Tools in another call syntax (Llama 3.1's bare JSON): the fallback, so replies stay readable.
    llama = copy.deepcopy(tiny_tokenizer)
    llama.chat_template = (
        "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% for c in m.tool_calls or [] %}{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}"
        "{% endfor %}{{ m.content }}<|im_end|>\n{% endfor %}")
    assert tools.template_support(llama).tool_format == "fallback"


def test_native_template_mask_by_hand(native_tokenizer):
    """Template with tools (NATIVE above), train_on_inputs false. Trained, and only these:

    1. the first assistant turn after its header: `<think>\\nNeed the weather.\\n</think>\\n`
       (reasoning, passed as reasoning_content, the key the template reads), then the call
       `<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>` and
       `<|im_end|>` (EOS): the turn has no content, only a call, and trains;
    2. the second assistant turn: `It is 18C.<|im_end|>`.
    Not trained: the system turn with the tools JSON, the user turn, the tool result (in a user turn,
    `<tool_response>` wrapped by the template), both `<|im_start|>assistant\\n` headers and the
    newline after each EOS.
    """
    tok = native_tokenizer
    got = tokenize_row(ROW, tok, train_on_inputs=False, max_seq_length=1024)
    system = ("<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n" + json.dumps(WEATHER)
              + "\n</tools><|im_end|>\n")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids, labels = pieces_of(tok, [
        (system + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nNeed the weather.\n</think>\n" + call + "<|im_end|>", True),
        ("\n<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("It is 18C.<|im_end|>", True), ("\n", False)])
    assert (got.input_ids, got.labels) == (ids, labels)
    assert trained_text(tok, got) == ["<think>\nNeed the weather.\n</think>\n" + call + "<|im_end|>",
                                      "It is 18C.<|im_end|>"]
    # the pieces add up to the template's own rendering of the whole conversation
    whole = tools.render(tok, ROW["messages"], ROW["tools"])
    assert tok.decode(got.input_ids) == whole


def test_native_results_sharing_one_turn_are_one_span(native_tokenizer):
    """Two results in one user turn (NATIVE closes it only after the last) cannot be split per
    message, so with train_on_inputs they form one span, trained only if both are: the weight-0
    second result keeps the whole `<|im_start|>user…</tool_response><|im_end|>\n` untrained."""
    second = {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    msgs = [{"role": "user", "content": "Paris and Rome?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL, second]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "21C", "weight": 0},
            {"role": "assistant", "content": "18C and 21C."}]
    got = tokenize_row({"messages": msgs, "tools": [WEATHER]}, native_tokenizer, train_on_inputs=True,
                       max_seq_length=1024)
    results = "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n21C\n</tool_response><|im_end|>\n"
    untrained = [native_tokenizer.decode([i]) for i, label in zip(got.input_ids, got.labels) if label == IGNORE]
    assert "".join(untrained) == results


def test_fallback_template_mask_by_hand(tiny_tokenizer):  # noqa: F811
    """SmolLM2's ChatML template (no tools): the fallback layout of data/tools.py. Trained:

    1. `<think>Need the weather.</think>\\n<tool_call>{"name": "get_weather", "arguments":
       {"city": "Paris"}}</tool_call><|im_end|>`: reasoning in <think>, the call as JSON, EOS;
    2. `It is 18C.<|im_end|>`.
    Not trained: the system turn (its text, then the tools preamble and the tools JSON), the user
    turn, the `tool` turn `<tool_response>18C</tool_response>`, the assistant headers and the
    newlines after each EOS.
    """
    tok = tiny_tokenizer
    got = tokenize_row(ROW, tok, train_on_inputs=False, max_seq_length=1024)
    system = ("<|im_start|>system\nBe brief.\n\n" + tools.TOOLS_PREAMBLE + "\n<tools>\n" + json.dumps(WEATHER)
              + "\n</tools><|im_end|>\n")
    first = ('<think>Need the weather.</think>\n<tool_call>{"name": "get_weather", "arguments": '
             '{"city": "Paris"}}</tool_call><|im_end|>')
    ids, labels = pieces_of(tok, [
        (system + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
        (first, True),
        ("\n<|im_start|>tool\n<tool_response>18C</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("It is 18C.<|im_end|>", True), ("\n", False)])
    assert (got.input_ids, got.labels) == (ids, labels)
    assert trained_text(tok, got) == [first, "It is 18C.<|im_end|>"]


def test_fallback_without_tool_role_wraps_results_in_one_user_turn(tiny_tokenizer):  # noqa: F811
    tok = copy.deepcopy(tiny_tokenizer)  # a template that refuses any role but system/user/assistant
    tok.chat_template = ("{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
                         "{{ raise_exception('bad role') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert not tools.template_support(tok).tool_role
    second = {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    msgs = [{"role": "user", "content": "Paris and Rome?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, second]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "21C"}]
    assert tools.render(tok, msgs, [WEATHER], generation_prompt=True).endswith(
        '<|im_start|>assistant\nChecking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>18C</tool_response>\n<tool_response>21C</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_weight_zero_user_message_is_not_trained_even_with_train_on_inputs(tiny_tokenizer):  # noqa: F811
    """train_on_inputs true trains every token, except the weight-0 user message's span
    (`<|im_start|>user\\nHi there<|im_end|>\\n`) and the weight-0 assistant message's whole turn."""
    tok = tiny_tokenizer
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there", "weight": 0},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye."},
            {"role": "assistant", "content": "Bye!", "weight": 0}]
    got = tokenize_row({"messages": msgs}, tok, train_on_inputs=True, max_seq_length=512)
    ids, labels = pieces_of(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n", True),
        ("<|im_start|>user\nHi there<|im_end|>\n", False),
        ("<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye.<|im_end|>\n", True),
        ("<|im_start|>assistant\nBye!<|im_end|>\n", False)])
    assert (got.input_ids, got.labels) == (ids, labels)


def test_malformed_call_is_a_value_error_not_a_crash(tiny_tokenizer):  # noqa: F811
    bad = copy.deepcopy(ROW)
    bad["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    with pytest.raises(ValueError, match="not JSON"):
        tokenize_row(bad, tiny_tokenizer, train_on_inputs=False, max_seq_length=512)


FORCED = '<tool_call>{"name": "f", "arguments": '


def read_all(text: str, plan: ToolPlan, step: int) -> tuple[str, list[tuple[str, str]]]:
    reader, content, calls = CallReader(plan), "", []
    for at in range(0, len(text), step):
        c, k = reader.feed(text[at:at + step])
        content, calls = content + c, calls + k
    rest, more = reader.close()
    content, calls = content + rest, calls + more
    assert [c["index"] for c in calls] == list(range(len(calls)))
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("text, plan, expected", [
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', ToolPlan([], True),
     ("", [("f", '{"a": 1}')])),
    ('Sure. <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>{"name": "g", '
     '"parameters": {"x": "y"}}</tool_call>\n', ToolPlan([], True), ("Sure.", [("f", "{}"), ("g", '{"x": "y"}')])),
    ("  a < b <tool_ca", ToolPlan([], True), ("  a < b <tool_ca", [])),  # unclosed: stays text
    ("x <tool_call>{oops}</tool_call> y", ToolPlan([], True), ("x <tool_call>{oops}</tool_call> y", [])),
    ('{"city": "Rome"}}</tool_call>', ToolPlan([], True, prefill=FORCED, forced="f"),
     ("", [("f", '{"city": "Rome"}')])),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>',
     ToolPlan([], True, parallel=False), ("", [("f", "{}")])),
    # a forced call is a call even when its arguments are not JSON, or are cut short
    ('"city": Rome}</tool_call> ok', ToolPlan([], True, prefill=FORCED, forced="f"), ("ok", [("f", '"city": Rome')])),
    ('{"city": "Ro', ToolPlan([], True, prefill=FORCED, forced="f"), ("", [("f", '{"city": "Ro')])),
])
def test_reply_reader_is_the_same_in_any_chunking(text, plan, expected):
    for step in (1, 3, len(text)):
        assert read_all(text, plan, step) == expected


def test_parquet_position_ids_split_a_packed_row():
    row = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]}
    assert split_packed(row) == [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                 {"input_ids": [8, 9], "labels": [-100, 9]}]
    assert split_packed({"input_ids": [1, 2]}) == [{"input_ids": [1, 2]}]


def test_preference_pair_with_tools_and_a_call_as_the_chosen_answer(tiny_tokenizer):  # noqa: F811
    from tunehouse.data.preference import tokenize_pair

    row = {"input": {"messages": ROW["messages"][:2], "tools": [WEATHER]},
           "preferred_output": [{"role": "assistant", "tool_calls": [CALL]}],
           "non_preferred_output": [{"role": "assistant", "content": "I cannot know."}]}
    pair = tokenize_pair(row, tiny_tokenizer, max_seq_length=1024)
    assert tiny_tokenizer.decode(pair.chosen) == tools.format_call("get_weather", {"city": "Paris"}) + "<|im_end|>"
    assert tiny_tokenizer.decode(pair.rejected) == "I cannot know.<|im_end|>"
    assert tiny_tokenizer.decode(pair.prompt) == tools.render(tiny_tokenizer, row["input"]["messages"], [WEATHER],
                                                              generation_prompt=True)
