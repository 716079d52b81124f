"""Model comparison through the chat API: the pure token selection for the validation loss with
hand-worked answers, then `compare` end to end against a fake chat server on a loopback port
(two scripted "models" and one server without echo support)."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tunehouse.api.server import serve_in_thread
from tunehouse.evaluate.compare import (
    CompareError, assistant_token_mask, compare, gold_nll, questions, read_conversations, results_table, write_outputs,
)

CONVS = [
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Tom has a red ball.\n\nWhat colour is the ball?"},
     {"role": "assistant", "content": "red"},
     {"role": "user", "content": "Who has it?"},
     {"role": "assistant", "content": "Tom"}],
    [{"role": "user", "content": "Mia sailed to Crete.\n\nWhere did Mia sail?"},
     {"role": "assistant", "content": "Crete"}],
]


def render(messages) -> str:
    """A ChatML-like template, as the fake server 'renders' prompts."""
    return "".join(f"<{m['role']}>{m['content']}</s>" for m in messages)


def test_questions_carry_the_gold_history():
    qs = questions(CONVS)
    assert [(q.conversation, q.turn, q.gold) for q in qs] == [(0, 0, "red"), (0, 1, "Tom"), (1, 0, "Crete")]
    assert qs[1].history == tuple(CONVS[0][:4]) and qs[1].history[-1]["content"] == "Who has it?"


def test_assistant_token_mask_hand_worked():
    """Rendered "<user>Tom red</s><assistant>red</s>": the first "red" (in the user turn) is not
    selected, the answer is. Tokens: "<user>" 0–6, "Tom" 6–9, " red" 9–13, "</s>" 13–17,
    "<assistant>" 17–28, "re" 28–30, "d</s>" 30–34 (overlaps the answer 28–31, so selected)."""
    msgs = [{"role": "user", "content": "Tom red"}, {"role": "assistant", "content": "red"}]
    text = render(msgs)
    tokens = ["<user>", "Tom", " red", "</s>", "<assistant>", "re", "d</s>"]
    assert "".join(tokens) == text
    assert assistant_token_mask(text, tokens, msgs) == [False, False, False, False, False, True, True]


def test_gold_nll_skips_the_first_none_and_unselected_tokens():
    """Selected tokens "re" (−0.5) and "d</s>" (−1.5): Σ −log p = 2.0 over 2 tokens."""
    msgs = [{"role": "user", "content": "Tom red"}, {"role": "assistant", "content": "red"}]
    prompt = {"text": render(msgs), "logprobs": {
        "tokens": ["<user>", "Tom", " red", "</s>", "<assistant>", "re", "d</s>"],
        "token_logprobs": [None, -3.0, -2.0, -1.0, -0.1, -0.5, -1.5]}}
    assert gold_nll(prompt, msgs) == (2.0, 2)
    assert gold_nll({"text": "x"}, msgs) is None
    assert gold_nll({"text": "x", "logprobs": {"tokens": [], "token_logprobs": []}}, msgs) is None


def fake_chat_server(echo: bool = True):
    """'oracle' answers with the gold (read from the story: the word after "has a" / the name /
    the place), 'chatty' wraps a wrong guess in a sentence. Echo returns one token per character,
    each with log p = −0.1 (oracle) or −1.0 (chatty)."""
    app = FastAPI()
    gold = {"What colour is the ball?": "red", "Who has it?": "Tom", "Where did Mia sail?": "Crete"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        assert request.headers["authorization"] == "Bearer k"
        if body["model"] not in ("oracle", "chatty"):
            return JSONResponse({"error": {"message": f"model {body['model']} not found"}}, status_code=404)
        if body.get("echo"):
            if not echo:
                return {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""}}]}
            text = render(body["messages"])
            lp = -0.1 if body["model"] == "oracle" else -1.0
            return {"prompt": [{"text": text, "logprobs": {"tokens": list(text),
                                                           "token_logprobs": [None] + [lp] * (len(text) - 1)}}],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}}]}
        assert body["temperature"] == 0 and body["max_tokens"] == 7
        question = re.split(r"\n\n", body["messages"][-1]["content"])[-1]
        if body["model"] == "oracle":
            content = f"The {gold[question]}."
        else:
            content = "I think the answer is Tom, as the story says."
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}

    return serve_in_thread(app)


@pytest.fixture
def held_out(tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    return path


def test_compare_end_to_end(held_out, tmp_path):
    """oracle: all 3 exact. chatty: "I think the answer is Tom, as the story says." normalises to
    8 tokens (both "the" dropped); vs "Tom" F1 = 2·(1/8)·1/(1/8+1) = 2/9, vs "red"/"Crete" 0:
    EM 0, F1 (2/9)/3.
    Loss: every selected character has −log p 0.1 (oracle) / 1.0 (chatty)."""
    bg = fake_chat_server()
    try:
        result = compare(["oracle", "chatty"], held_out, base_url=bg.url + "/v1", api_key="k", max_tokens=7,
                         concurrency=3, labels=["fine-tuned", "base"])
    finally:
        bg.stop()
    oracle, chatty = result["models"]
    assert (oracle["label"], oracle["exact_match"], oracle["f1"], oracle["n_turns"]) == ("fine-tuned", 1.0, 1.0, 3)
    assert chatty["exact_match"] == 0.0 and chatty["f1"] == pytest.approx(2 / 27)
    assert oracle["valid_loss"] == pytest.approx(0.1) and oracle["perplexity"] == pytest.approx(math.exp(0.1))
    assert chatty["valid_loss"] == pytest.approx(1.0)
    assert result["turns"][1]["answers"] == {"oracle": "The Tom.", "chatty": "I think the answer is Tom, as the story says."}

    json_path, svg_path = write_outputs(result, tmp_path / "out")
    assert json.loads(json_path.read_text())["models"][0]["model"] == "oracle"
    svg = ET.fromstring(svg_path.read_text())
    assert svg.tag.endswith("svg") and len([e for e in svg if e.tag.endswith("rect")]) == 1 + 4 + 2
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(results_table(result))
    text = console.export_text()
    assert "fine-tuned" in text and "1.000" in text and "0.1000" in text


def test_server_without_echo_gives_no_loss(held_out):
    bg = fake_chat_server(echo=False)
    try:
        result = compare(["chatty"], held_out, base_url=bg.url, api_key="k", max_tokens=7)
        with pytest.raises(CompareError, match="nope: HTTP 404: model nope not found"):
            compare(["nope"], held_out, base_url=bg.url, api_key="k", max_tokens=7)
    finally:
        bg.stop()
    assert result["models"][0]["valid_loss"] is None and result["models"][0]["perplexity"] is None
    assert result["models"][0]["n_turns"] == 3


def test_read_conversations_refuses_other_formats(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(CompareError, match="line 1: expected a JSON object with `messages`"):
        read_conversations(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(CompareError, match="no assistant turn"):
        read_conversations(bad)


def test_eval_command(held_out, tmp_path):
    """`tunehouse eval` prints the table (or JSON) and writes eval.json and eval.svg."""
    from typer.testing import CliRunner

    from tunehouse.cli import app

    bg = fake_chat_server()
    try:
        args = ["eval", "--model", "chatty", "--model", "oracle", "--file", str(held_out), "--base-url", bg.url,
                "--api-key", "k", "--max-tokens", "7", "--concurrency", "2", "--out", str(tmp_path / "o")]
        as_json = CliRunner().invoke(app, args + ["--json"])
        as_table = CliRunner().invoke(app, args, env={"COLUMNS": "160"})
        missing = CliRunner().invoke(app, ["eval", "--model", "nope", "--file", str(held_out), "--base-url", bg.url,
                                           "--api-key", "k"])
    finally:
        bg.stop()
    assert as_json.exit_code == 0, as_json.output
    out = json.loads(as_json.stdout)
    assert [(m["model"], m["exact_match"]) for m in out["models"]] == [("chatty", 0.0), ("oracle", 1.0)]
    assert (tmp_path / "o" / "eval.json").is_file() and (tmp_path / "o" / "eval.svg").is_file()
    assert as_table.exit_code == 0 and "oracle" in as_table.stdout and "1.000" in as_table.stdout
    assert missing.exit_code == 1 and "model nope not found" in missing.output
