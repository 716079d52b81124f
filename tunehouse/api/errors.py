"""One error shape everywhere: `{"error": {"message", "type", "param", "code"}}`.

The v1 SDK crashes with a bare AssertionError on FastAPI's `{"detail": ...}` (api-reference §3),
so HTTP exceptions, validation errors and unexpected failures are all rendered here.

Unexpected failures (and domain errors with a 5xx status) never put their text on the wire: it can
hold SQL with its parameters, server paths or stack text. The client gets an error id; the log
gets the detail under the same id."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunehouse.errors import TunehouseError

log = logging.getLogger("tunehouse.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}
_ECHO_CHARS = 80  # a refused value is quoted back at most this long (a 1 MB string must not come back)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}, **extra}


def internal_error(detail: str | BaseException, where: str = "") -> dict:
    """Log `detail` under a fresh id and return the generic body naming only that id."""
    eid = uuid.uuid4().hex[:12]
    if isinstance(detail, BaseException):
        log.error("internal error %s %s", eid, where, exc_info=detail)
    else:
        log.error("internal error %s %s: %s", eid, where, detail)
    return error_body(f"Internal error (id {eid}); the server log has the details.", "api_error",
                      code="internal_error")


_WHERE = ("body", "query", "path", "form", "header")
_UNION_TAGS = ("str", "int", "float", "bool", "none")


def _field_path(loc: tuple, kind: str = "") -> str:
    """`messages.0.content` from pydantic's loc, less the union member tags it inserts
    (`str`, `list[ContentPart]`, `constrained-int`), which no client field is named. A body that
    is not JSON is `body` (its loc holds the character offset)."""
    if kind == "json_invalid":
        return "body"
    parts = [str(p) for p in loc if p not in _WHERE and not (isinstance(p, str) and _is_union_tag(p))]
    return ".".join(parts) or "body"


def _is_union_tag(part: str) -> bool:
    return part in _UNION_TAGS or "[" in part or "-" in part


def _describe(e: dict) -> str:
    if e.get("type") == "json_invalid":  # ctx.error is json's own words, with the line and column
        return f"the body is not valid JSON ({(e.get('ctx') or {}).get('error', 'decode error')})"
    return f"{e['msg']} (got {_quote(e.get('input'))})"


def _quote(value) -> str:
    text = repr(value)
    return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + "…"


def install(app: FastAPI) -> None:
    @app.exception_handler(TunehouseError)
    async def domain_error(req: Request, exc: TunehouseError):
        if exc.status >= 500:
            return JSONResponse(internal_error(exc.message, f"{req.method} {req.url.path}"), status_code=exc.status)
        body = error_body(exc.message, exc.type, exc.param, exc.code, **exc.extra)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(req: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route {req.method} {req.url.path}."
        # FastAPI's only 400 of its own: a body that is not JSON it can parse (e.g. nested too deep).
        param = "body" if exc.status_code == 400 else None
        body = error_body(message, _TYPES.get(exc.status_code, "api_error"), param)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req: Request, exc: RequestValidationError):
        errors = exc.errors()
        paths = [_field_path(e["loc"], e.get("type", "")) for e in errors]
        lines = [f"{path}: {_describe(e)}" for path, e in list(zip(paths, errors))[:5]]
        first = paths[0] if paths else None
        # A union reports each member's error; the deepest path under the first is the precise one
        # (`messages.0.content.0.type`, not the str member's `messages.0.content`).
        first = max((p for p in paths if p == first or p.startswith(first + ".")), key=len, default=first)
        body = error_body("Invalid request: " + "; ".join(lines), "invalid_request_error", first, "invalid_field")
        return JSONResponse(body, status_code=400)

    app.add_middleware(CatchUnexpected)


class CatchUnexpected:
    """Render any exception no handler took as the generic 500.

    Starlette's own catch-all (ServerErrorMiddleware) sends the 500 and then re-raises, and uvicorn
    answers a re-raised exception by closing the connection: the client's kept-alive connection
    was reset after every 500. Catching here, inside it, keeps the connection usable."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            body = internal_error(exc, f"{scope.get('method')} {scope.get('path')}")
            if not started:  # mid-stream there is nothing left to say: the body just ends
                await JSONResponse(body, status_code=500)(scope, receive, send)
