"""Local copies of remote blobs: what the validator, the trainer and the inference engine read when
the blobs live in S3. One folder per entry under the cache root, named by a hash of the key:

    <root>/<sha256(key)[:32]>/data/<name>  a blob's bytes, under its own name (the validator reads
                                           the format from the extension)
    <root>/<sha256(key)[:32]>/data         or, for a folder, the folder
    <root>/<sha256(key)[:32]>/meta     JSON {"key", "version", "size"}: what was fetched

An entry is filled atomically: the bytes go to a unique temp folder, which is renamed into place,
so two processes filling the same entry at once both download and one rename wins (the loser's
copy is dropped); a reader never sees a half-written file. `version` is the object's ETag (a
folder's: a hash of every member's key, ETag and size), so a replaced blob is fetched again.
Use stamps the entry's `meta` mtime; when the cache grows past its bound the least recently used
entries are evicted (never the one just filled). An entry still open by a reader survives its
eviction on POSIX (the inode lives until closed). Files 0600, folders 0700."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tunehouse.store.blobs import private_dirs

TMP = ".tmp"


class BlobCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root).expanduser().resolve()
        self.max_bytes = max_bytes
        private_dirs(self.root / TMP)

    def entry(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:32]

    def get(self, key: str, version: str, size: int, fill: Callable[[Path], None], name: str | None = None) -> Path:
        """The local copy of `key` at `version`: the cached one when it matches, else `fill(path)`
        writes it (a file named `name`, or without a name a folder, at `path`) and it is put in
        place. Returns that path."""
        entry = self.entry(key)
        rel = Path("data", name) if name else Path("data")
        if _meta(entry) == {"key": key, "version": version, "size": size}:
            _touch(entry / "meta")
            return entry / rel
        tmp = self.root / TMP / uuid.uuid4().hex
        private_dirs(tmp / "data")
        try:
            fill(tmp / rel)
            _private_tree(tmp / "data")
            _write_private(tmp / "meta", json.dumps({"key": key, "version": version, "size": size}).encode())
            want = {"key": key, "version": version, "size": size}
            for _ in range(3):
                if _meta(entry) == want:  # another process put the same copy in first: use that
                    break
                if entry.exists():  # a stale copy: move it aside, then ours goes in
                    old = self.root / TMP / uuid.uuid4().hex
                    try:
                        os.replace(entry, old)
                        shutil.rmtree(old, ignore_errors=True)
                    except FileNotFoundError:
                        pass
                try:
                    os.replace(tmp, entry)
                    break
                except OSError:  # someone renamed theirs in meanwhile (the folder is not empty): look again
                    continue
            else:
                raise OSError(f"could not put the cached copy of {key!r} in place under {self.root}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=entry)
        return entry / rel

    def size(self) -> int:
        return sum(size for _, _, size in self._entries())

    def evict(self, keep: Path | None = None) -> list[str]:
        """Remove least-recently-used entries until the cache fits its bound; the keys evicted."""
        entries = sorted(self._entries())  # oldest use first
        total, gone = sum(size for _, _, size in entries), []
        for used, entry, size in entries:
            if total <= self.max_bytes:
                break
            if entry == keep:
                continue
            meta = _meta(entry)
            old = self.root / TMP / uuid.uuid4().hex
            try:
                os.replace(entry, old)
            except FileNotFoundError:
                continue
            shutil.rmtree(old, ignore_errors=True)
            total -= size
            gone.append(meta["key"] if meta else entry.name)
        return gone

    def _entries(self) -> list[tuple[float, Path, int]]:
        out = []
        for entry in self.root.iterdir():
            if entry.name == TMP:
                continue
            try:
                used = (entry / "meta").stat().st_mtime
                size = json.loads((entry / "meta").read_bytes())["size"]
            except (FileNotFoundError, NotADirectoryError, ValueError, KeyError):
                continue
            out.append((used, entry, size))
        return out

    def sweep_temp(self, older_than_s: float = 3600) -> None:
        """Remove what a crashed fill left: temp folders in which nothing was written for
        `older_than_s` (a fill in progress writes its file continuously, whatever its size)."""
        cutoff = time.time() - older_than_s
        for p in (self.root / TMP).iterdir():
            if _newest_mtime(p) < cutoff:
                shutil.rmtree(p, ignore_errors=True)


def _meta(entry: Path) -> dict | None:
    try:
        return json.loads((entry / "meta").read_bytes())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def _newest_mtime(path: Path) -> float:
    """The latest modification under `path` (inf when it vanished meanwhile: not ours to sweep)."""
    try:
        return max([path.lstat().st_mtime] + [p.lstat().st_mtime for p in path.rglob("*")])
    except FileNotFoundError:
        return float("inf")


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def _write_private(path: Path, data: bytes) -> None:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
        fh.write(data)


def _private_tree(path: Path) -> None:
    if path.is_dir():
        path.chmod(0o700)
        for p in path.rglob("*"):
            p.chmod(0o700 if p.is_dir() else 0o600)
    elif path.exists():
        path.chmod(0o600)
