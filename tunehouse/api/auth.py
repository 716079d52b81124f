"""Bearer-key authentication: every route except `/health` and the signed upload PUT needs one.
Wrong keys are limited per client address (`api/ratelimit.py`).

The dashboard signs in once (`tunehouse/web/session.py`) and its browser then sends the key in an
HttpOnly, SameSite=Strict cookie instead of the header: page scripts never hold the key, and plain
links (checkpoint downloads) carry it. A cookie-authenticated request that changes state must also
send `X-Tunehouse-Web: 1`, a header no cross-site form can set (defence beside SameSite)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from tunehouse.errors import Forbidden, RateLimited, Unauthorized
from tunehouse.store import keys


SESSION_COOKIE = "tunehouse_session"
WEB_HEADER = "x-tunehouse-web"


@dataclass(frozen=True)
class Caller:
    key_id: int
    owner: str
    is_admin: bool


def authenticate(request: Request) -> Caller:
    _check_limit(request)  # every request from a limited address, with or without a key
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header and (cookie := request.cookies.get(SESSION_COOKIE)):
        if request.method not in ("GET", "HEAD") and request.headers.get(WEB_HEADER) != "1":
            raise Forbidden("A dashboard request that changes state must send `X-Tunehouse-Web: 1`.")
        scheme, token = "bearer", cookie
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing API key: send `Authorization: Bearer <key>` "
                           "(create one with `tunehouse keys create --owner NAME`).")
    return verify_key(request, token.strip())


def verify_key(request: Request, token: str) -> Caller:
    """The caller a key belongs to; a wrong key counts against the client address's limit."""
    address = _check_limit(request)
    with request.app.state.home.db.session() as s:
        row = keys.lookup(s, token)
        if row is None:
            request.app.state.auth_limiter.failed(address)
            raise Unauthorized("Invalid API key. Check TUNEHOUSE_API_KEY / TOGETHER_API_KEY or create a new key.")
        return Caller(row.id, row.owner, row.is_admin)


def _check_limit(request: Request) -> str:
    # The socket's peer; uvicorn replaces it from X-Forwarded-For only when the peer is one of its
    # trusted proxies (--forwarded-allow-ips, 127.0.0.1 by default), so a remote client cannot pick
    # its own bucket.
    address = request.client.host if request.client else "unknown"
    if wait := request.app.state.auth_limiter.retry_after(address):
        raise RateLimited(f"Too many requests with a wrong API key from {address}; retry in {wait} s.",
                          headers={"Retry-After": str(wait)})
    return address


def authenticate_admin(request: Request) -> Caller:
    caller = authenticate(request)
    if not caller.is_admin:
        raise Forbidden("This needs an admin API key (`tunehouse keys create --owner NAME --admin`).")
    return caller
