"""Serves the dashboard (`/`, `/static/...`) and its sign-in (`/ui/session`).

Sign-in trades an API key for an HttpOnly, SameSite=Strict cookie holding that key (see
`api/auth.py`): the key is checked on every request as a header would be, so revoking it signs
the browser out at once, and no server-side session table is needed."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from tunehouse.api.auth import SESSION_COOKIE, verify_key
from tunehouse.errors import NotFound

STATIC = Path(__file__).parent / "static"
router = APIRouter(include_in_schema=False)


class SignIn(BaseModel):
    api_key: str = Field(min_length=1, max_length=512)


@router.get("/")
def index():
    return FileResponse(STATIC / "index.html", headers=_NO_STORE)


@router.get("/static/{path:path}")
def static(path: str):
    target = (STATIC / path).resolve()
    if not target.is_relative_to(STATIC.resolve()) or not target.is_file():
        raise NotFound("No such dashboard asset.", param="path")
    return FileResponse(target, headers={"Cache-Control": "no-cache"})  # revalidated: an upgrade shows at once


@router.post("/ui/session")
def sign_in(body: SignIn, request: Request):
    caller = verify_key(request, body.api_key.strip())
    response = JSONResponse({"owner": caller.owner, "is_admin": caller.is_admin})
    response.set_cookie(SESSION_COOKIE, body.api_key.strip(), httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


@router.delete("/ui/session")
def sign_out():
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
             "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'"}
