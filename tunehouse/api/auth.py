"""Bearer-key authentication: every route except `/health` and the signed upload PUT needs one."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from tunehouse.errors import Unauthorized
from tunehouse.store import keys


@dataclass(frozen=True)
class Caller:
    key_id: int
    owner: str
    is_admin: bool


def authenticate(request: Request) -> Caller:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing API key: send `Authorization: Bearer <key>` "
                           "(create one with `tunehouse keys create --owner NAME`).")
    home = request.app.state.home
    with home.db.session() as s:
        row = keys.lookup(s, token.strip())
        if row is None:
            raise Unauthorized("Invalid API key. Check TUNEHOUSE_API_KEY / TOGETHER_API_KEY or create a new key.")
        return Caller(row.id, row.owner, row.is_admin)
