"""Chat and text completions over an Engine: build the prompt (the model's own chat template),
check it fits the context, run n sequences, and collect them or hand their events to a stream.

    prep = prepare(engine, ref, messages=[...], n=1, max_tokens=64, temperature=0.7, stop=("\\n",))
    choices = await complete(engine, prep)           # or: async for event in stream(engine, prep)
    part = await echo(engine, prep)                  # the prompt with its log-probs (`echo: true`)

Several prompts in one request (`/v1/completions` with a list): `complete_all` / `stream_all` run
them side by side (one batch) and number the choices prompt by prompt, n each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from tunehouse.data import tools as tools_format
from tunehouse.errors import InvalidInput, TunehouseError
from tunehouse.serve import tool_calls
from tunehouse.serve.engine import Engine, ModelRef, TokenEvent
from tunehouse.serve.grammar import Grammar, Spec
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
    grammar: Grammar | None = None  # response_format, compiled for this model's tokenizer
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


# Keywords chat_prompt sets itself: a template variable of these names would change what is rendered.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tokenize", "add_generation_prompt", "chat_template",
                             "return_dict", "return_tensors", "continue_final_message", "tools", "documents"}


def chat_prompt(tokenizer, messages: list[dict], plan: tool_calls.ToolPlan | None = None,
                template_kwargs: dict | None = None) -> str:
    """The prompt from the model's own chat template, ending with the assistant turn's header (and a
    forced call's start); tools, tool calls and results laid out as in training (data/tools.py);
    `template_kwargs` are extra template variables (e.g. `enable_thinking`)."""
    if not messages:
        raise InvalidInput("messages is empty: send at least one message.", param="messages")
    if not tokenizer.chat_template:
        raise InvalidInput("This model has no chat template; use /v1/completions with a plain prompt.",
                           param="model")
    if clash := sorted(set(template_kwargs or {}) & _RESERVED_TEMPLATE_KWARGS):
        raise InvalidInput(f"chat_template_kwargs cannot set {clash[0]!r}: the server sets it.",
                           param="chat_template_kwargs")
    for i, m in enumerate(messages):
        tool_calls.check_message(m, f"messages[{i}]")
    try:
        return tools_format.render(tokenizer, messages, plan.tools if plan else None, generation_prompt=True,
                                   prefix=plan.prefill if plan else "", template_kwargs=template_kwargs)
    except ValueError as exc:  # e.g. an image part for this text-only model
        text = str(exc)
        raise InvalidInput(text[:1].upper() + text[1:] + ".", param="messages") from None


def prepare(engine: Engine, model: ModelRef, *, messages: list[dict] | None = None, prompt: str | None = None,
            prompt_ids: list[int] | None = None, n: int = 1, max_tokens: int | None = None, echo: bool = False,
            spec: Spec | None = None, template_kwargs: dict | None = None, truncate: bool = False,
            tools: list[dict] | None = None, tool_choice: Any = None, parallel_tool_calls: bool | None = None,
            **sampling) -> Prepared:
    """Tokenise the prompt (or take `prompt_ids` as they are), settle max_tokens and compile the
    `spec` grammar (blocking: call off the event loop). A prompt that does not fit is a 400 naming
    both numbers, unless `truncate` lowers max_tokens to the room left. `sampling` holds the other
    SamplingParams fields. max_tokens 0 (only with echo) generates nothing: the answer is the
    prompt's log-probs alone. Tool fields: serve/tool_calls.py."""
    tokenizer = engine.tokenizer(model)
    plan = tool_calls.make_plan(tokenizer, tools, tool_choice, parallel_tool_calls) if messages is not None else None
    if prompt_ids is not None:
        bad = [i for i in prompt_ids if not 0 <= i < len(tokenizer)]
        if bad:
            raise InvalidInput(f"Token id {bad[0]} is not in this model's vocabulary (0 to {len(tokenizer) - 1}).",
                               param="prompt")
        text, ids, offsets = tokenizer.decode(prompt_ids), list(prompt_ids), None
    else:
        text = chat_prompt(tokenizer, messages, plan, template_kwargs) if messages is not None else prompt or ""
        ids, offsets = encode(tokenizer, text, specials=messages is None, offsets=echo)
    if not ids:
        raise InvalidInput("The prompt is empty.", param="prompt")
    if max_tokens == 0 and not echo:
        raise InvalidInput("max_tokens 0 generates nothing: give max_tokens ≥ 1, or echo: true with logprobs "
                           "to score the prompt alone.", param="max_tokens")
    if bad := [t for t, _ in sampling.get("logit_bias", ()) if t >= len(tokenizer)]:
        raise InvalidInput(f"logit_bias names token {bad[0]}, past this model's vocabulary (0 to "
                           f"{len(tokenizer) - 1}).", param="logit_bias")
    ctx = model.context_length
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, ctx - len(ids)))
    if truncate and len(ids) < ctx:
        max_tokens = min(max_tokens, ctx - len(ids))
    if len(ids) + max_tokens > ctx:
        raise InvalidInput(
            f"The prompt is {len(ids)} tokens and max_tokens is {max_tokens}: together {len(ids) + max_tokens}, "
            f"more than the model's context length of {ctx} tokens. Shorten the prompt or lower max_tokens.",
            param="max_tokens", code="context_length_exceeded")
    grammar = engine.grammar(model, spec) if spec is not None else None
    return Prepared(model, tokenizer, ids, SamplingParams(max_tokens=max_tokens, **sampling), n, text, echo,
                    offsets, grammar, plan)


def prepare_all(engine: Engine, model: ModelRef, prompts: list[dict], **options) -> list[Prepared]:
    """`prepare` for each of several prompts (`{"prompt": text}` or `{"prompt_ids": ids}`) with the
    same options; the grammar is compiled once (cached) and shared."""
    return [prepare(engine, model, **p, **options) for p in prompts]


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
    generation = engine.submit(prep.model, prep.prompt_ids, prep.params, prep.n, prep.grammar)
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
    return await complete_all(engine, [prep])


async def complete_all(engine: Engine, preps: list[Prepared]) -> list[Choice]:
    """The choices of one or several prompts, numbered as in `stream_all`."""
    total = sum(prep.n for prep in preps)
    if not preps[0].generates:  # max_tokens 0 (echo): the same for every prompt of the request
        return [Choice(i, finish_reason="length") for i in range(total)]
    choices = [Choice(i) for i in range(total)]
    async for ev in stream_all(engine, preps):
        c = choices[ev.index]
        c.text += ev.text
        c.tool_calls += ev.tool_calls or []
        c.token_ids.append(ev.token_id)
        c.finish_reason = ev.finish_reason or c.finish_reason
        if ev.logprob is not None:
            c.logprobs.append(ev.logprob)
            c.top.append(ev.top or [])
    return choices


async def stream_all(engine: Engine, preps: list[Prepared]) -> AsyncIterator[TokenEvent]:
    """The events of several prompts' choices as they come, choice i of prompt p numbered
    p·n + i (OpenAI's order); all are submitted at once, so they share decoding steps."""
    if len(preps) == 1:
        async for event in stream(engine, preps[0]):
            yield event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, prep: Prepared):
        try:
            async for event in stream(engine, prep):
                await queue.put(replace(event, index=p * prep.n + event.index))
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(p, prep)) for p, prep in enumerate(preps)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()  # leaving early (client gone, error): each stream's finally cancels its generation
        await asyncio.gather(*tasks, return_exceptions=True)
