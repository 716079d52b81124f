"""Chat and text completions over an Engine: build the prompt (the model's own chat template),
check it fits the context, run n sequences, and collect them or hand their events to a stream.

    prep = prepare(engine, ref, messages=[...], n=1, max_tokens=64, temperature=0.7, stop=("\\n",))
    choices = await complete(engine, prep)           # or: async for event in stream(engine, prep)
    part = await echo(engine, prep)                  # the prompt with its log-probs (`echo: true`)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tunehouse.data import tools as tools_format
from tunehouse.errors import InvalidInput, TunehouseError
from tunehouse.serve import tool_calls
from tunehouse.serve.engine import Engine, ModelRef, TokenEvent
from tunehouse.serve.sampling import SamplingParams
from tunehouse.serve.scoring import Scored

DEFAULT_MAX_TOKENS = 512  # when the request names none (v1 completions send 512 too)


class GenerationFailed(TunehouseError):
    status = 500
    type = "api_error"


@dataclass(frozen=True)
class Prepared:
    model: ModelRef
    tokenizer: Any
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    prompt_text: str = ""  # the prompt as the model reads it (chat: the rendered template)
    echo: bool = False  # answer with the prompt and, with logprobs, its log-probs
    offsets: list[tuple[int, int]] | None = None  # each prompt token's span of prompt_text, when echoing
    tools: tool_calls.ToolPlan | None = None  # the request's tools, tool_choice, parallel_tool_calls

    @property
    def generates(self) -> bool:
        return self.params.max_tokens > 0


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)


def chat_prompt(tokenizer, messages: list[dict], plan: tool_calls.ToolPlan | None = None) -> str:
    """The prompt from the model's own chat template, ending with the assistant turn's header (and a
    forced call's start); tools, tool calls and results laid out as in training (data/tools.py)."""
    if not messages:
        raise InvalidInput("messages is empty: send at least one message.", param="messages")
    if not tokenizer.chat_template:
        raise InvalidInput("This model has no chat template; use /v1/completions with a plain prompt.",
                           param="model")
    for i, m in enumerate(messages):
        tool_calls.check_message(m, f"messages[{i}]")
    try:
        return tools_format.render(tokenizer, messages, plan.tools if plan else None, generation_prompt=True,
                                   prefix=plan.prefill if plan else "")
    except ValueError as exc:  # e.g. an image part for this text-only model
        text = str(exc)
        raise InvalidInput(text[:1].upper() + text[1:] + ".", param="messages") from None


def prepare(engine: Engine, model: ModelRef, *, messages: list[dict] | None = None, prompt: str | None = None,
            n: int = 1, max_tokens: int | None = None, echo: bool = False, tools: list[dict] | None = None,
            tool_choice: Any = None, parallel_tool_calls: bool | None = None, **sampling) -> Prepared:
    """Tokenise the prompt and settle max_tokens; a prompt that does not fit is a 400 naming both
    numbers. `sampling` holds the other SamplingParams fields. max_tokens 0 (only with echo)
    generates nothing: the answer is the prompt's log-probs alone. Tool fields: serve/tool_calls.py."""
    tokenizer = engine.tokenizer(model)
    plan = tool_calls.make_plan(tokenizer, tools, tool_choice, parallel_tool_calls) if messages is not None else None
    text = chat_prompt(tokenizer, messages, plan) if messages is not None else prompt or ""
    ids, offsets = encode(tokenizer, text, specials=messages is None, offsets=echo)
    if not ids:
        raise InvalidInput("The prompt is empty.", param="prompt")
    if max_tokens == 0 and not echo:
        raise InvalidInput("max_tokens 0 generates nothing: give max_tokens ≥ 1, or echo: true with logprobs "
                           "to score the prompt alone.", param="max_tokens")
    ctx = model.context_length
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, ctx - len(ids)))
    if len(ids) + max_tokens > ctx:
        raise InvalidInput(
            f"The prompt is {len(ids)} tokens and max_tokens is {max_tokens}: together {len(ids) + max_tokens}, "
            f"more than the model's context length of {ctx} tokens. Shorten the prompt or lower max_tokens.",
            param="max_tokens", code="context_length_exceeded")
    return Prepared(model, tokenizer, ids, SamplingParams(max_tokens=max_tokens, **sampling), n, text, echo,
                    offsets, plan)


def encode(tokenizer, text: str, *, specials: bool,
           offsets: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of `text` (with the tokenizer's added specials, e.g. BOS, when `specials`: a chat
    template writes its own) and, when `offsets`, each token's character span (None from a slow
    tokenizer, which has no offsets)."""
    if offsets:
        try:
            enc = tokenizer(text, add_special_tokens=specials, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, TypeError):
            pass
    return tokenizer.encode(text, add_special_tokens=specials), None


def token_pieces(tokenizer, text: str, ids: list[int], offsets: list[tuple[int, int]] | None) -> list[str]:
    """The characters of `text` each token of `ids` covers; they concatenate to `text` exactly
    (a character split over several byte-level tokens goes to its first), so a client can map
    prompt log-probs back onto the text. Per-token decoding when there are no offsets."""
    if offsets is None:
        return [tokenizer.decode([i]) for i in ids]
    starts, at = [], 0
    for begin, _ in offsets:
        at = max(at, begin)  # special tokens report (0, 0); keep the starts non-decreasing
        starts.append(at)
    ends = starts[1:] + [len(text)]
    return [text[a:b] for a, b in zip(starts, ends)]


async def echo(engine: Engine, prep: Prepared) -> dict:
    """Together's `prompt[0]`: the prompt text and, when logprobs were asked, each prompt token's
    log-prob (None for the first: nothing precedes it) and top alternatives."""
    if prep.params.logprobs is None:
        return {"text": prep.prompt_text}
    k = prep.params.logprobs
    try:
        scored: Scored = await engine.score(prep.model, prep.prompt_ids, k)
    except Exception as exc:
        raise GenerationFailed(f"Scoring the prompt failed: {exc}") from exc
    logprobs = {"tokens": token_pieces(prep.tokenizer, prep.prompt_text, prep.prompt_ids, prep.offsets),
                "token_logprobs": scored.logprobs, "token_ids": list(prep.prompt_ids)}
    if k:
        logprobs["top_logprobs"] = [{prep.tokenizer.decode([i]): v for i, v in row} or None for row in scored.top]
    return {"text": prep.prompt_text, "logprobs": logprobs}


async def stream(engine: Engine, prep: Prepared) -> AsyncIterator[TokenEvent]:
    """The events of all n choices as they come; leaving early (client gone) stops generation."""
    generation = engine.submit(prep.model, prep.prompt_ids, prep.params, prep.n)
    reading = prep.tools is not None and prep.tools.read_calls
    readers = [tool_calls.CallReader(prep.tools) for _ in range(prep.n)] if reading else []
    try:
        async for event in generation:
            if event.error:
                raise GenerationFailed(f"Generation failed: {event.error}")
            yield tool_calls.read_event(readers[event.index], event) if readers else event
    finally:
        generation.cancel()


async def complete(engine: Engine, prep: Prepared) -> list[Choice]:
    if not prep.generates:
        return [Choice(i, finish_reason="length") for i in range(prep.n)]
    choices = [Choice(i) for i in range(prep.n)]
    async for ev in stream(engine, prep):
        c = choices[ev.index]
        c.text += ev.text
        c.tool_calls += ev.tool_calls or []
        c.token_ids.append(ev.token_id)
        c.finish_reason = ev.finish_reason or c.finish_reason
        if ev.logprob is not None:
            c.logprobs.append(ev.logprob)
            c.top.append(ev.top or [])
    return choices
