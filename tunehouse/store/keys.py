"""API keys: minted with a `th-` prefix, stored as SHA-256 hashes (keys are 256-bit random, so a
plain hash is enough; nothing reversible is kept), each with an owner that owns files and jobs."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse.errors import InvalidInput, NotFound
from tunehouse.store.tables import ApiKey, utcnow

PREFIX = "th-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, owner: str, *, admin: bool = False) -> str:
    """Store a new key for `owner` and return it; it is shown once and never stored in clear."""
    owner = owner.strip()
    if not owner or "/" in owner or len(owner) > 64:
        raise ValueError("owner must be 1-64 characters without '/' (it becomes part of model names)")
    key = PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(key_hash=hash_key(key), prefix=key[:10], owner=owner, is_admin=admin))
    session.flush()
    return key


def ensure_key(session: Session, key: str, owner: str, *, admin: bool = False) -> bool:
    """Store a key given from outside (the `admin_key` setting) unless its hash is stored already;
    True when this call stored it. Safe when several processes run it at once."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    row = dict(key_hash=hash_key(key), prefix=key[:10], owner=owner, is_admin=admin, revoked=False,
               created_at=utcnow())
    done = session.execute(insert(ApiKey).values(**row).on_conflict_do_nothing(index_elements=["key_hash"]))
    return done.rowcount == 1


def lookup(session: Session, key: str) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return None if row is None or row.revoked else row


def any_keys(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def find(session: Session, ref: str | int) -> ApiKey:
    """A key by its id or by the start of its prefix (what `keys list` shows); an ambiguous
    prefix is refused rather than guessed."""
    ref = str(ref).strip().rstrip("…")
    if ref.isdigit():
        row = session.get(ApiKey, int(ref))
        rows = [row] if row else []
    else:
        rows = list(session.scalars(select(ApiKey).where(ApiKey.prefix.startswith(ref, autoescape=True)))) if ref else []
    if not rows:
        raise NotFound(f"No API key with id or prefix {ref!r}; `tunehouse keys list` shows them.", param="key")
    if len(rows) > 1:
        raise InvalidInput(f"Prefix {ref!r} matches {len(rows)} keys; give the key's id.", param="key")
    return rows[0]


def revoke(session: Session, ref: str | int) -> ApiKey:
    """Revoke a key: every request with it is refused from the next one on (keys are looked up
    on each request, nothing is cached)."""
    row = find(session, ref)
    row.revoked = True
    session.flush()
    return row
