"""Inference routes: `/v1/chat/completions` and `/v1/completions` (JSON or `text/event-stream`);
`/v1/models` is in `api/models.py`. Parse, authorise, resolve the model, call `serve.completions`, shape."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tunehouse.api import inference_schemas as wire
from tunehouse.api.deps import CurrentCaller, EngineDep, HomeDep, RegistryDep
from tunehouse.api.errors import error_body, internal_error
from tunehouse.errors import TunehouseError
from tunehouse.serve import completions, endpoints, models, tool_calls

router = APIRouter(prefix="/v1", tags=["inference"])


@router.post("/chat/completions")
async def chat_completions(body: wire.ChatRequest, caller: CurrentCaller, engine: EngineDep, home: HomeDep,
                           registry: RegistryDep, request: Request):
    if url := await _endpoint(request, home, caller.owner, body.model):
        return await endpoints.proxy(url, "/v1/chat/completions", await request.body(), dict(request.headers),
                                     request.app.state.supervisor.token)
    ref = await run_in_threadpool(models.resolve_for, home, registry, caller.owner, body.model)
    return await answer_chat(engine, ref, body, request)


@router.post("/completions")
async def text_completions(body: wire.CompletionRequest, caller: CurrentCaller, engine: EngineDep,
                           home: HomeDep, registry: RegistryDep, request: Request):
    if url := await _endpoint(request, home, caller.owner, body.model):
        return await endpoints.proxy(url, "/v1/completions", await request.body(), dict(request.headers),
                                     request.app.state.supervisor.token)
    ref = await run_in_threadpool(models.resolve_for, home, registry, caller.owner, body.model)
    return await answer_text(engine, ref, body, request)


async def answer_chat(engine, ref, body: wire.ChatRequest, request: Request):
    """Prepare (tokenise, compile the grammar: off the event loop), generate, shape; also the
    dedicated endpoint process's handler."""
    prep = await run_in_threadpool(completions.prepare, engine, ref, messages=body.messages,
                                   **body.tool_options(), **body.options())
    prep = await tool_calls.choose_forced(engine, prep)
    if body.stream:
        v1 = wire.is_together_v1(request.headers.get("user-agent"))
        return _sse(_chat_events(prep, engine, v1, body.include_usage))
    prompt = await completions.echo(engine, prep) if prep.echo else None
    return wire.chat_response(wire.new_id("chatcmpl"), prep, await completions.complete(engine, prep), prompt)


async def answer_text(engine, ref, body: wire.CompletionRequest, request: Request):
    """As `answer_chat`, for one prompt or a list of them."""
    preps = await run_in_threadpool(completions.prepare_all, engine, ref, body.prompts(), **body.options())
    if body.stream:
        v1 = wire.is_together_v1(request.headers.get("user-agent"))
        return _sse(_text_events(preps, engine, v1, body.include_usage))
    prompts = [await completions.echo(engine, p) for p in preps] if preps[0].echo else None
    choices = await completions.complete_all(engine, preps)
    return wire.completion_response(wire.new_id("cmpl"), preps, choices, prompts)


async def _endpoint(request: Request, home, owner: str, model: str) -> str | None:
    """A model name that is one of the caller's dedicated endpoints is served by its own process."""
    return await run_in_threadpool(endpoints.route_for, home, request.app.state.supervisor, owner, model)


# -- streaming -----------------------------------------------------------------------------------
def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        try:
            async with aclosing(chunks) as it:
                async for chunk in it:
                    yield f"data: {json.dumps(chunk)}\n\n"
        except TunehouseError as exc:  # a chunk with `error` makes the SDKs raise its message
            body = internal_error(exc.message) if exc.status >= 500 else error_body(exc.message, exc.type,
                                                                                      exc.param, exc.code)
            yield f"data: {json.dumps(body)}\n\n"
        except Exception as exc:  # headers are sent: the error id goes in a chunk, the detail to the log
            yield f"data: {json.dumps(internal_error(exc, 'stream'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat_events(prep: completions.Prepared, engine, v1: bool, include_usage: bool) -> AsyncIterator[dict]:
    rid, created, generated, done = wire.new_id("chatcmpl"), int(time.time()), 0, 0
    prompt = await completions.echo(engine, prep) if prep.echo else None
    for i in range(prep.n):
        yield wire.chat_role_chunk(rid, created, prep, i, prompt)
    if not prep.generates:
        for i in range(prep.n):
            yield wire.finish_chunk(rid, created, prep, i, chat=True) | (
                {"usage": wire.usage(len(prep.prompt_ids), 0)} if i == prep.n - 1 else {})
    else:
        async with aclosing(completions.stream(engine, prep)) as events:
            async for ev in events:
                generated, done = generated + 1, done + bool(ev.finish_reason)
                if ev.text or ev.finish_reason or ev.tool_calls:
                    chunk = wire.chat_chunk(rid, created, prep, ev, v1)
                    yield chunk | ({"usage": wire.usage(len(prep.prompt_ids), generated)} if done == prep.n else {})
    if include_usage:
        yield wire.usage_chunk(rid, created, prep, "chat.completion.chunk",
                               wire.usage(len(prep.prompt_ids), generated))


async def _text_events(preps: list[completions.Prepared], engine, v1: bool,
                       include_usage: bool) -> AsyncIterator[dict]:
    rid, created, generated, done = wire.new_id("cmpl"), int(time.time()), 0, 0
    prep, n, prompt_tokens = preps[0], sum(p.n for p in preps), wire.prompt_tokens(preps)
    if prep.echo:  # the prompts ride on a first, empty chunk
        yield wire.prompt_chunk(rid, created, prep, [await completions.echo(engine, p) for p in preps])
    if not prep.generates:
        for i in range(n):
            yield wire.finish_chunk(rid, created, prep, i, chat=False) | (
                {"usage": wire.usage(prompt_tokens, 0)} if i == n - 1 else {})
    else:
        async with aclosing(completions.stream_all(engine, preps)) as events:
            async for ev in events:
                generated, done = generated + 1, done + bool(ev.finish_reason)
                chunk = wire.completion_chunk(rid, created, prep, ev, v1)  # one per token: v3 reads `token`
                yield chunk | ({"usage": wire.usage(prompt_tokens, generated)} if done == n else {})
    if include_usage:
        yield wire.usage_chunk(rid, created, prep, "completion.chunk", wire.usage(prompt_tokens, generated))
