"""Bearer-key authentication: every route except `/health` and the signed upload PUT needs one.
Wrong keys are limited per client address (`api/ratelimit.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from tunehouse.errors import Forbidden, RateLimited, Unauthorized
from tunehouse.store import keys


@dataclass(frozen=True)
class Caller:
    key_id: int
    owner: str
    is_admin: bool


def authenticate(request: Request) -> Caller:
    limiter = request.app.state.auth_limiter
    # The socket's peer; uvicorn replaces it from X-Forwarded-For only when the peer is one of its
    # trusted proxies (--forwarded-allow-ips, 127.0.0.1 by default), so a remote client cannot pick
    # its own bucket.
    address = request.client.host if request.client else "unknown"
    if wait := limiter.retry_after(address):
        raise RateLimited(f"Too many requests with a wrong API key from {address}; retry in {wait} s.",
                          headers={"Retry-After": str(wait)})
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing API key: send `Authorization: Bearer <key>` "
                           "(create one with `tunehouse keys create --owner NAME`).")
    home = request.app.state.home
    with home.db.session() as s:
        row = keys.lookup(s, token.strip())
        if row is None:
            limiter.failed(address)
            raise Unauthorized("Invalid API key. Check TUNEHOUSE_API_KEY / TOGETHER_API_KEY or create a new key.")
        return Caller(row.id, row.owner, row.is_admin)


def authenticate_admin(request: Request) -> Caller:
    caller = authenticate(request)
    if not caller.is_admin:
        raise Forbidden("This needs an admin API key (`tunehouse keys create --owner NAME --admin`).")
    return caller
