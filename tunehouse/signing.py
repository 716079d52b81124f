"""Signed, expiring upload tokens for the unauthenticated `PUT` of the upload flow.

token = base64url(json payload) "." base64url(HMAC-SHA256(secret, payload)). The payload names the
file, the part (0 for a single-part upload), the expiry and a nonce stored on the file row; the
server clears the nonce once the bytes are in, which makes each token single-use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path


def load_or_create_secret(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    os.replace(tmp, path)
    return secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: bytes, file_id: str, nonce: str, ttl_s: int, part: int = 0) -> str:
    payload = json.dumps({"f": file_id, "n": nonce, "p": part, "e": int(time.time()) + ttl_s}).encode()
    mac = hmac.new(secret, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


MAX_TOKEN_CHARS = 512  # ours are ~170; anything much longer is not one of ours


def verify(secret: bytes, token: str, file_id: str, part: int = 0) -> str:
    """Return the token's nonce if it is authentic, unexpired and for this file and part;
    raise ValueError with the reason otherwise. The signature is checked before the payload is
    parsed: only bytes this server signed ever reach the JSON parser."""
    body, _, mac = token.partition(".")
    if not mac or len(token) > MAX_TOKEN_CHARS:
        raise ValueError("malformed upload token")
    try:
        payload, given = _unb64(body), _unb64(mac)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise ValueError("malformed upload token") from exc
    if not hmac.compare_digest(hmac.new(secret, payload, hashlib.sha256).digest(), given):
        raise ValueError("upload token signature is invalid")
    data = json.loads(payload)
    if data.get("f") != file_id or data.get("p") != part:
        raise ValueError("upload token is for another file or part")
    if data["e"] < time.time():
        raise ValueError("upload token has expired; start the upload again")
    return data["n"]
