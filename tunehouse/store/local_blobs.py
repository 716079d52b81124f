"""The local-folder blob store (the embedded default): one file per blob under a root folder.
Writes are atomic (temp name, fsync, rename), so a reader never sees a half-written blob and a
crash leaves only a temp file that `sweep_temp` removes. Local copies are the blobs themselves.

Datasets and weights are private to the server's user: files 0600, folders 0700."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from tunehouse.store.blobs import BlobInfo, BlobStore, BlobWriter, check_key, private_dirs


class LocalBlobWriter(BlobWriter):
    """Streams bytes to a temp file; `commit()` renames it into place."""

    def __init__(self, tmp: Path, final: Path, *, md5: bool = False):
        super().__init__(md5=md5)
        self.tmp, self.final = tmp, final
        self._fh: BinaryIO = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")

    def _put(self, chunk: bytes) -> None:
        self._fh.write(chunk)

    def sync(self) -> None:
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


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        self.tmp_dir = self.root / ".tmp"
        private_dirs(self.tmp_dir)
        self.root.chmod(0o700)  # a store made by an older version was 0755

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    # -- reading -----------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        with open(self._path(key), "rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0 and (data := fh.read(min(1 << 20, left))):
                left -= len(data)
                yield data

    def list(self, prefix: str) -> list[BlobInfo]:
        folder = self._path(prefix)
        out = []
        for p in folder.rglob("*") if folder.is_dir() else ():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.is_file():
                out.append(BlobInfo(p.relative_to(self.root).as_posix(), st.st_size,
                                    datetime.fromtimestamp(st.st_mtime, timezone.utc)))
        return sorted(out, key=lambda b: b.key)

    # -- writing -----------------------------------------------------------------------------
    @contextmanager
    def writer(self, key: str, *, md5: bool = False) -> Iterator[LocalBlobWriter]:
        w = LocalBlobWriter(self.tmp_dir / f"{uuid.uuid4().hex}.part", self._path(key), md5=md5)
        try:
            yield w
        finally:
            w.abort()  # no-op after a commit: the temp file was renamed

    def put_dir(self, prefix: str, src: Path) -> None:
        """Hard links where the filesystem allows (a checkpoint of GBs costs nothing), else a
        copy; built in a temp folder and renamed into place."""
        final = self._path(prefix)
        if Path(src).resolve() == final:
            return
        tmp = self.tmp_dir / uuid.uuid4().hex
        try:
            shutil.copytree(src, tmp, copy_function=_link_or_copy)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        private_dirs(final.parent)
        if final.exists():
            old = self.tmp_dir / uuid.uuid4().hex
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)

    def delete(self, key: str) -> None:
        p = self._path(key)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    # -- local copies ------------------------------------------------------------------------
    def local_file(self, key: str) -> Path:
        p = self._path(key)
        if not p.is_file():
            raise FileNotFoundError(f"no blob {key!r} in {self.url}")
        return p

    def local_dir(self, prefix: str) -> Path:
        p = self._path(prefix)
        if not p.is_dir():
            raise FileNotFoundError(f"no blobs under {prefix!r} in {self.url}")
        return p

    # -- upkeep ------------------------------------------------------------------------------
    def sweep_orphans(self, file_ids: set[str], older_than_s: float) -> list[str]:
        """Other requests write and rename under these folders meanwhile: an entry that vanishes
        while listed is simply not ours to sweep."""
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
        cutoff = time.time() - older_than_s
        for p in self.tmp_dir.iterdir():
            if _older(p, cutoff):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _older(path: Path, cutoff: float) -> bool:
    """Last modified before `cutoff`; False for an entry gone meanwhile (renamed into place)."""
    try:
        return path.lstat().st_mtime < cutoff
    except FileNotFoundError:
        return False
