"""One error shape everywhere: `{"error": {"message", "type", "param", "code"}}`.

The v1 SDK crashes with a bare AssertionError on FastAPI's `{"detail": ...}` (api-reference §3),
so HTTP exceptions, validation errors and unexpected failures are all rendered here."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunehouse.errors import TunehouseError

log = logging.getLogger("tunehouse.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}, **extra}


def _field_path(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form", "header")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(TunehouseError)
    async def domain_error(_req: Request, exc: TunehouseError):
        body = error_body(exc.message, exc.type, exc.param, exc.code, **exc.extra)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(req: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route {req.method} {req.url.path}."
        body = error_body(message, _TYPES.get(exc.status_code, "api_error"))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req: Request, exc: RequestValidationError):
        errors = exc.errors()
        lines = [f"{_field_path(e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in errors]
        first = _field_path(errors[0]["loc"]) if errors else None
        body = error_body("Invalid request: " + "; ".join(lines), "invalid_request_error", first, "invalid_field")
        return JSONResponse(body, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_req: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"Internal error: {type(exc).__name__}: {exc}", "api_error"), status_code=500)
