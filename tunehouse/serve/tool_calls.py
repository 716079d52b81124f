"""Tool calling at inference: what a request's `tools` / `tool_choice` / `parallel_tool_calls`
mean for the prompt, and the reply's `<tool_call>` blocks turned into OpenAI `tool_calls`.

    plan = make_plan(tokenizer, tools, tool_choice, parallel_tool_calls)   # None: no tools involved
    prompt = render(..., plan.tools, prefix=plan.prefill)                  # data/tools.py
    reader = CallReader(plan)                                              # one per choice
    content, calls = reader.feed(text_delta)   ...   reader.close()

tool_choice:
- "none": the tools are not rendered and the reply is not read for calls (plain chat).
- "auto" (the default with tools): tools rendered; well-formed calls in the reply are returned.
- {"type": "function", "function": {"name": N}}: the assistant turn is prefilled with the start
  of a call to N (`<tool_call>{"name": "N", "arguments": `), so the model writes its arguments.
- "required": the same with one tool; with several, the name is picked among the declared ones
  by the model's own probabilities of each name after `<tool_call>{"name": ` (one scoring pass,
  `choose_forced`): greedy at temperature 0, sampled at the request's temperature otherwise.
  Arguments are what the model writes; as OpenAI warns, they may not be valid JSON.

The reply is read by the same incremental reader streamed or not, so a streamed answer's deltas
add up to the non-streamed message exactly. Rules: text outside well-formed blocks is content;
whitespace next to a call is dropped; a malformed or unclosed block stays in the content as text,
except the forced call, returned as written (arguments = the text after the prefill). With
parallel_tool_calls false, calls after the first are dropped.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from dataclasses import dataclass, replace
from typing import Any

from tunehouse.data import tools as fmt
from tunehouse.data.messages import MessageChecks
from tunehouse.errors import InvalidInput


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict] | None  # rendered into the prompt; None with tool_choice "none"
    read_calls: bool  # read <tool_call> blocks back from the reply
    parallel: bool = True  # several calls per reply (parallel_tool_calls)
    prefill: str = ""  # a forced call's start, the end of the prompt
    forced: str | None = None  # the name of the forced call
    choose_from: tuple[str, ...] = ()  # "required" with several tools: the names to choose among


def make_plan(tokenizer, tools: list[dict] | None, tool_choice: Any, parallel: bool | None) -> ToolPlan | None:
    """Validate the tool fields of a chat request; None when they ask for nothing."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise InvalidInput("tool_choice needs tools: send the tools the model may call, or leave "
                               "tool_choice out.", param="tool_choice")
        return None
    _check_tools(tools)
    support = fmt.template_support(tokenizer)
    if not support.chat:
        raise InvalidInput("This model has no chat template, so it cannot be given tools.", param="tools")
    names = [t["function"]["name"] for t in tools]
    parallel = parallel is not False
    if tool_choice in (None, "auto"):
        return ToolPlan(tools, True, parallel)
    if tool_choice == "none":
        return ToolPlan(None, False)
    if tool_choice == "required":
        if len(names) == 1:
            return ToolPlan(tools, True, parallel, fmt.call_prefill(support, names[0]), names[0])
        return ToolPlan(tools, True, parallel, choose_from=tuple(dict.fromkeys(names)))
    name = _named(tool_choice)
    if name not in names:
        raise InvalidInput(f"tool_choice names the function {name!r}, which is not among the tools "
                           f"({', '.join(names)}).", param="tool_choice")
    return ToolPlan(tools, True, parallel, fmt.call_prefill(support, name), name)


def _named(choice: Any) -> str | None:
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(fn, dict)
            and isinstance(fn.get("name"), str)):
        raise InvalidInput('tool_choice must be "none", "auto", "required" or {"type": "function", '
                           '"function": {"name": "..."}}.', param="tool_choice")
    return fn["name"]


def _check_tools(tools: list[dict]) -> None:
    """The dataset checker's rules for tool definitions (data/messages.py), first problem as a 400."""
    if not tools:
        raise InvalidInput("tools is empty: list at least one tool, or leave tools out.", param="tools")
    issues: list = []
    MessageChecks(issues, set()).tools(tools, "tools")
    if issues:
        field, _, detail = issues[0]
        raise InvalidInput(f"{field}: {detail}", param=field)


async def choose_forced(engine, prep):
    """For "required" with several tools: score `<tool_call>{"name": "NAME", "arguments": ` for
    every name after the prompt, pick one (see the module docstring) and prefill its call."""
    from tunehouse.serve.completions import encode

    plan = prep.tools
    if plan is None or not plan.choose_from:
        return prep
    support = fmt.template_support(prep.tokenizer)
    starts = [fmt.call_prefill(support, name) for name in plan.choose_from]
    ids = [encode(prep.tokenizer, prep.prompt_text + s, specials=False, offsets=False)[0] for s in starts]
    common = min(len(i) for i in ids)
    for k in range(common):
        if len({i[k] for i in ids}) > 1:
            common = k
            break
    scored = [await engine.score(prep.model, i, 0) for i in ids]
    totals = [sum(s.logprobs[common:]) for s in scored]
    pick = _pick(totals, prep.params.temperature, prep.params.seed)
    room = prep.model.context_length - len(ids[pick])
    params = replace(prep.params, max_tokens=max(1, min(prep.params.max_tokens, room)))
    return replace(prep, prompt_ids=ids[pick], prompt_text=prep.prompt_text + starts[pick], params=params,
                   offsets=None, tools=replace(plan, prefill=starts[pick], forced=plan.choose_from[pick],
                                               choose_from=()))


def _pick(logps: list[float], temperature: float, seed: int | None) -> int:
    if temperature == 0:
        return max(range(len(logps)), key=logps.__getitem__)
    top = max(logps)
    weights = [math.exp((lp - top) / temperature) for lp in logps]
    return random.Random(seed).choices(range(len(logps)), weights)[0]


def new_call(name: str, arguments: dict | str, index: int) -> dict:
    """An OpenAI tool call (also the streamed delta: the SDKs accumulate it by `index`)."""
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class CallReader:
    """Reads one choice's reply as it comes: content deltas and complete calls (module docstring)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.buffer = plan.prefill  # text not yet classified
        self.space = ""  # whitespace held back: dropped next to a call, else released
        self.after_call = False
        self.calls = 0
        self.forced = plan.forced  # until the prefilled block is read: it is a call whatever follows

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content to show, calls completed) after `text` more of the reply."""
        self.buffer += text
        out, calls = [], []
        while self.buffer:
            at = self.buffer.find(fmt.CALL_OPEN)
            if at < 0:  # no block start: all but a possible partial "<tool_call" is content
                keep = _partial_open(self.buffer)
                out.append(self._content(self.buffer[:len(self.buffer) - keep]))
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            out.append(self._content(self.buffer[:at]))
            end = self.buffer.find(fmt.CALL_CLOSE, at)
            if end < 0:  # the block is still being written
                self.buffer = self.buffer[at:]
                break
            block, self.buffer = self.buffer[at:end + len(fmt.CALL_CLOSE)], self.buffer[end + len(fmt.CALL_CLOSE):]
            call = fmt.parse_call(block[len(fmt.CALL_OPEN):-len(fmt.CALL_CLOSE)])
            if call is None and not self.forced:
                out.append(self._content(block))
                continue
            self.space, self.after_call = "", True
            if self.plan.parallel or not self.calls:
                calls.append(self._call(call, block[:-len(fmt.CALL_CLOSE)]))
        return "".join(out), calls

    def close(self) -> tuple[str, list[dict]]:
        """(content, calls) still held at the end of the reply: an unclosed block stays text,
        unless it is the forced call, cut short (by max_tokens): that is returned as it stands."""
        if self.forced and self.buffer.startswith(self.plan.prefill):
            self.buffer, calls = "", [self._call(None, self.buffer)]
            return "", calls
        rest = self._content(self.buffer) if self.buffer else ""
        self.buffer = ""
        return rest + ("" if self.calls else self.space), []

    def _call(self, call: fmt.ParsedCall | None, raw: str) -> dict:
        """A call parsed, or the forced one as written: its arguments are the text after the
        prefill, less the object's closing brace (OpenAI's arguments may be invalid JSON too)."""
        if call is None:
            args = raw[len(self.plan.prefill):].rstrip()
            name, arguments = self.forced, args[:-1] if args.endswith("}") else args
        else:
            name, arguments = call.name, call.arguments
        self.forced = None
        self.calls += 1
        return new_call(name, arguments, self.calls - 1)

    def _content(self, text: str) -> str:
        if self.after_call:
            text = text.lstrip()
            if not text:
                return ""
            self.after_call = False
        stripped = text.rstrip()
        if not stripped:
            self.space += text
            return ""
        out = self.space + stripped
        self.space = text[len(stripped):]
        return out


def _partial_open(text: str) -> int:
    """Length of the longest end of `text` that begins `<tool_call>`."""
    for n in range(min(len(fmt.CALL_OPEN) - 1, len(text)), 0, -1):
        if fmt.CALL_OPEN.startswith(text[-n:]):
            return n
    return 0


def read_event(reader: CallReader, event):
    """A generated token's event as the client sees it: content outside calls, calls completed."""
    content, calls = reader.feed(event.text)
    if event.finish_reason:
        rest, more = reader.close()
        content, calls = content + rest, calls + more
    return replace(event, text=content, tool_calls=calls or None,
                   finish_reason=finish_reason(event.finish_reason, reader.calls))


def check_message(m: Any, path: str) -> None:
    """A request message has a role (any: the template decides what it renders, e.g. OpenAI's
    "developer") and well-formed tool calls, by the dataset checker's rules (first problem: 400)."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise InvalidInput(f"{path}: expected a message object with a string role.", param=f"{path}.role")
    issues: list = []
    if m["role"] == "assistant" and m.get("tool_calls") is not None:
        MessageChecks(issues, set()).tool_calls(m["tool_calls"], f"{path}.tool_calls")
    if issues:
        field, _, detail = issues[0]
        raise InvalidInput(f"{field}: {detail}", param=field)


def finish_reason(reason: str | None, calls: int) -> str | None:
    """"tool_calls" for a reply that called tools and ended by itself (not cut by max_tokens)."""
    return "tool_calls" if calls and reason in ("eos", "stop") else reason
