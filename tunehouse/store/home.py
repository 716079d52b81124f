"""The tunehouse home: database, blob store, upload-signing secret and the admin key file.
`open_home` creates what is missing; nothing happens at import time.

Stateless API servers (several on one PostgreSQL) take the secret and the admin key from settings
(`TUNEHOUSE_SECRET`, `TUNEHOUSE_ADMIN_KEY`) instead of files in one machine's home."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tunehouse.settings import Settings
from tunehouse.signing import load_or_create_secret
from tunehouse.store import keys
from tunehouse.store.blobs import BlobStore, open_blobs, private_dirs
from tunehouse.store.db import Database


@dataclass
class Home:
    settings: Settings
    db: Database
    blobs: BlobStore
    secret: bytes


def open_home(settings: Settings) -> Home:
    # The home holds the secret, keys' hashes, datasets and weights: the server's user only.
    private_dirs(settings.home)
    settings.home.chmod(0o700)
    db = Database(settings.db_url, pool_size=settings.database_pool_size,
                  max_overflow=settings.database_max_overflow)
    db.create(upgrade=settings.database_auto_upgrade)
    blobs = open_blobs(settings)
    blobs.sweep_temp()
    if settings.secret:
        secret = settings.secret.get_secret_value().encode()
    else:
        secret = load_or_create_secret(settings.secret_path)
    return Home(settings, db, blobs, secret)


def ensure_admin_key(home: Home, owner: str = "admin") -> str | None:
    """With `admin_key` set, make sure it is an admin key (nothing written to the home). Else, on
    an empty home, mint an admin key and store it (mode 0600) where the CLI looks.
    Returns the new key, or None when keys already exist."""
    if home.settings.admin_key:
        ensure_configured_admin_key(home, owner)
        return None
    with home.db.session() as s:
        if keys.any_keys(s):
            return None
        key = keys.create_key(s, owner, admin=True)
    write_key_file(home.settings.admin_key_path, key)
    return key


def ensure_configured_admin_key(home: Home, owner: str = "admin") -> None:
    """Store the `admin_key` setting as an admin key unless it is there already. An insert that
    yields on a duplicate hash: two servers starting together on an empty database both succeed,
    and one row is made. A row an operator revoked stays revoked."""
    if home.settings.admin_key:
        with home.db.session() as s:
            keys.ensure_key(s, home.settings.admin_key.get_secret_value(), owner, admin=True)


def write_key_file(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    os.replace(tmp, path)


def read_key_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
