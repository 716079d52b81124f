"""Dataset checks: every broken file in tests/data/bad is refused with its exact (line, field,
rule) list, every good file passes with its format, and the report shapes, cap, progress,
memory and parallel paths behave. Parquet files and the large files are generated in tmp_path."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunehouse.data import acceptor, jsonl, workers
from tunehouse.data.formats import DATASET_FORMATS, RULES, check_file, detect_format

DATA = Path(__file__).parent / "data"
OK = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}

# file -> expected problems as (line, field, rule), all of them, in order
BAD = {
    "empty.jsonl": [(None, None, "empty_file")],
    "whitespace_only.jsonl": [(None, None, "empty_file")],
    "bom.jsonl": [(1, None, "bom")],
    "nul_bytes.jsonl": [(2, None, "nul_byte")],
    "utf16.jsonl": [(1, None, "nul_byte"), (2, None, "nul_byte")],
    "invalid_utf8.jsonl": [(2, None, "not_utf8")],
    "truncated_last_line.jsonl": [(2, None, "truncated_json")],
    "blank_line_middle.jsonl": [(2, None, "blank_line")],
    "invalid_json.jsonl": [(2, None, "invalid_json")],
    "nan_value.jsonl": [(2, None, "invalid_json")],
    "not_object.jsonl": [(2, None, "not_object")],
    "deeply_nested.jsonl": [(2, None, "too_deep")],
    "unknown_format.jsonl": [(2, None, "unknown_format")],
    "ambiguous_format.jsonl": [(1, None, "ambiguous_format")],
    "mixed_formats.jsonl": [(3, None, "mixed_formats")],
    "extra_column.jsonl": [(1, "id", "extra_column")],
    "extra_column_instruction.jsonl": [(1, "tools", "extra_column")],
    "messages_not_list.jsonl": [(1, "messages", "wrong_type")],
    "messages_empty.jsonl": [(1, "messages", "empty_messages")],
    "message_not_object.jsonl": [(1, "messages[1]", "wrong_type")],
    "missing_role.jsonl": [(1, "messages[0].role", "missing_field")],
    "invalid_role.jsonl": [(1, "messages[0].role", "invalid_role")],
    "role_not_string.jsonl": [(1, "messages[0].role", "wrong_type")],
    "system_not_first.jsonl": [(1, "messages[1].role", "system_not_first")],
    "first_not_user.jsonl": [(1, "messages[1].role", "first_not_user")],
    "role_alternation.jsonl": [(2, "messages[2].role", "role_alternation")],
    "user_user.jsonl": [(1, "messages[1].role", "role_alternation")],
    "missing_assistant.jsonl": [(1, "messages", "missing_assistant")],
    "missing_content_user.jsonl": [(1, "messages[0].content", "missing_content")],
    "missing_content_assistant.jsonl": [(1, "messages[1].content", "missing_content")],
    "content_number.jsonl": [(1, "messages[1].content", "wrong_type")],
    "extra_message_key.jsonl": [(1, "messages[1].contnet", "extra_field")],
    "weight_bool.jsonl": [(1, "messages[1].weight", "invalid_weight")],
    "weight_two.jsonl": [(1, "messages[1].weight", "invalid_weight")],
    "weight_string.jsonl": [(1, "messages[1].weight", "wrong_type")],
    "reasoning_on_user.jsonl": [(1, "messages[0].reasoning", "misplaced_field")],
    "reasoning_not_string.jsonl": [(1, "messages[1].reasoning_content", "wrong_type")],
    "part_not_object.jsonl": [(1, "messages[0].content[0]", "wrong_type")],
    "part_bad_type.jsonl": [(1, "messages[0].content[0].type", "invalid_value")],
    "text_part_number.jsonl": [(1, "messages[0].content[0].text", "wrong_type")],
    "image_in_assistant.jsonl": [(1, "messages[1].content[0]", "image_not_user")],
    "image_http_url.jsonl": [(1, "messages[0].content[0].image_url.url", "invalid_image_url")],
    "image_gif.jsonl": [(1, "messages[0].content[0].image_url.url", "invalid_image_url")],
    "image_url_not_object.jsonl": [(1, "messages[0].content[0].image_url", "wrong_type")],
    "too_many_images_message.jsonl": [(1, "messages[0].content", "too_many_images"),
                                      (1, "messages", "too_many_images")],
    "too_many_images_sample.jsonl": [(1, "messages", "too_many_images")],
    "image_with_weight.jsonl": [(1, "messages[0].weight", "image_weight")],
    "mixed_content_kinds.jsonl": [(1, "messages[1].content", "mixed_content_kinds")],
    "image_in_completion.jsonl": [(1, "completion[0]", "image_not_user")],
    "tool_without_call.jsonl": [(1, "messages[1].role", "tool_without_call")],
    "missing_tool_result.jsonl": [(1, "messages[2].role", "missing_tool_result")],
    "tool_calls_not_list.jsonl": [(1, "messages[1].tool_calls", "wrong_type")],
    "tool_call_arguments_object.jsonl": [(1, "messages[1].tool_calls[0].function.arguments", "wrong_type")],
    "tool_call_bad_type.jsonl": [(1, "messages[1].tool_calls[0].type", "invalid_value")],
    "tool_call_missing_id.jsonl": [(1, "messages[1].tool_calls[0].id", "missing_field")],
    "tool_calls_on_user.jsonl": [(1, "messages[0].tool_calls", "misplaced_field")],
    "tools_not_list.jsonl": [(1, "tools", "wrong_type")],
    "tool_definition_no_name.jsonl": [(1, "tools[0].function.name", "missing_field")],
    "tool_call_arguments_not_json.jsonl": [(2, "messages[1].tool_calls[0].function.arguments", "invalid_arguments")],
    "tool_result_unknown_id.jsonl": [(2, "messages[2].tool_call_id", "unknown_tool_call_id")],
    "tool_result_extra.jsonl": [(2, "messages[3]", "extra_tool_result")],
    "tool_call_unknown_tool.jsonl": [(2, "messages[1].tool_calls[0].function.name", "unknown_tool")],
    "text_empty.jsonl": [(1, "text", "empty_text")],
    "text_number.jsonl": [(1, "text", "wrong_type")],
    "prompt_null.jsonl": [(1, "prompt", "wrong_type")],
    "preference_input_not_object.jsonl": [(1, "input", "wrong_type")],
    "preference_ends_with_assistant.jsonl": [(1, "input.messages[1].role", "input_ends_with_assistant")],
    "preference_two_outputs.jsonl": [(1, "preferred_output", "output_count")],
    "preference_output_user.jsonl": [(1, "non_preferred_output[0].role", "invalid_role")],
    "preference_missing_messages.jsonl": [(1, "input.messages", "missing_field")],
    "three_errors.jsonl": [(2, "messages[1].role", "role_alternation"),
                           (4, "messages[1].content", "wrong_type"), (6, None, "not_object")],
    "wrong_extension.json": [(None, None, "bad_extension")],
    "not_parquet.parquet": [(None, None, "not_parquet")],
    "ragged_rows.csv": [(3, None, "ragged_row")],
    "empty_header.csv": [(1, None, "missing_header")],
    "header_only.csv": [(None, None, "min_samples")],
}

# file -> (purpose, dataset format, samples, flags)
GOOD = {
    "chat_basic.jsonl": ("fine-tune", "CONVERSATION", 2, set()),
    "chat_tools.jsonl": ("fine-tune", "CONVERSATION", 2,
                         {"dataset_has_tools", "dataset_has_parallel_tool_calls"}),
    "chat_reasoning_weights.jsonl": ("fine-tune", "CONVERSATION", 2,
                                     {"dataset_has_reasoning", "dataset_has_message_weights"}),
    "chat_multimodal.jsonl": ("fine-tune", "CONVERSATION", 2,
                              {"dataset_is_multimodal", "dataset_has_message_weights"}),
    "instruction.jsonl": ("fine-tune", "INSTRUCTION", 3, {"dataset_is_multimodal"}),
    "text.jsonl": ("fine-tune", "GENERAL", 2, set()),
    "preference.jsonl": ("fine-tune", "PREFERENCE", 2, {"dataset_has_tools"}),
    "crlf.jsonl": ("fine-tune", "CONVERSATION", 2, set()),
    "no_final_newline.jsonl": ("fine-tune", "CONVERSATION", 2, set()),
    "eval.csv": ("eval", "CSV", 2, set()),
    "eval_free_form.jsonl": ("eval", "CONVERSATION", 2, set()),
    "batch.jsonl": ("batch-api", None, 1, set()),
}


def triples(report):
    return [(p.line, p.field, p.rule) for p in report.problems]


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_corpus_is_complete():
    on_disk = {p.name for p in (DATA / "bad").iterdir()}
    assert on_disk == set(BAD) and len(BAD) >= 45
    assert {p.name for p in (DATA / "good").iterdir()} == set(GOOD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_refused_with_line_field_rule(name):
    report = check_file(DATA / "bad" / name, "eval" if name.endswith(".csv") else "fine-tune")
    assert triples(report) == BAD[name]
    for p in report.problems:
        assert p.rule in RULES
        if p.line is not None:
            assert p.message.startswith(f"line {p.line}" + (f", {p.field}:" if p.field else ":"))


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_file_passes(name):
    purpose, fmt, samples, flags = GOOD[name]
    report = check_file(DATA / "good" / name, purpose)
    assert report.problems == []
    assert (report.dataset_format, report.num_samples, report.flags) == (fmt, samples, flags)


def test_messages_name_line_field_and_fix():
    report = check_file(DATA / "bad" / "content_number.jsonl")
    assert report.problems[0].message == (
        "line 1, messages[1].content: expected a string or a list of content parts, found a "
        "number (42). Change it to the message text.")
    weight = check_file(DATA / "bad" / "weight_bool.jsonl").problems[0].message
    assert "found a boolean (true)" in weight and "integer 1" in weight


def test_detect_format():
    assert detect_format(OK) == "CONVERSATION"
    assert detect_format({"prompt": "a", "completion": "b"}) == "INSTRUCTION"
    assert detect_format({"text": "a"}) == "GENERAL"
    assert detect_format({"input": {}, "preferred_output": [], "non_preferred_output": []}) == "PREFERENCE"
    assert detect_format({"text": "a", "messages": []}) is None
    assert detect_format([1]) is None
    assert {"CONVERSATION", "INSTRUCTION", "GENERAL", "PREFERENCE", "TOKENIZED", "CSV"} == DATASET_FORMATS


@pytest.mark.parametrize("name, purpose, rule", [
    ("eval.csv", "fine-tune", "unsupported_purpose"),
    ("chat_basic.jsonl", "fine-tune", None),
    ("eval_free_form.jsonl", "fine-tune", "unknown_format"),
])
def test_purpose_rules(name, purpose, rule):
    report = check_file(DATA / "good" / name, purpose)
    assert [p.rule for p in report.problems][:1] == ([rule] if rule else [])


def test_missing_file_and_bad_purpose(tmp_path):
    assert triples(check_file(tmp_path / "nope.jsonl")) == [(None, None, "not_found")]
    with pytest.raises(ValueError):
        check_file(tmp_path / "nope.jsonl", "pretrain")


def test_ten_megabyte_line(tmp_path):
    big = {"messages": [{"role": "user", "content": "x" * 10_000_000}, OK["messages"][1]]}
    report = check_file(write_lines(tmp_path / "big.jsonl", [OK, big, OK]))
    assert report.passed and report.num_samples == 3


def test_cap_and_truncation(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["[]"] * 30)
    report = check_file(path, max_errors=10)
    assert len(report.problems) == 10 and report.errors_truncated
    assert [p.line for p in report.problems] == list(range(1, 11))
    full = check_file(path, max_errors=30)
    assert len(full.problems) == 30 and not full.errors_truncated


def test_sdk_dict_and_validation_report():
    bad = check_file(DATA / "bad" / "three_errors.jsonl")
    d = bad.to_sdk_dict()
    for key in ("is_check_passed", "message", "found", "file_size", "utf8", "line_type", "text_field",
                "key_value", "has_min_samples", "num_samples", "load_json", "load_csv", "filetype",
                "line_number", "format", "load_parquet", "errors", "errors_truncated",
                "dataset_format", "num_lines"):
        assert key in d
    assert d["is_check_passed"] is False and d["line_number"] == 2 and d["key_value"] is False
    assert d["message"] == bad.problems[0].message and len(d["errors"]) == 3
    assert d["errors"][0] == {"line": 2, "field": "messages[1].role", "rule": "role_alternation",
                              "message": bad.problems[0].message}
    good = check_file(DATA / "good" / "chat_tools.jsonl").to_sdk_dict()
    assert good["is_check_passed"] and good["message"] == "Checks passed" and good["num_samples"] == 2
    v = check_file(DATA / "good" / "chat_tools.jsonl").to_validation_report("file-1")
    assert v["valid"] and v["dataset_format"] == "CONVERSATION" and v["file_id"] == "file-1"
    assert v["dataset_has_tools"] and v["dataset_has_parallel_tool_calls"] and not v["dataset_is_multimodal"]
    assert v["nlines"] == 2 and v["error"] is None and v["errors"] == []
    vb = bad.to_validation_report()
    assert not vb["valid"] and vb["error_type"] == "INVALID_FORMAT" and vb["error"] == d["message"]


def test_progress_and_bounded_memory(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be kind. " * 5},
                          {"role": "user", "content": f"Question {i}? " * 10},
                          {"role": "assistant", "content": f"Answer {i}. " * 20}]} for i in range(50_000)]
    path = write_lines(tmp_path / "big.jsonl", rows)
    del rows
    calls = []
    tracemalloc.start()
    report = check_file(path, progress=lambda done, total: calls.append((done, total)), workers=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = path.stat().st_size
    assert report.passed and report.num_samples == 50_000 and size > 20 * 2**20
    assert peak < 16 * 2**20  # a few chunks, not the file
    assert len(calls) >= 3 and calls[-1] == (size, size)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_parallel_report_equals_single_process(start, tmp_path, monkeypatch):
    """Blocks of 64 KiB over ~1 MB with errors, blank lines and a line crossing blocks: the
    2-process report equals the 1-process one, with forked and with spawned workers."""
    monkeypatch.setattr(workers, "_start_method", lambda: start)
    rows = []
    for i in range(3000):
        rows.append(OK)
        if i % 500 == 7:
            rows += ["", "[1]", {"prompt": "a", "completion": "b"},
                     {"messages": [{"role": "user", "content": "y" * 200_000}]}]
    path = write_lines(tmp_path / "mixed.jsonl", rows)
    monkeypatch.setattr(workers, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(workers, "SPAWN_MIN_BYTES", 0)
    monkeypatch.setattr(jsonl, "BLOCK", 64 * 2**10)
    one = check_file(path, max_errors=15, workers=1)
    two = check_file(path, max_errors=15, workers=2)
    assert one.problems and one.errors_truncated
    assert (one.problems, one.num_lines, one.num_samples, one.dataset_format, one.flags) == (
        two.problems, two.num_lines, two.num_samples, two.dataset_format, two.flags)
    assert one.problems[0].line == 9 and one.problems[0].rule == "blank_line"


# ---- the fast path (msgspec on raw lines) gives exactly the precise path's report ----

def _report(path: Path, purpose: str) -> tuple:
    r = check_file(path, purpose, max_errors=100_000, workers=1)
    return r.problems, r.num_lines, r.num_samples, r.dataset_format, r.flags


def both_paths(path: Path, purpose: str, monkeypatch) -> tuple[tuple, tuple, int]:
    """(report with the fast path, report with every line through the precise path, lines the
    fast path accepted)."""
    accepted = [0]

    def counting(fmt, purpose):
        one, run = acceptor.plain_acceptor(fmt, purpose)

        def counted_one(line):
            ok = one(line)
            accepted[0] += ok
            return ok

        def counted_run(*args):
            pos, n = run(*args)
            accepted[0] += n
            return pos, n

        return acceptor.Acceptor(counted_one, counted_run)

    with monkeypatch.context() as m:
        m.setattr(jsonl, "plain_acceptor", counting)
        fast = _report(path, purpose)
    with monkeypatch.context() as m:
        m.setattr(jsonl, "plain_acceptor", lambda fmt, purpose: acceptor.plain_acceptor(None, "fine-tune"))
        precise = _report(path, purpose)
    return fast, precise, accepted[0]


@pytest.mark.parametrize("name", sorted(n for n in {*BAD, *GOOD} if n.endswith(".jsonl")))
def test_fast_path_equals_precise_path_on_the_corpus(name, monkeypatch):
    path = DATA / ("bad" if name in BAD else "good") / name
    for purpose in ("fine-tune", "eval", "batch-api"):
        fast, precise, _ = both_paths(path, purpose, monkeypatch)
        assert fast == precise, purpose


U = b'{"role": "user", "content": "Hi"}'
A = b'{"role": "assistant", "content": "Hello."}'
S = b'{"role": "system", "content": "Be brief."}'


def conv(*msgs: bytes) -> bytes:
    return b'{"messages": [' + b", ".join(msgs) + b"]}"


EDGE_LINES = [  # near-plain rows: each is accepted by the fast path or gets the precise verdict
    conv(U, A), conv(S, U, A), conv(U, A, U), conv(U, A, U, A, U, A), conv(S, U, A, U, A),
    conv(U), conv(A), conv(S), conv(), conv(U, U, A), conv(U, S, A), conv(S, S, U, A),
    conv(A, U), conv(S, A), b'{"messages": [' + U + b", " + A + b"], \"messages\": []}",
    b'{"messages": [], "messages": [' + U + b", " + A + b"]}",  # duplicate key: the last one wins
    conv(b'{"role": "assistant", "role": "user", "content": "x"}', A),
    conv(b'{"role": "user", "content": 1, "content": "x"}', A),
    conv(b'{"r\\u006fle": "user", "content": "x"}', A), conv(b'{"role": "us\\u0065r", "content": "x"}', A),
    conv(b'{"content": "x", "role": "user"}', A), conv(b'{"role": "user", "content": ""}', A),
    conv(b'{"role": "user", "content": null}', A), conv(b'{"role": "user", "content": 3}', A),
    conv(b'{"role": "user", "content": ["x"]}', A), conv(b'{"role": "user"}', A),
    conv(b'{"role": "tool", "content": "x"}', A), conv(b'{"role": "User", "content": "x"}', A),
    conv(b'{"role": "user", "content": "x", "weight": 1}', A),
    conv(b'{"role": "user", "content": "x", "name": "bob"}', A),
    conv(b'{"role": "user", "content": "h\xffi"}', A), conv(b'{"role": "user", "content": "h\xc0\xafi"}', A),
    conv(b'{"role": "user", "content": "h\xed\xa0\x80i"}', A),  # an encoded surrogate
    conv(b'{"role": "user", "content": "h\\ud800i"}', A),  # a lone escaped surrogate
    conv(b'{"role": "user", "content": "h\\ud83d\\ude00i \xe2\x82\xac \\u00e9 \\n\\t\\"\\\\\\/"}', A),
    conv(b'{"role": "user", "content": "h\\xi"}', A), conv(b'{"role": "user", "content": "h\x01i"}', A),
    conv(b'{"role": "user", "content": "h\x7fi"}', A), conv(b'{"role": "user", "content": "\\u0000"}', A),
    b" \t" + conv(U, A) + b" \t\r", conv(U, A) + b"\x0c", conv(U, A) + b"\xc2\xa0", conv(U, A) + b" x",
    conv(U, A)[:-1] + b",]}", conv(U, A)[:-1] + b"]", conv(U, A)[:-2], conv(U, A) + b"\x00",
    b'{"messages": [' + U + b", " + A + b'], "tools": []}', b'{"messages": {}}', b"[]", b"null", b"",
    b"   ", b"\r", b'{"messages": [' + U + b", " + A + b"], \"x\": NaN}",
    b'{"prompt": "a", "completion": "b"}', b'{"prompt": "", "completion": ""}', b'{"prompt": "a"}',
    b'{"completion": "b", "prompt": "a"}', b'{"prompt": "a", "completion": 1}',
    b'{"prompt": "a", "completion": "b", "text": "c"}', b'{"text": "a"}', b'{"text": ""}', b'{"text": 1}',
    b'{"text": "\\u00e9"}', b'{"text": "a", "text": ""}', b'{"text": "", "text": "a"}',
]


@pytest.mark.parametrize("first", [conv(U, A), b'{"prompt": "a", "completion": "b"}', b'{"text": "a"}'])
def test_fast_path_equals_precise_path_on_edge_lines(first, tmp_path, monkeypatch):
    """Each format's acceptor over near-plain rows (duplicate keys, escapes, bad UTF-8, white
    space, wrong types and roles): same problems (line, field, rule, message) either way."""
    path = tmp_path / "edge.jsonl"
    path.write_bytes(b"\n".join([first, *EDGE_LINES, first]) + b"\n")
    for purpose in ("fine-tune", "eval", "batch-api"):
        fast, precise, accepted = both_paths(path, purpose, monkeypatch)
        assert fast == precise, purpose
        assert accepted >= 2, purpose  # the fast path was really taken



def test_fast_path_positional_shapes_and_long_rows(tmp_path, monkeypatch):
    """Conversations with and without a system message, around the length the positional
    shapes spell out (acceptor._PAIRS pairs), mixed in one file with near-plain rows between: the
    same report either way, and the fast path accepts every plain row, long ones included."""
    k = acceptor._PAIRS

    def turns(pairs: int, *tail: bytes) -> list[bytes]:
        return [U, A] * pairs + list(tail)

    plain = [conv(*turns(1)), conv(S, *turns(1)), conv(*turns(k)), conv(S, *turns(k)),
             conv(*turns(k - 1, U)), conv(S, *turns(k - 1, U)), conv(*turns(k, U)),
             conv(S, *turns(k, U)), conv(*turns(k + 1)), conv(S, *turns(k + 3, U)), conv(*turns(1)),
             conv(*turns(3 * k)), conv(S, *turns(2))]
    broken = [conv(*turns(k, U, U)), conv(S, *turns(k + 1, A)), conv(*turns(k + 2, S)),
              conv(*turns(k), b"null"), conv(*turns(k - 1), b"null"), conv(S, *turns(k - 1), S),
              conv(*turns(k + 1, b'{"role": "user", "content": 1}')), conv(S, S, *turns(k)),
              conv(*turns(k - 1), b'{"role": "user", "role": "assistant", "content": "x"}', A),
              conv(*turns(k), b'{"role": "assistant", "content": "x", "weight": 0}')]
    rows = [row for pair in zip(plain, broken + broken[:3]) for row in pair] + plain[::-1]
    path = tmp_path / "turns.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    fast, precise, accepted = both_paths(path, "fine-tune", monkeypatch)
    assert fast == precise
    assert accepted == 2 * len(plain) - 1  # all but line 1, read before the format is known
    assert {p.line for p in fast[0]} == set(range(2, 2 * len(plain) + 1, 2))


@pytest.mark.parametrize("first", [conv(S, U, A), conv(U, A), b'{"prompt": "a", "completion": "b"}',
                                   b'{"text": "a"}'])
def test_fast_path_whole_chunks_equal_precise_path(first, tmp_path, monkeypatch):
    """Runs of plain rows long enough for the acceptor to decode whole chunks at once
    (acceptor._decode_lines), each run ended by a near-plain row that a chunk decode meets: the
    same report either way, and every plain row took the fast path."""
    runs = 3 * acceptor._SETTLED
    rows = [first]
    for edge in EDGE_LINES:
        rows += [first] * runs + [edge]
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    monkeypatch.setattr(jsonl, "CHUNK", 4096)  # a run spans several chunks
    refused = []

    def counting(*args):
        pos, n, end = decode_lines(*args)
        refused.append(pos < args[-1])
        return pos, n, end

    decode_lines = acceptor._decode_lines
    monkeypatch.setattr(acceptor, "_decode_lines", counting)
    fast, precise, accepted = both_paths(path, "fine-tune", monkeypatch)
    assert fast == precise
    assert accepted >= len(EDGE_LINES) * runs  # every plain row but line 1 (format not yet known)
    assert sum(refused) > len(EDGE_LINES) // 2  # the near-plain rows met the chunk decode

def test_fast_path_equals_precise_path_on_mutated_rows(tmp_path, monkeypatch):
    """Plain rows with random bytes deleted, inserted or replaced (JSON syntax, escapes, bad
    UTF-8, control bytes): same report either way, and the fast path took the intact rows."""
    rng = random.Random(14)
    alphabet = [b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b" ", b"\r", b"\t", b"u", b"0",
                b"d8", b"\xff", b"\xc3", b"\x00", b"\x01", b"n", b"e", b"1", b"system", b"user"]
    rows = []
    for i in range(1500):
        shapes = [conv(S, U, A), conv(U, A, U, A), b'{"prompt": "q", "completion": "a"}']
        row = shapes[i % 3 if i < 1200 else 2]
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            k = rng.randrange(len(row) + 1)
            op = rng.random()
            if op < 0.3:
                row = row[:k] + row[k + 1:]
            elif op < 0.7:
                row = row[:k] + rng.choice(alphabet) + row[k:]
            else:
                row = row[:k] + rng.choice(alphabet) + row[k + 1:]
        rows.append(row)
    for fmt_first, name in ((conv(U, A), "chat"), (b'{"prompt": "q", "completion": "a"}', "instr")):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b"\n".join([fmt_first, *rows]) + b"\n")
        fast, precise, accepted = both_paths(path, "fine-tune", monkeypatch)
        assert fast == precise
        assert accepted > 100 and fast[0]


@pytest.mark.parametrize("chunk, block", [(1, 64), (7, 64), (64, 1000), (4096, 333)])
def test_chunk_and_block_boundaries_do_not_change_the_report(chunk, block, tmp_path, monkeypatch):
    """Lines cut anywhere by reads and blocks (a 1-byte read, lines longer than a read, blocks
    ending mid-line, CRLF, no final newline): the report equals the one of whole-file reads."""
    rng = random.Random(5)
    rows = [rng.choice([conv(S, U, A), conv(U, A, U, A), b"", b"[1]", b'{"text": "x"}',
                        conv(U, b'{"role": "assistant", "content": "' + b"y" * rng.randrange(300) + b'"}'),
                        conv(U, A) + b"\r", conv(U, U)]) for _ in range(300)]
    path = tmp_path / "cuts.jsonl"
    path.write_bytes(b"\n".join([conv(U, A), *rows]))
    whole = _report(path, "fine-tune")
    monkeypatch.setattr(jsonl, "CHUNK", chunk)
    monkeypatch.setattr(jsonl, "BLOCK", block)
    assert _report(path, "fine-tune") == whole
    assert whole[0] and whole[1] == 301


def make_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


@pytest.mark.parametrize("columns, expected", [
    ({"input_ids": [[1, 2, 3], [4, 5]], "attention_mask": [[1, 1, 1], [1, 0]],
      "labels": [[-100, 2, 3], [4, 5]], "position_ids": [[0, 1, 2], [0, 1]]}, []),
    ({"input_ids": [[1, 2, 3], [4, 5]], "position_ids": [[0, 1, 0], [0, 1]]}, []),  # two packed in row 1
    ({"input_ids": [[1, 2], [3, 4, 5], [6, 7]], "position_ids": [[0, 1], [0, 2, 3], [1, 2]]},
     [(2, "position_ids", "invalid_position_ids"), (3, "position_ids", "invalid_position_ids")]),
    ({"input_ids": [[1, 2]], "text": ["hi"]}, [(None, "text", "extra_column")]),
    ({"labels": [[1, 2]]}, [(None, "input_ids", "missing_column")]),
    ({"input_ids": [[1, 2], [3, 4], [5, 6]], "labels": [[1, 2], [3], [5, 6]]},
     [(2, "labels", "length_mismatch")]),
    ({"input_ids": [[1, 2], [3, 4], [5]], "attention_mask": [[1, 1], [1, 2], [0]]},
     [(2, "attention_mask", "invalid_mask")]),
    ({"input_ids": [[1, 2], None]}, [(2, "input_ids", "null_value")]),
    ({"input_ids": [["a"]]}, [(None, "input_ids", "wrong_type")]),
    ({"input_ids": pa.array([], type=pa.list_(pa.int64()))}, [(None, None, "min_samples")]),
])
def test_parquet(tmp_path, columns, expected):
    report = check_file(make_parquet(tmp_path / "t.parquet", columns))
    assert triples(report) == expected
    if not expected:
        assert report.dataset_format == "TOKENIZED" and report.num_samples == 2
        assert report.to_sdk_dict()["load_parquet"] is None
    else:
        assert report.to_sdk_dict()["load_parquet"] == report.problems[0].message


def test_parquet_refused_for_eval(tmp_path):
    path = make_parquet(tmp_path / "t.parquet", {"input_ids": [[1]]})
    assert triples(check_file(path, "eval")) == [(None, None, "unsupported_purpose")]
