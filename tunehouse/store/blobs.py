"""Blob store: a local folder. Writes are atomic (temp name, fsync, rename), so a reader never
sees a half-written blob and a crash leaves only a temp file that `sweep_temp` removes.

Datasets and weights are private to the server's user: files 0600, folders 0700."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class BlobWriter:
    """Streams bytes to a temp file, hashing as it goes; `commit()` makes the blob visible."""

    def __init__(self, tmp: Path, final: Path, *, md5: bool = False):
        self.tmp, self.final = tmp, final
        self.size = 0
        self._sha, self._md5 = hashlib.sha256(), hashlib.md5() if md5 else None
        self._fh: BinaryIO = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        self._sha.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def md5(self) -> str:
        """The S3-style ETag of the bytes; only for a writer opened with `md5=True`."""
        return self._md5.hexdigest()

    def sync(self) -> None:
        """Flush and fsync the bytes (the slow part of a commit; call it before taking a lock)."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def commit(self) -> None:
        self.sync()
        private_dirs(self.final.parent)
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)


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


class BlobStore:
    # The folders that hold one blob per file row: `<top>/<file id>…`.
    FILE_TOPS = ("files", "uploads")

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_dir = self.root / ".tmp"
        private_dirs(self.tmp_dir)
        self.root.chmod(0o700)  # a store made by an older version was 0755

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root.resolve() not in p.parents:
            raise ValueError(f"blob key escapes the store: {key!r}")
        return p

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    @contextmanager
    def writer(self, key: str, *, md5: bool = False) -> Iterator[BlobWriter]:
        """Yields a writer; the blob appears only if `commit()` was called inside the block."""
        w = BlobWriter(self.tmp_dir / f"{uuid.uuid4().hex}.part", self.path(key), md5=md5)
        try:
            yield w
        finally:
            w.abort()  # no-op after a commit: the temp file was renamed

    def put_file(self, key: str, src: Path) -> None:
        """Copy a local file in atomically."""
        with self.writer(key) as w, open(src, "rb") as fh:
            while chunk := fh.read(1 << 20):
                w.write(chunk)
            w.commit()

    def put_dir(self, key: str, src: Path) -> None:
        """Copy a folder in atomically (copy to a temp folder, then rename)."""
        tmp = self.tmp_dir / uuid.uuid4().hex
        shutil.copytree(src, tmp)
        final = self.path(key)
        private_dirs(final.parent)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def delete(self, key: str) -> None:
        p = self.path(key)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def sweep_orphans(self, file_ids: set[str], older_than_s: float) -> list[str]:
        """Remove blobs of file rows that no longer exist (a crash between the bytes and the row,
        a failed delete) and stale temp files; only those untouched for `older_than_s`. Returns
        the keys removed. Other requests write and rename under these folders meanwhile: an
        entry that vanishes while listed is simply not ours to sweep."""
        cutoff, gone = time.time() - older_than_s, []
        for top in self.FILE_TOPS:
            folder = self.root / top
            for p in folder.iterdir() if folder.is_dir() else ():
                file_id = p.name.split(".", 1)[0]
                if file_id not in file_ids and _older(p, cutoff):
                    self.delete(f"{top}/{p.name}")
                    gone.append(f"{top}/{p.name}")
        for p in self.tmp_dir.iterdir():
            if _older(p, cutoff):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(f".tmp/{p.name}")
        return gone

    def sweep_temp(self, older_than_s: float = 3600) -> None:
        """Remove temp files left by a crashed writer (called at start-up). Only old ones: every
        process opening the home calls this (a training child too), and a fresh temp file is an
        upload in progress in another process, whose commit would fail if it vanished."""
        cutoff = time.time() - older_than_s
        for p in self.tmp_dir.iterdir():
            try:
                if p.stat().st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _older(path: Path, cutoff: float) -> bool:
    """Last modified before `cutoff`; False for an entry gone meanwhile (renamed into place)."""
    try:
        return path.lstat().st_mtime < cutoff
    except FileNotFoundError:
        return False
