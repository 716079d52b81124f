"""/admin/keys routes (admin keys only): list, create and revoke API keys; `tunehouse keys`
does the same on the local home without a server."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from tunehouse.api.deps import AdminCaller, SessionDep
from tunehouse.api.schemas import iso
from tunehouse.errors import InvalidInput
from tunehouse.store import keys

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"])


class KeyCreate(BaseModel):
    owner: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    admin: bool = False


def key_object(k) -> dict:
    return {"id": k.id, "object": "api_key", "prefix": k.prefix, "owner": k.owner, "admin": k.is_admin,
            "created_at": iso(k.created_at), "revoked": k.revoked}


@router.get("")
def list_keys(_admin: AdminCaller, session: SessionDep):
    return {"object": "list", "data": [key_object(k) for k in keys.list_keys(session)]}


@router.post("")
def create_key(body: KeyCreate, _admin: AdminCaller, session: SessionDep):
    """The key is in this answer only: it is stored hashed."""
    try:
        key = keys.create_key(session, body.owner, admin=body.admin)
    except ValueError as exc:
        raise InvalidInput(str(exc), param="owner") from None
    return key_object(keys.lookup(session, key)) | {"key": key}


@router.delete("/{key_ref}")
def revoke_key(key_ref: str, _admin: AdminCaller, session: SessionDep):
    """`key_ref`: the key's id, or the start of its prefix."""
    return key_object(keys.revoke(session, key_ref))
