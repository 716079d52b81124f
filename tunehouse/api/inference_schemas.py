"""Wire shapes of `/v1/chat/completions` and `/v1/completions` (api-reference §7): requests, and
answers that the openai SDK, the together 3.x SDK and the strict together 1.x SDK all read.

Every request field is acted on, accepted as metadata or refused (`inference_policy.py` holds the
table of the last two; a field nobody declared is refused).

Where the clients disagree, the together 1.x SDK ("dialect v1", its User-Agent starts with
`Together/v1`) gets its own value: a streamed choice's `logprobs` is a float for it and an object
for the others. Everything else is one shape with the union of the fields each client reads.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from tunehouse.api import inference_policy
from tunehouse.errors import InvalidInput
from tunehouse.serve.completions import Choice, Prepared
from tunehouse.serve.engine import TokenEvent
from tunehouse.serve.grammar import Spec


def is_together_v1(user_agent: str | None) -> bool:
    return (user_agent or "").startswith("Together/v1")


# -- requests ------------------------------------------------------------------------------------
class SamplingRequest(BaseModel):
    """Fields shared by both endpoints. Undeclared fields are checked against
    `inference_policy` (metadata accepted, the rest refused); `null` means "the default", as the
    SDKs send it."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=0, description="Tokens to generate at most; default min(512, room "
                                   "left). 0 (with echo) only scores the prompt.")
    max_completion_tokens: int | None = Field(None, ge=0, description="OpenAI's newer name for max_tokens.")
    # Below 1e-5 is greedy (vLLM's rule): the logits divided by it overflow float32 to inf and NaN.
    temperature: Annotated[float, AfterValidator(lambda t: 0.0 if t < 1e-5 else t)] | None = Field(
        None, ge=0, le=2, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1, description="0 = off.")
    min_p: float | None = Field(None, ge=0, le=1)
    # The sampler divides and multiplies logits by it in float32: 1e-300 would be 0 there.
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="64-bit signed.")
    n: int | None = Field(None, ge=1, le=16)
    stream: bool | None = False
    logprobs: bool | Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="bool (OpenAI chat) or the number of top log-probs (0: the chosen token's alone).")
    top_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = Field(False, description="Answer with the prompt (`prompt[0].text`) and, with logprobs, "
                                                 "each prompt token's log-prob (`prompt[0].logprobs`).")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (a string) → bias in [-100, 100] "
                                                "added to its logit; ±100 bans or forces it.")
    response_format: dict[str, Any] | None = Field(None, description="text, json_object, json_schema (OpenAI's "
                                                   "or Together's shape) or regex: the output is held to it.")
    stream_options: dict[str, Any] | None = Field(None, description="With stream: include_usage adds a last "
                                                  "chunk with the usage and no choices.")
    context_length_exceeded_behavior: Literal["error", "truncate"] | None = Field(
        None, description="Together: `truncate` lowers max_tokens to the room the prompt leaves; `error` "
                          "(the default) answers 400.")

    @field_validator("logprobs")
    @classmethod
    def _logprobs_range(cls, v):
        if v is not None and not isinstance(v, bool) and not 0 <= v <= 20:
            raise ValueError("logprobs is true/false or a number of top log-probs from 0 to 20")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not re.fullmatch(r"\d+", key):
                raise ValueError(f"logit_bias keys are token ids written as strings, e.g. \"50256\"; got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are from -100 to 100; got {bias} for token {key}")
        return v

    @model_validator(mode="after")
    def _every_field_acted_on_or_refused(self):
        inference_policy.check(self.model_extra or {}, self)
        if self.max_tokens is not None and self.max_completion_tokens not in (None, self.max_tokens):
            raise InvalidInput(f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                               f"({self.max_completion_tokens}) disagree: send one of them.",
                               param="max_completion_tokens")
        if self.top_logprobs is not None and self.logprobs is not True:
            raise InvalidInput("top_logprobs needs logprobs: true (with logprobs as a number, that number is "
                               "how many top log-probs: leave top_logprobs out).", param="top_logprobs")
        if self.stream_options is not None:
            if not self.stream:
                raise InvalidInput("stream_options is only allowed with stream: true.", param="stream_options")
            unknown = set(self.stream_options) - {"include_usage", "include_obfuscation"}
            if unknown:
                raise InvalidInput(f"stream_options has no option {sorted(unknown)[0]!r}: it takes include_usage "
                                   "(and include_obfuscation, accepted: chunks are not padded).",
                                   param="stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def options(self) -> dict:
        """Keyword arguments for `completions.prepare`."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        max_tokens = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        return dict(n=self.n or 1, max_tokens=max_tokens, seed=self.seed, stop=tuple(stop),
                    temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=self.top_p or 1.0, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
                    repetition_penalty=self.repetition_penalty or 1.0,
                    presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                    logprobs=self.top_k_logprobs(), echo=bool(self.echo),
                    logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
                    spec=response_format_spec(self.response_format),
                    truncate=self.context_length_exceeded_behavior == "truncate")

    def top_k_logprobs(self) -> int | None:
        """None: no log-probs; k: the chosen token's and the k most likely (chat: top_logprobs)."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True:
            return self.top_logprobs or 0
        return int(self.logprobs)


class ContentPart(BaseModel):
    """One part of list content; a text-only model refuses the non-text kinds with a 400."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url", "input_audio", "file"]
    text: str | None = None


class ChatMessage(BaseModel):
    """A message's role and content are checked here; its other keys (name, tool_calls,
    tool_call_id, ...) go to the chat template as sent."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


# Validated as ChatMessage (errors name `messages.<i>.<field>`), then handed on as the plain dict
# the chat template reads.
_Message = Annotated[ChatMessage, AfterValidator(lambda m: m.model_dump(exclude_unset=True))]


class ChatRequest(SamplingRequest):
    messages: list[_Message] = Field(min_length=1, max_length=4096)
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extra variables for the model's chat "
                                                        "template (e.g. enable_thinking).")
    tools: list[dict[str, Any]] | None = Field(None, description="OpenAI function tools (serve/tool_calls.py).")
    tool_choice: str | dict[str, Any] | None = Field(None, description='"none", "auto", "required" or '
                                                     '{"type": "function", "function": {"name": ...}}.')
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per reply.")

    def options(self) -> dict:
        return super().options() | {"template_kwargs": self.chat_template_kwargs or {}}

    def tool_options(self) -> dict:
        """Keyword arguments for `completions.prepare` (the deprecated function fields are refused
        by the policy table)."""
        return dict(tools=self.tools, tool_choice=self.tool_choice, parallel_tool_calls=self.parallel_tool_calls)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="One prompt, or a list of them (strings, or token ids): n choices for each, in order.")

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v):
        if isinstance(v, list) and (not v or len(v) > 128):
            raise ValueError("a list of prompts holds 1 to 128 prompts")
        return v

    def prompts(self) -> list[dict]:
        """Each prompt as `prepare` keywords: {"prompt": text} or {"prompt_ids": ids}."""
        p = self.prompt
        if isinstance(p, str):
            return [{"prompt": p}]
        if all(isinstance(x, int) for x in p):
            return [{"prompt_ids": list(p)}]
        return [{"prompt": x} if isinstance(x, str) else {"prompt_ids": list(x)} for x in p]


_FORMATS = "text, json_object, json_schema or regex"


def response_format_spec(rf: dict | None) -> Spec | None:
    """The grammar `response_format` asks for, from OpenAI's shapes (`{"type": "json_schema",
    "json_schema": {"name", "schema", "strict", "description"}}`, `{"type": "json_object"}`) or
    Together's (`{"type": "json_object" | "json_schema", "schema": {...}}`, `{"type": "regex",
    "pattern": "..."}`); None for text. Enforcement is always strict, whatever `strict` says; `name`
    and `description` are labels (the grammar, not the prompt, holds the model to the schema)."""
    if rf is None:
        return None

    def refuse(message: str):
        raise InvalidInput(f"response_format: {message}", param="response_format")

    kind = rf.get("type")
    allowed = {"text": {"type"}, "json_object": {"type", "schema"}, "json_schema": {"type", "json_schema", "schema"},
               "regex": {"type", "pattern"}}
    if kind not in allowed:
        refuse(f"type must be one of {_FORMATS}; got {kind!r}.")
    if extra := set(rf) - allowed[kind]:
        refuse(f"a {kind} format takes {sorted(allowed[kind])}, not {sorted(extra)[0]!r}.")
    if kind == "text":
        return None
    if kind == "regex":
        if not isinstance(rf.get("pattern"), str) or not rf["pattern"]:
            refuse("a regex format needs a non-empty `pattern` string.")
        return Spec.regex(rf["pattern"])
    schema = rf.get("schema")
    if kind == "json_schema" and "json_schema" in rf:
        js = rf["json_schema"]
        if not isinstance(js, dict):
            refuse("json_schema must be an object {name, schema, strict, description}.")
        if extra := set(js) - {"name", "schema", "strict", "description"}:
            refuse(f"json_schema takes name, schema, strict and description, not {sorted(extra)[0]!r}.")
        if "name" in js and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(js["name"])):
            refuse("json_schema.name is 1-64 letters, digits, underscores or dashes.")
        if js.get("strict") not in (None, True, False):
            refuse("json_schema.strict is true or false.")
        schema = js.get("schema", {})
    if schema is None:
        schema = {"type": "object"} if kind == "json_object" else None
    if not isinstance(schema, dict):
        refuse("the schema must be a JSON Schema object, e.g. {\"type\": \"object\", \"properties\": {...}}.")
    return Spec.json_schema(schema)


# -- answers -------------------------------------------------------------------------------------
def new_id(kind: Literal["chatcmpl", "cmpl"]) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _entry(tokenizer, token_id: int, lp: float) -> dict:
    text = _token(tokenizer, token_id)
    return {"token": text, "logprob": lp, "bytes": list(text.encode())}


def chat_logprobs(tokenizer, c: Choice) -> dict:
    """OpenAI's `content` list plus Together's `tokens`/`token_logprobs`."""
    tokens = [_token(tokenizer, t) for t in c.token_ids]
    content = [dict(_entry(tokenizer, t, lp), top_logprobs=[_entry(tokenizer, i, v) for i, v in top])
               for t, lp, top in zip(c.token_ids, c.logprobs, c.top)]
    return {"content": content, "tokens": tokens, "token_logprobs": c.logprobs}


def text_logprobs(tokenizer, c: Choice, k: int) -> dict:
    """OpenAI's legacy completions shape (a superset of Together's); `logprobs: 0` (k = 0) gives
    the chosen tokens' log-probs and no top list."""
    tokens = [_token(tokenizer, t) for t in c.token_ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [{_token(tokenizer, i): v for i, v in row} for row in c.top] if k else None
    return {"tokens": tokens, "token_logprobs": c.logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_response(rid: str, prep: Prepared, choices: list[Choice], prompt: dict | None = None) -> dict:
    """`prompt` is `completions.echo`'s part when the request asked for echo."""
    want = prep.params.logprobs is not None
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": prep.model.name,
            "prompt": [prompt] if prompt else [],
            "choices": [{"index": c.index, "message": _message(c),
                         "finish_reason": c.finish_reason,
                         "logprobs": chat_logprobs(prep.tokenizer, c) if want else None} for c in choices],
            "usage": usage(len(prep.prompt_ids), sum(len(c.token_ids) for c in choices))}


def _message(c: Choice) -> dict:
    """OpenAI's assistant message: content null when the reply is only tool calls."""
    if not c.tool_calls:
        return {"role": "assistant", "content": c.text}
    calls = [{k: v for k, v in call.items() if k != "index"} for call in c.tool_calls]
    return {"role": "assistant", "content": c.text or None, "tool_calls": calls}


def completion_response(rid: str, preps: list[Prepared], choices: list[Choice],
                        prompts: list[dict] | None = None) -> dict:
    """`preps`: one per prompt of the request (same model and options); `prompts`: their echo parts."""
    prep, k = preps[0], preps[0].params.logprobs
    return {"id": rid, "object": "text.completion", "created": int(time.time()), "model": prep.model.name,
            **({"prompt": prompts} if prompts else {}),
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": text_logprobs(prep.tokenizer, c, k) if k is not None else None}
                        for c in choices],
            "usage": usage(prompt_tokens(preps), sum(len(c.token_ids) for c in choices))}


def prompt_tokens(preps: list[Prepared]) -> int:
    return sum(len(p.prompt_ids) for p in preps)


def usage_chunk(rid: str, created: int, prep: Prepared, object_: str, usage_: dict) -> dict:
    """OpenAI's `stream_options.include_usage`: a last chunk with no choices and the usage."""
    return {"id": rid, "object": object_, "created": created, "model": prep.model.name, "choices": [],
            "usage": usage_}


def _stream_logprobs(prep: Prepared, ev: TokenEvent, chat: bool, v1: bool):
    if ev.logprob is None:
        return None
    if v1:
        return ev.logprob
    c = Choice(ev.index, token_ids=[ev.token_id], logprobs=[ev.logprob], top=[ev.top or []])
    return chat_logprobs(prep.tokenizer, c) if chat else text_logprobs(prep.tokenizer, c, prep.params.logprobs)


def chat_role_chunk(rid: str, created: int, prep: Prepared, index: int, prompt: dict | None = None) -> dict:
    """The first chunk of choice `index`: its role (and, with echo, the prompt on choice 0's)."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": prep.model.name,
            **({"prompt": [prompt]} if prompt and index == 0 else {}),
            "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}


def prompt_chunk(rid: str, created: int, prep: Prepared, prompts: list[dict]) -> dict:
    """A text stream's first chunk when echo was asked: no text yet, the prompt parts."""
    return {"id": rid, "object": "completion.chunk", "created": created, "model": prep.model.name,
            "prompt": prompts,
            "choices": [{"index": 0, "text": "", "delta": {"content": ""}, "finish_reason": None}]}


def finish_chunk(rid: str, created: int, prep: Prepared, index: int, chat: bool) -> dict:
    """A choice that generates nothing (max_tokens 0): its end, finish_reason `length`."""
    if chat:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": "length"}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": prep.model.name,
                "choices": [choice]}
    choice = {"index": index, "text": "", "delta": {"content": ""}, "finish_reason": "length"}
    return {"id": rid, "object": "completion.chunk", "created": created, "model": prep.model.name,
            "choices": [choice]}


def chat_chunk(rid: str, created: int, prep: Prepared, ev: TokenEvent, v1: bool) -> dict:
    delta = {"role": "assistant", "content": ev.text}
    if ev.tool_calls:  # the whole call in one delta; the SDKs accumulate calls by their index
        delta = {"role": "assistant", "content": ev.text or None, "tool_calls": ev.tool_calls}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": prep.model.name,
            "choices": [{"index": ev.index, "delta": delta,
                         "finish_reason": ev.finish_reason, "logprobs": _stream_logprobs(prep, ev, True, v1)}]}


def completion_chunk(rid: str, created: int, prep: Prepared, ev: TokenEvent, v1: bool) -> dict:
    """`text` for v3 and openai, `delta.content` for v1, `token` for v3."""
    token = {"id": ev.token_id, "text": _token(prep.tokenizer, ev.token_id), "logprob": ev.logprob,
             "special": ev.token_id in prep.tokenizer.all_special_ids}
    return {"id": rid, "object": "completion.chunk", "created": created, "model": prep.model.name,
            "choices": [{"index": ev.index, "text": ev.text, "delta": {"content": ev.text}, "token": token,
                         "finish_reason": ev.finish_reason, "logprobs": _stream_logprobs(prep, ev, False, v1)}]}
