"""Third-party secrets a job carries (a W&B key, a Hugging Face token) are stored sealed:
encrypted and authenticated with Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`) under a
key derived from the home's secret. The database alone, or a backup of it, does not give them
away; only a process holding the home's secret (the training child) opens them. A worker on another
machine needs the server's secret: the same `TUNEHOUSE_SECRET` setting (or a copy of its `secret.key`).

A sealed value is the text `sealed:v1:<fernet token>`.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "sealed:v1:"


def _fernet(secret: bytes) -> Fernet:
    # A key of its own, derived from the home secret: the upload-signing HMAC key is not reused.
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"tunehouse job secrets v1").derive(secret)
    return Fernet(base64.urlsafe_b64encode(key))


def seal(secret: bytes, value: str) -> str:
    return PREFIX + _fernet(secret).encrypt(value.encode()).decode()


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def unseal(secret: bytes, value: str) -> str:
    """The clear value; a value stored before sealing existed is returned as it is."""
    if not is_sealed(value):
        return value
    try:
        return _fernet(secret).decrypt(value[len(PREFIX):].encode()).decode()
    except InvalidToken:
        raise ValueError("a key given to this job cannot be decrypted here: this worker's home has another "
                         "secret than the server's (give both the same TUNEHOUSE_SECRET, or copy the server's "
                         "secret.key into the worker's home), or the "
                         "secret changed since the job was created (create it again)") from None
