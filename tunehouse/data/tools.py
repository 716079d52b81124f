"""Tool calls and reasoning in chat templates: ONE rendering, used by training and inference.

`render(tokenizer, messages, tools)` turns OpenAI-shaped messages (assistant `tool_calls`, `tool`
messages, `reasoning` / `reasoning_content`) and a `tools` list into the text the model reads.
Training (data/tokenize.py) and serving (serve/completions.py) both call it, so a fine-tune sees
at inference exactly the layout it was trained on; `parse_calls` reads calls back from a reply.

What a template can do is found by rendering probe conversations (`template_support`), not by
reading its source:

- native tools: the template renders `tools`, and an assistant `tool_calls` entry comes out as a
  `<tool_call>` block holding `{"name": ..., "arguments": {...}}` (Hermes / Qwen2.5 / Qwen3 style).
  Then messages and tools go to the template as they are (arguments as objects, as HF templates
  expect). A template with its own, different call syntax (Llama 3.1's bare JSON, Mistral's
  `[TOOL_CALLS]`) gets the fallback below instead, so that what the model learns to write is what
  `parse_calls` reads.
- fallback (SmolLM2, the tiny test model, any template without tools), exactly:

      system turn: [the system message's content + "\\n\\n"] + TOOLS_PREAMBLE + "\\n<tools>\\n"
                   + one json.dumps(tool) per line + "\\n</tools>"
                   (a system message is added when the conversation has none)
      assistant:   ["<think>" + reasoning + "</think>\\n"] + [content]
                   + for each call, "\\n" between parts:
                     '<tool_call>{"name": NAME, "arguments": ARGUMENTS_OBJECT}</tool_call>'
      tool result: "<tool_response>" + content + "</tool_response>" as a `tool` turn; where the
                   template has no tool role, consecutive results share one user turn, joined
                   by "\\n".

- reasoning: passed to the template under the key it renders (`reasoning_content`, `reasoning`
  or `thinking`, found by probing); otherwise the fallback `<think>…</think>\\n` before the content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOLS_PREAMBLE = (
    "You can call the tools below. Their JSON schemas are listed between <tools> and </tools>. "
    "To call one, write <tool_call>{\"name\": TOOL_NAME, \"arguments\": {ARGUMENTS}}</tool_call>, "
    "one block per call; each result comes back between <tool_response> and </tool_response>."
)
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # as templates name it
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class TemplateSupport:
    """What a chat template renders by itself (see the module docstring)."""

    chat: bool  # there is a chat template at all
    tools: bool  # native `tools` + `tool_calls` as <tool_call> JSON blocks
    tool_role: bool  # `tool` role messages render (as their own turn)
    reasoning_key: str | None  # message key the template renders reasoning from
    call_prefix: str = CALL_OPEN  # text from <tool_call> up to the JSON object ("<tool_call>\n" in Qwen's)

    @property
    def tool_format(self) -> str | None:
        return None if not self.chat else "native" if self.tools else "fallback"

    @property
    def reasoning_format(self) -> str | None:
        return None if not self.chat else "native" if self.reasoning_key else "fallback"


def message_reasoning(m: dict) -> str | None:
    """An assistant message's reasoning, from either key datasets and clients use."""
    return m.get("reasoning_content") or m.get("reasoning") or None


def text_of(content: Any) -> str:
    """Message content as text: a string, null (""), or a list of text parts (text-only models)."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"This model reads text only; a content part of type {kind!r} cannot be used")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def call_arguments(call: dict) -> dict:
    """A tool call's arguments as an object (the wire carries them as a JSON string)."""
    fn = call.get("function") or {}
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as exc:
            raise ValueError(f"the arguments of the call to {fn.get('name')!r} are not JSON ({exc})") from None
    if not isinstance(args, dict):
        raise ValueError(f"the arguments of the call to {fn.get('name')!r} must be a JSON object")
    return args


def format_call(name: str, arguments: dict) -> str:
    """One call in the fallback format."""
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CALL_CLOSE


def call_prefill(support: TemplateSupport, name: str) -> str:
    """The start of a call to `name`, up to its arguments: what a forced call prefills."""
    return support.call_prefix + '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


# -- rendering -------------------------------------------------------------------------------------
def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, *,
           generation_prompt: bool = False, prefix: str = "", template_kwargs: dict | None = None) -> str:
    """The chat template's text for `messages` (+ `tools`), ending with the assistant header when
    `generation_prompt`, then `prefix` (a forced call's start). ValueError on a malformed call."""
    support = template_support(tokenizer)
    if not support.chat:
        raise ValueError("the model has no chat template")
    msgs, tools_arg = template_inputs(messages, tools or None, support)
    if not msgs and not generation_prompt:
        return ""
    kwargs = ({"tools": tools_arg} if tools_arg else {}) | (template_kwargs or {})
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
    return text + prefix


def template_inputs(messages: list[dict], tools: list[dict] | None,
                    support: TemplateSupport) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to hand the template: as they are where it supports them natively, in
    the fallback layout of the module docstring where it does not."""
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "assistant":
            out.append(_assistant(m, support))
        elif role == "tool" and not support.tools:
            body = RESPONSE_OPEN + text_of(m.get("content")) + RESPONSE_CLOSE
            if support.tool_role:
                out.append({"role": "tool", "content": body})
            elif out and out[-1].get("_results"):
                out[-1]["content"] += "\n" + body
            else:
                out.append({"role": "user", "content": body, "_results": True})
        else:
            msg = {"role": role, "content": text_of(m.get("content"))}
            for key in ("tool_call_id", "name"):
                if support.tools and key in m:
                    msg[key] = m[key]
            out.append(msg)
    out = [{k: v for k, v in m.items() if k != "_results"} for m in out]
    if not tools or support.tools:
        return out, tools
    block = TOOLS_PREAMBLE + "\n<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + "\n</tools>"
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" if out[0]["content"] else "") + block}
    else:
        out.insert(0, {"role": "system", "content": block})
    return out, None


def _assistant(m: dict, support: TemplateSupport) -> dict:
    content = text_of(m.get("content"))
    reasoning = message_reasoning(m)
    calls = m.get("tool_calls") or []
    if support.tools:
        msg: dict = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
                "name": c["function"]["name"], "arguments": call_arguments(c)}} for c in calls]
    else:
        parts = [content] if content else []
        parts += [format_call(c["function"]["name"], call_arguments(c)) for c in calls]
        msg = {"role": "assistant", "content": "\n".join(parts)}
    if reasoning and support.reasoning_key:
        msg[support.reasoning_key] = reasoning
    elif reasoning:
        msg["content"] = THINK_OPEN + reasoning + THINK_CLOSE + "\n" + msg["content"]
    return msg


# -- what a template supports ------------------------------------------------------------------------
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_q7", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}
_PROBE_CALL = {"id": "call_probe", "type": "function",
               "function": {"name": "probe_fn_q7", "arguments": {"probe_arg": "probe_val_q7"}}}
_cache: dict[str, TemplateSupport] = {}


def template_support(tokenizer) -> TemplateSupport:
    """Probe the tokenizer's chat template once (cached by the template's text)."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:  # None, or a dict of named templates
        template = json.dumps(template, sort_keys=True) if template else ""
    if template not in _cache:
        _cache[template] = _probe(tokenizer) if template else TemplateSupport(False, False, False, None)
    return _cache[template]


def _try(tokenizer, messages: list[dict], **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception:  # a template may raise on what it does not support: that is the answer
        return ""


def _probe(tokenizer) -> TemplateSupport:
    user = {"role": "user", "content": "probe question"}
    text = _try(tokenizer, [user, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
                            {"role": "tool", "tool_call_id": "call_probe", "content": "probe_result_q7"}],
                tools=[_PROBE_TOOL])
    calls = parse_calls(text).calls
    native = ("probe_tool_q7" in text and "probe_result_q7" in text and len(calls) == 1
              and calls[0].name == "probe_fn_q7" and calls[0].arguments == {"probe_arg": "probe_val_q7"})
    prefix = CALL_OPEN
    if native:
        start = text.index(CALL_OPEN)
        prefix = text[start:text.index("{", start)]
    role_text = _try(tokenizer, [user, {"role": "assistant", "content": "probe answer"},
                                 {"role": "tool", "content": "probe_result_q7"}])
    reasoning_key = None
    for key in REASONING_KEYS:
        if "probe_reasoning_q7" in _try(tokenizer, [user, {"role": "assistant", "content": "probe answer",
                                                           key: "probe_reasoning_q7"}]):
            reasoning_key = key
            break
    return TemplateSupport(True, native, "probe_result_q7" in role_text, reasoning_key, prefix)


# -- reading calls back -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class Parsed:
    content: str  # the reply without its well-formed call blocks, stripped
    calls: list[ParsedCall]


def parse_call(block: str) -> ParsedCall | None:
    """The inside of one <tool_call> block, or None when it is not a well-formed call."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ParsedCall(obj["name"], args) if isinstance(args, dict) else None


def parse_calls(text: str) -> Parsed:
    """Well-formed `<tool_call>` blocks become calls; malformed or unclosed ones stay in the
    content as text (a reply is never lost because a call did not parse)."""
    calls: list[ParsedCall] = []
    kept: list[str] = []
    at = 0
    for match in _CALL_RE.finditer(text):
        call = parse_call(match.group(1))
        if call is None:
            continue
        calls.append(call)
        kept.append(text[at:match.start()])
        at = match.end()
    kept.append(text[at:])
    return Parsed("".join(kept).strip() if calls else text, calls)
