"""The blob store: where datasets, checkpoints, weights and download archives live, by key
(`files/<id>.jsonl`, `jobs/<id>/…`). One interface, two backends, chosen by `blob_url`:
a local folder (`local_blobs.py`, the embedded default) and any S3-compatible store
(`s3_blobs.py`). No module opens a blob by path: code that needs a file on disk (the
validator, the trainer, the inference engine) asks for a local copy (`local_file`, `local_dir`),
which the local backend answers with the blob itself and a remote one with a cached copy.

Keys are '/'-separated and relative; a "folder" is every blob under `prefix/`."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def private_dirs(path: Path) -> None:
    """mkdir -p with mode 0700 for every folder it creates (Path.mkdir gives parents the default)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass


def check_key(key: str) -> str:
    """A relative '/'-separated key with no empty, '.' or '..' part (so no backend can be led
    outside its root)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid blob key: {key!r}")
    return key


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: datetime  # UTC
    etag: str | None = None  # S3's ETag (quoted, as S3 sends it); None on the local folder


class BlobWriter(ABC):
    """Streams bytes into one blob, hashing as it goes. Nothing is visible under the key until
    `commit()`; leaving the `writer()` block without a commit discards everything. A backend
    implements `_put` (where the bytes go), `commit` and `abort`."""

    def __init__(self, *, md5: bool = False):
        self.size = 0
        self._sha, self._md5 = hashlib.sha256(), hashlib.md5() if md5 else None

    def write(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)
        self.size += len(chunk)
        self._put(chunk)

    @abstractmethod
    def _put(self, chunk: bytes) -> None: ...

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def md5(self) -> str:
        """The S3-style ETag of the bytes; only for a writer opened with `md5=True`."""
        return self._md5.hexdigest()

    def sync(self) -> None:
        """Make the bytes durable (the slow part of a commit; call it before taking a lock)."""

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...


class BlobStore(ABC):
    """What every backend offers. Methods are blocking: call them from threads, never from the
    event loop."""

    # The folders that hold one blob per file row: `<top>/<file id>…` (see `sweep_orphans`).
    FILE_TOPS = ("files", "uploads")
    # Clients send upload bytes straight to the store (presigned PUT / multipart part URLs) and
    # the API claims them afterwards; False: the API server receives the bytes itself.
    direct = False
    url: str  # where the blobs are, for logs and errors (no credentials)

    # -- reading ---------------------------------------------------------------------------------
    @abstractmethod
    def exists(self, key: str) -> bool:
        """A blob at `key` (not a folder)."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Bytes of the blob; FileNotFoundError when there is none."""

    def head(self, key: str) -> BlobInfo:
        """Size, time and (S3) ETag of one blob; FileNotFoundError when there is none."""
        return BlobInfo(key, self.size(key), datetime.now(timezone.utc))

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A binary stream of the blob's bytes (close it); FileNotFoundError when there is none."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes `start`..`end` (inclusive, as HTTP Range) in chunks of at most a few MiB."""

    @abstractmethod
    def list(self, prefix: str) -> list[BlobInfo]:
        """Every blob under `prefix/` (recursively), sorted by key."""

    # -- writing ---------------------------------------------------------------------------------
    @abstractmethod
    def writer(self, key: str, *, md5: bool = False) -> AbstractContextManager[BlobWriter]:
        """`with store.writer(key) as w: w.write(…); w.commit()`."""

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as w:
            w.write(data)
            w.commit()

    def put_file(self, key: str, src: Path) -> None:
        """Copy a local file in; atomic."""
        with self.writer(key) as w, open(src, "rb") as fh:
            while chunk := fh.read(8 << 20):
                w.write(chunk)
            w.commit()

    def copy(self, src: str, dst: str, *, if_etag: str | None = None) -> None:
        """Copy one blob to another key (server-side on S3). With `if_etag`, only while `src` still
        has that ETag: ValueError when it changed (a client re-sent its upload meanwhile)."""
        with self.open(src) as fh, self.writer(dst) as w:
            while chunk := fh.read(8 << 20):
                w.write(chunk)
            w.commit()

    @abstractmethod
    def put_dir(self, prefix: str, src: Path) -> None:
        """Copy a local folder in under `prefix/`, replacing what was there. Readers of a
        checkpoint look it up in the database, which records it only after this returns."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob at `key` and every blob under `key/`; no error when there is none."""

    # -- local copies ------------------------------------------------------------------------------
    @abstractmethod
    def local_file(self, key: str) -> Path:
        """A path on this machine holding the blob's bytes, to read only (never write or delete it).
        FileNotFoundError when there is no such blob."""

    @abstractmethod
    def local_dir(self, prefix: str) -> Path:
        """A folder on this machine holding every blob under `prefix/`, to read only.
        FileNotFoundError when there is none."""

    # -- transfers that bypass the API server (None: this backend has none, the API carries the bytes)
    def presigned_get(self, key: str, expires_s: int, filename: str | None = None) -> str | None:
        return None

    def presigned_put(self, key: str, expires_s: int) -> str | None:
        return None

    def multipart_begin(self, key: str) -> str | None:
        """Start a multipart upload the client sends straight to the store; its upload id."""
        return None

    def presigned_part(self, key: str, upload_id: str, part: int, expires_s: int) -> str:
        raise NotImplementedError

    def multipart_complete(self, key: str, upload_id: str, parts: Iterable[tuple[int, str]]) -> None:
        raise NotImplementedError

    def multipart_abort(self, key: str, upload_id: str) -> None:
        raise NotImplementedError

    # -- upkeep ----------------------------------------------------------------------------------
    @abstractmethod
    def sweep_orphans(self, file_ids: set[str], older_than_s: float) -> list[str]:
        """Remove blobs under FILE_TOPS whose file row no longer exists (a crash between the
        bytes and the row, a failed delete) and stale temporary data, only those untouched for
        `older_than_s`. Returns what was removed."""

    def sweep_temp(self, older_than_s: float = 3600) -> None:
        """Remove what a crashed writer left (called at start-up); only old leftovers, since a
        fresh one may be another process's upload in progress."""


def open_blobs(settings) -> BlobStore:
    """The store `settings.blob_url` names: `s3://bucket/prefix`, or a local folder."""
    url = settings.blob_location
    if url.startswith("s3://"):
        from tunehouse.store.s3_blobs import S3BlobStore

        return S3BlobStore(url, cache_dir=settings.blob_cache_path, cache_bytes=settings.blob_cache_bytes)
    from tunehouse.store.local_blobs import LocalBlobStore

    return LocalBlobStore(Path(url.removeprefix("file://")))
