"""Compare models on a held-out chat JSONL through the chat completions API only, so it works
against tunehouse or any compatible server (`tunehouse eval --model A --model B --file F`).

For every conversation, every assistant turn is asked given the gold history before it (as the
Together fine-tuning guide evaluates CoQA), greedily (temperature 0) with a small `max_tokens`,
and the answer is scored against the gold turn with exact match and token F1
(`evaluate/metrics.py`). Each model's validation loss on the same file comes from one
`echo: true, logprobs: 1, max_tokens: 0` request per full gold conversation (Together's prompt
logprobs, `prompt[0].logprobs`): the mean −log p over the tokens inside the gold assistant
contents, and perplexity = exp(loss). A server that returns no prompt logprobs gets loss None.

    result = compare(["base", "me/tuned"], Path("held_out.jsonl"), base_url=URL, api_key=KEY)
    console.print(results_table(result)); write_outputs(result, Path("eval-out"))
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunehouse.evaluate.metrics import score, summarise


class CompareError(RuntimeError):
    """The eval file or a server answer is unusable; the message says which and why."""


@dataclass(frozen=True)
class Question:
    conversation: int
    turn: int  # index of the assistant turn within its conversation, from 0
    history: tuple[dict, ...]  # the gold messages before the answer, ending with the user turn
    gold: str


def read_conversations(path: Path) -> list[list[dict]]:
    """The `messages` of each line of a chat JSONL file; a line with no assistant turn is an error."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            raise CompareError(f"{path} line {n}: expected a JSON object with `messages` (the chat format)") from None
        if not any(m.get("role") == "assistant" for m in messages):
            raise CompareError(f"{path} line {n}: the conversation has no assistant turn to score")
        out.append(messages)
    if not out:
        raise CompareError(f"{path} holds no conversation")
    return out


def questions(conversations: Sequence[list[dict]]) -> list[Question]:
    """One question per assistant turn, with the gold history before it."""
    out = []
    for c, messages in enumerate(conversations):
        turn = 0
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                out.append(Question(c, turn, tuple(messages[:i]), _text(m["content"])))
                turn += 1
    return out


def assistant_token_mask(rendered: str, tokens: Sequence[str], messages: Sequence[dict]) -> list[bool]:
    """Which prompt tokens fall inside the gold assistant contents of `rendered` (the prompt as
    the server's chat template wrote it). Each message's content is found in order, after the
    previous one's, so an answer that also occurs in the story is taken at its assistant turn.
    Token i covers characters [sum of earlier token lengths, + len(tokens[i])); it is selected
    when that range overlaps an assistant content. Contents not found select nothing."""
    spans, cursor = [], 0
    for m in messages:
        content = _text(m.get("content"))
        at = rendered.find(content, cursor) if content else -1
        if at < 0:
            continue
        if m["role"] == "assistant":
            spans.append((at, at + len(content)))
        cursor = at + len(content)
    mask, start = [], 0
    for tok in tokens:
        end = start + len(tok)
        mask.append(any(start < b and end > a for a, b in spans))
        start = end
    return mask


def gold_nll(prompt: dict, messages: Sequence[dict]) -> tuple[float, int] | None:
    """(Σ −log p, token count) over the assistant tokens of one echoed conversation, from a
    Together `prompt[i]` entry `{"text", "logprobs": {"tokens", "token_logprobs"}}`; None when
    the entry carries no logprobs. The first token's logprob (None: nothing precedes it) is skipped."""
    logprobs = (prompt or {}).get("logprobs") or {}
    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if not tokens or not values or not isinstance(prompt.get("text"), str):
        return None
    mask = assistant_token_mask(prompt["text"], tokens, messages)
    picked = [-v for v, keep in zip(values, mask) if keep and v is not None]
    return sum(picked), len(picked)


class ChatAPI:
    """The two calls the comparison makes, over one thread-safe httpx client."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 600.0):
        base = base_url.rstrip("/")
        self.base = base[:-3] if base.endswith("/v1") else base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout)

    def _post(self, body: dict) -> dict:
        try:
            resp = self.http.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            raise CompareError(f"Cannot reach {self.base}/v1/chat/completions ({exc}).") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:300]
            raise CompareError(f"{body['model']}: HTTP {resp.status_code}: {message}")
        return resp.json()

    def answer(self, model: str, messages: Sequence[dict], max_tokens: int) -> str:
        body = {"model": model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0}
        return _text(self._post(body)["choices"][0]["message"].get("content"))

    def gold_nll(self, model: str, messages: Sequence[dict]) -> tuple[float, int] | None:
        body = {"model": model, "messages": list(messages), "max_tokens": 0, "echo": True, "logprobs": 1,
                "temperature": 0}
        try:
            prompt = self._post(body).get("prompt")
        except CompareError:
            return None  # a server without echo may refuse max_tokens 0: loss unavailable, not fatal
        return gold_nll(prompt[0], messages) if isinstance(prompt, list) and prompt else None

    def close(self) -> None:
        self.http.close()


def compare(models: Sequence[str], path: Path, *, base_url: str, api_key: str | None, max_tokens: int = 32,
            concurrency: int = 8, console: Console | None = None,
            labels: Sequence[str] | None = None) -> dict:
    """Ask every question of `path` to every model, score the answers, compute each model's
    validation loss; returns the JSON-ready result (see `write_outputs`). `labels` name the models
    in the table and chart (default the model names). A progress bar per model is drawn on
    `console` (none when None)."""
    if not models:
        raise CompareError("give at least one model")
    conversations = read_conversations(path)
    qs = questions(conversations)
    api = ChatAPI(base_url, api_key)
    answers: dict[str, list[str | None]] = {m: [None] * len(qs) for m in models}
    nll: dict[str, list] = {m: [None] * len(conversations) for m in models}
    seconds: dict[str, float] = {}
    try:
        with _progress(console) as progress, ThreadPoolExecutor(max(1, concurrency)) as pool:
            for model in models:  # one model at a time: its bar shows its own pace and ETA
                task = progress.add_task(model, total=len(qs) + len(conversations))
                t0 = time.perf_counter()

                def run(fn: Callable, store: list, i: int, *args, _task=task) -> None:
                    store[i] = fn(*args)
                    progress.advance(_task)

                # The first question alone: the server loads the model once, not under 8 racing requests.
                run(api.answer, answers[model], 0, model, qs[0].history, max_tokens)
                jobs = [pool.submit(run, api.answer, answers[model], i, model, q.history, max_tokens)
                        for i, q in enumerate(qs) if i]
                jobs += [pool.submit(run, api.gold_nll, nll[model], i, model, conv)
                         for i, conv in enumerate(conversations)]
                for job in jobs:
                    job.result()  # re-raises the first failure
                seconds[model] = time.perf_counter() - t0
    finally:
        api.close()
    return _result(models, labels or models, path, max_tokens, qs, answers, nll, seconds)


def _result(models, labels, path, max_tokens, qs, answers, nll, seconds) -> dict:
    rows = []
    for model, label in zip(models, labels):
        scores = [score(a or "", q.gold) for a, q in zip(answers[model], qs)]
        summary = summarise(scores)
        parts = nll[model]
        loss = None
        if parts and all(p is not None for p in parts) and sum(n for _, n in parts):
            loss = sum(s for s, _ in parts) / sum(n for _, n in parts)
        rows.append({"label": label, "model": model, "exact_match": summary["exact_match"], "f1": summary["f1"],
                     "n_turns": summary["n"], "valid_loss": loss,
                     "perplexity": math.exp(loss) if loss is not None else None,
                     "seconds": round(seconds.get(model, 0.0), 1)})
    turns = [{"conversation": q.conversation, "turn": q.turn, "question": _text(q.history[-1]["content"]),
              "gold": q.gold, "answers": {m: answers[m][i] for m in models}} for i, q in enumerate(qs)]
    return {"file": str(path), "max_tokens": max_tokens, "models": rows, "turns": turns}


def _progress(console: Console | None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=console is None, transient=False)


def _text(content) -> str:
    """A message content as plain text (a list of parts keeps its text parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


# -- reporting --------------------------------------------------------------------------------
def results_table(result: dict) -> Table:
    table = Table("model", "EM", "F1", "valid loss", "perplexity", "n turns",
                  title=f"{Path(result['file']).name}: exact match and token F1, max_tokens {result['max_tokens']}")
    for r in result["models"]:
        table.add_row(r["label"], f"{r['exact_match']:.3f}", f"{r['f1']:.3f}", _fmt(r["valid_loss"]),
                      _fmt(r["perplexity"], ".2f"), str(r["n_turns"]))
    return table


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def write_outputs(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """`eval.json` (the result) and `eval.svg` (the bar chart) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, svg_path = out_dir / "eval.json", out_dir / "eval.svg"
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    svg_path.write_text(svg_chart(result), encoding="utf-8")
    return json_path, svg_path


COLOURS = ["#8c8c8c", "#2f6fdf", "#e07b28", "#3a9a4d", "#b03a9a", "#c9a227"]


def svg_chart(result: dict) -> str:
    """Grouped bars, one group per metric (EM, F1 on a 0–1 axis), one bar per model, value on
    top; a legend names the models. Plain SVG 1.1, no dependency."""
    models, metrics = result["models"], [("exact_match", "Exact match"), ("f1", "Token F1")]
    bar, gap, left, top, height = 46, 36, 50, 40, 220
    group = len(models) * bar + gap
    legends = [f"{m['label']} ({m['n_turns']} turns"
               + (f", valid loss {m['valid_loss']:.3f}" if m.get("valid_loss") is not None else "") + ")"
               for m in models]
    chart_w = left + len(metrics) * group + 20
    width = max(chart_w, left + 20 + 7 * max(len(t) for t in legends) + 10)  # ~7 px a character at 12 px
    legend_h = 22 * len(models)
    total_h = top + height + 40 + legend_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
           f'viewBox="0 0 {width} {total_h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{total_h}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14" font-weight="bold">{_esc(Path(result["file"]).name)}</text>']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + height * (1 - tick)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{chart_w - 10}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{tick:g}</text>')
    for g, (key, name) in enumerate(metrics):
        x0 = left + gap / 2 + g * group
        for i, m in enumerate(models):
            value = max(0.0, min(1.0, float(m[key])))
            h, x = height * value, x0 + i * bar
            out.append(f'<rect x="{x + 4:.1f}" y="{top + height - h:.1f}" width="{bar - 8}" height="{h:.1f}" '
                       f'fill="{COLOURS[i % len(COLOURS)]}"><title>{_esc(m["label"])}: {value:.3f}</title></rect>')
            out.append(f'<text x="{x + bar / 2:.1f}" y="{top + height - h - 4:.1f}" text-anchor="middle">'
                       f'{value:.2f}</text>')
        out.append(f'<text x="{x0 + len(models) * bar / 2:.1f}" y="{top + height + 18}" text-anchor="middle" '
                   f'font-weight="bold">{name}</text>')
    for i, text in enumerate(legends):
        y = top + height + 36 + 22 * i
        out.append(f'<rect x="{left}" y="{y}" width="14" height="14" fill="{COLOURS[i % len(COLOURS)]}"/>')
        out.append(f'<text x="{left + 20}" y="{y + 11}">{_esc(text)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _esc(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
