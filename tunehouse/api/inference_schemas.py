"""Wire shapes of `/v1/chat/completions` and `/v1/completions` (api-reference §7): requests, and
answers that the openai SDK, the together 3.x SDK and the strict together 1.x SDK all read.

Where the clients disagree, the together 1.x SDK ("dialect v1", its User-Agent starts with
`Together/v1`) gets its own value: a streamed choice's `logprobs` is a float for it and an object
for the others. Everything else is one shape with the union of the fields each client reads.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from tunehouse.serve.completions import Choice, Prepared
from tunehouse.serve.engine import TokenEvent


def is_together_v1(user_agent: str | None) -> bool:
    return (user_agent or "").startswith("Together/v1")


# -- requests ------------------------------------------------------------------------------------
class SamplingRequest(BaseModel):
    """Fields shared by both endpoints. Unknown fields (e.g. v3's `reasoning`) are ignored; `null`
    means "the default", as the SDKs send it."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=0, description="Tokens to generate at most; default min(512, room "
                                   "left). 0 (with echo) only scores the prompt.")
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
        None, description="bool (OpenAI chat) or the number of top log-probs.")
    top_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = Field(False, description="Answer with the prompt (`prompt[0].text`) and, with logprobs, "
                                                 "each prompt token's log-prob (`prompt[0].logprobs`).")

    def options(self) -> dict:
        """Keyword arguments for `completions.prepare`."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return dict(n=self.n or 1, max_tokens=self.max_tokens, seed=self.seed, stop=tuple(stop),
                    temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=self.top_p or 1.0, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
                    repetition_penalty=self.repetition_penalty or 1.0,
                    presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                    logprobs=self.top_k_logprobs(), echo=bool(self.echo))

    def top_k_logprobs(self) -> int | None:
        if self.logprobs is True:
            return self.top_logprobs or 0
        if self.logprobs is False or not self.logprobs:
            return None
        return min(int(self.logprobs), 20)


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


class CompletionRequest(SamplingRequest):
    prompt: str


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


def text_logprobs(tokenizer, c: Choice) -> dict:
    """OpenAI's legacy completions shape (a superset of Together's)."""
    tokens = [_token(tokenizer, t) for t in c.token_ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [{_token(tokenizer, i): v for i, v in row} for row in c.top]
    return {"tokens": tokens, "token_logprobs": c.logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_response(rid: str, prep: Prepared, choices: list[Choice], prompt: dict | None = None) -> dict:
    """`prompt` is `completions.echo`'s part when the request asked for echo."""
    want = prep.params.logprobs is not None
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": prep.model.name,
            "prompt": [prompt] if prompt else [],
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason,
                         "logprobs": chat_logprobs(prep.tokenizer, c) if want else None} for c in choices],
            "usage": usage(len(prep.prompt_ids), sum(len(c.token_ids) for c in choices))}


def completion_response(rid: str, prep: Prepared, choices: list[Choice], prompt: dict | None = None) -> dict:
    want = prep.params.logprobs is not None
    return {"id": rid, "object": "text.completion", "created": int(time.time()), "model": prep.model.name,
            **({"prompt": [prompt]} if prompt else {}),
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": text_logprobs(prep.tokenizer, c) if want else None} for c in choices],
            "usage": usage(len(prep.prompt_ids), sum(len(c.token_ids) for c in choices))}


def _stream_logprobs(prep: Prepared, ev: TokenEvent, chat: bool, v1: bool):
    if ev.logprob is None:
        return None
    if v1:
        return ev.logprob
    c = Choice(ev.index, token_ids=[ev.token_id], logprobs=[ev.logprob], top=[ev.top or []])
    return chat_logprobs(prep.tokenizer, c) if chat else text_logprobs(prep.tokenizer, c)


def chat_role_chunk(rid: str, created: int, prep: Prepared, index: int, prompt: dict | None = None) -> dict:
    """The first chunk of choice `index`: its role (and, with echo, the prompt on choice 0's)."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": prep.model.name,
            **({"prompt": [prompt]} if prompt and index == 0 else {}),
            "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}


def prompt_chunk(rid: str, created: int, prep: Prepared, prompt: dict) -> dict:
    """A text stream's first chunk when echo was asked: no text yet, the prompt part."""
    return {"id": rid, "object": "completion.chunk", "created": created, "model": prep.model.name,
            "prompt": [prompt],
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
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": prep.model.name,
            "choices": [{"index": ev.index, "delta": {"role": "assistant", "content": ev.text},
                         "finish_reason": ev.finish_reason, "logprobs": _stream_logprobs(prep, ev, True, v1)}]}


def completion_chunk(rid: str, created: int, prep: Prepared, ev: TokenEvent, v1: bool) -> dict:
    """`text` for v3 and openai, `delta.content` for v1, `token` for v3."""
    token = {"id": ev.token_id, "text": _token(prep.tokenizer, ev.token_id), "logprob": ev.logprob,
             "special": ev.token_id in prep.tokenizer.all_special_ids}
    return {"id": rid, "object": "completion.chunk", "created": created, "model": prep.model.name,
            "choices": [{"index": ev.index, "text": ev.text, "delta": {"content": ev.text}, "token": token,
                         "finish_reason": ev.finish_reason, "logprobs": _stream_logprobs(prep, ev, False, v1)}]}
