"""The file service: the three-step upload (begin → signed PUT → preprocess), the one-shot and
multipart uploads, listing, content and deletion. Routes in `api/files.py` only call these.

A row is created in state `uploading` and becomes `stored` only when all its bytes are on disk and
match the announced checksum; only `stored` rows are listed or usable, so an interrupted or
rejected upload leaves nothing behind that a user can see.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import unicodedata
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from tunehouse import jobs, signing
from tunehouse.data.formats import check_file
from tunehouse.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, Unauthorized
from tunehouse.ids import new_file_id
from tunehouse.store.blobs import BlobWriter, sha256_file
from tunehouse.store.home import Home
from tunehouse.store.tables import File, utcnow

PURPOSES = ("fine-tune", "eval", "batch-api")
FILE_TYPES = ("jsonl", "parquet", "csv")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MIN_PART = 5 << 20
MAX_PARTS = 250
# Bidirectional controls make a name display differently from what it is ("a\u202egpj.jsonl" shows
# as "ajsonl.jpg"); with the control characters (category Cc: newline, NUL, ...) they are refused.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unsafe_chars(name: str) -> list[str]:
    """The control and bidi characters of `name`, as `U+XXXX (NAME)`."""
    bad = dict.fromkeys(c for c in name if c in BIDI_CONTROLS or unicodedata.category(c) == "Cc")
    return [f"U+{ord(c):04X} ({unicodedata.name(c, 'control character')})" for c in bad]


def blob_key(f: File, part: int | None = None) -> str:
    if part is None:
        return f"files/{f.id}.{f.file_type}"  # the extension tells the validator the format
    return f"uploads/{f.id}/part-{part:05d}"


def staging_key(f: File) -> str:
    """Where a client's presigned PUT or S3 multipart upload lands, until the API claims it."""
    return f"uploads/{f.id}"


def _check_meta(purpose: str, file_name: str, file_type: str | None, checksum: str | None) -> str:
    if purpose not in PURPOSES:
        raise InvalidInput(
            f"purpose must be one of {', '.join(PURPOSES)}; got {purpose!r}.", param="purpose"
        )
    name = (file_name or "").strip()
    if bad := _unsafe_chars(name):
        raise InvalidInput(f"file_name must not contain control or bidirectional characters; found "
                           f"{', '.join(bad)}. Rename the file.", param="file_name", code="invalid_file_name")
    if not name or "/" in name or "\\" in name or len(name) > 255:
        raise InvalidInput(
            "file_name must be a plain file name (no folders, at most 255 characters).", param="file_name"
        )
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    ftype = (file_type or ext).lower()
    if ftype not in FILE_TYPES:
        raise InvalidInput(
            f"file_type must be one of {', '.join(FILE_TYPES)} (from the extension of {name!r}); "
            f"got {ftype or 'none'}. Save the dataset as .jsonl, .parquet or .csv.",
            param="file_type",
        )
    if checksum is not None and checksum != "" and not SHA256_RE.match(checksum.lower()):
        raise InvalidInput("checksum must be the lowercase hex SHA-256 of the file.", param="checksum")
    return ftype


class FileService:
    def __init__(self, home: Home):
        self.home = home
        self.settings = home.settings

    # -- queries -----------------------------------------------------------------------------
    def get(self, s: Session, owner: str, file_id: str) -> File:
        f = s.get(File, file_id)
        if f is None or f.owner != owner or f.state != "stored":
            raise NotFound(f"No file with id {file_id!r}. List your files with `tunehouse files list`.",
                           param="id", code="file_not_found")
        return f

    def list(self, s: Session, owner: str, *, purpose: str | None = None, after: str | None = None,
             limit: int | None = None, order: str = "asc") -> tuple[list[File], bool]:
        """(one page of the owner's stored files, whether more follow). `after` is the id of the last
        file of the previous page, as the openai SDK pages; the together SDKs ask for everything."""
        q = select(File).where(File.owner == owner, File.state == "stored")
        if purpose:
            q = q.where(File.purpose == purpose)
        key = (File.created_at, File.id)
        if after:
            try:
                last = self.get(s, owner, after)
            except NotFound as exc:
                raise NotFound(exc.message, param="after", code=exc.code) from None
            newer = (File.created_at > last.created_at) | ((File.created_at == last.created_at) & (File.id > last.id))
            older = (File.created_at < last.created_at) | ((File.created_at == last.created_at) & (File.id < last.id))
            q = q.where(newer if order == "asc" else older)
        q = q.order_by(*(key if order == "asc" else (k.desc() for k in key)))
        rows = list(s.scalars(q.limit(limit + 1) if limit else q))
        more = limit is not None and len(rows) > limit
        return rows[:limit] if more else rows, more

    def content_path(self, f: File) -> Path:
        """A local copy of the file's bytes (the blob itself on the local store)."""
        return self.home.blobs.local_file(blob_key(f))

    def delete(self, s: Session, owner: str, file_id: str) -> None:
        f = self.get(s, owner, file_id)
        user = jobs.unfinished_job_using(s, file_id)
        if user is not None:
            raise Conflict(f"File {file_id} is used by job {user.id} ({user.status}); cancel the job or wait for "
                           "it to end, then delete the file.", param="id", code="file_in_use",
                           extra={"job_id": user.id})
        keys = (blob_key(f), staging_key(f))
        s.delete(f)
        s.flush()
        # The bytes go once the row is gone for good: a failed commit must not leave a row without
        # its blob (a blob without a row is swept, see `sweep`). On S3 a client may have re-sent
        # its upload after the claim: that copy goes too.
        blobs = self.home.blobs
        event.listen(s, "after_commit", lambda _s: [blobs.delete(k) for k in keys], once=True)

    # -- single-part upload: begin, PUT, preprocess --------------------------------------------
    def begin(self, s: Session, owner: str, *, purpose: str, file_name: str, file_type: str | None,
              checksum: str | None) -> tuple[File, str]:
        """Step 1: record the upload and return (row, signed token for the PUT)."""
        ftype = _check_meta(purpose, file_name, file_type, checksum)
        checksum = checksum.lower() if checksum else None
        if checksum:
            self._refuse_duplicate(s, owner, checksum, purpose)
        self.sweep(s)
        nonce = secrets.token_hex(16)
        f = File(id=new_file_id(), owner=owner, filename=file_name, purpose=purpose, file_type=ftype,
                 checksum=checksum, state="uploading", upload_nonce=nonce)
        s.add(f)
        s.flush()
        return f, signing.sign(self.home.secret, f.id, nonce, self.settings.upload_token_ttl_s)

    def upload_url(self, f: File, token: str, base: str, *, direct: bool = True) -> str:
        """Step 2's URL: a presigned PUT straight into the store when it has one (and `direct`),
        else ours, which streams the bytes through this server into the store."""
        url = self.home.blobs.presigned_put(staging_key(f), self.settings.upload_token_ttl_s) if direct else None
        return url or f"{base}/v1/files/{f.id}/bytes?token={token}"

    def part_url(self, f: File, part: int, token: str, base: str) -> str:
        if s3_id := (f.multipart or {}).get("s3_upload_id"):
            return self.home.blobs.presigned_part(staging_key(f), s3_id, part, self.settings.upload_token_ttl_s)
        return f"{base}/v1/files/{f.id}/parts/{part}?token={token}"

    async def receive(self, file_id: str, token: str, chunks: AsyncIterator[bytes],
                      content_length: int | None) -> File:
        """Step 2: stream the PUT body to the blob store in constant memory. Disk writes and
        database calls run in worker threads, never on the event loop, and the only write
        transaction is the short one that marks the file stored once its bytes are safe on disk."""
        nonce = self._verify(file_id, token, part=0)
        f = await run_in_threadpool(self._uploading, file_id, nonce)
        self._check_size(content_length)
        with self.home.blobs.writer(blob_key(f)) as w:
            await self._stream_to(w, chunks)
            if f.checksum and w.sha256 != f.checksum:
                raise InvalidInput(
                    f"The uploaded bytes do not match the announced checksum ({w.sha256} != {f.checksum}); "
                    "the upload was discarded. Upload the file again.", param="checksum")
            await run_in_threadpool(w.sync)
            return await run_in_threadpool(self._mark_stored, f.id, nonce, w)

    def _mark_stored(self, file_id: str, nonce: str, w: BlobWriter) -> File:
        """Uploading → stored, once: a conditional UPDATE, so of two PUTs racing with one URL only
        the first wins; its blob is renamed into place inside that transaction (a rename is quick)."""
        with self.home.db.session() as s:
            won = s.execute(update(File).where(File.id == file_id, File.state == "uploading",
                                               File.upload_nonce == nonce)
                            .values(state="stored", upload_nonce=None, bytes=w.size, checksum=w.sha256))
            if won.rowcount != 1:
                raise Unauthorized("Upload URL was already used or the upload was cancelled; start a new upload.",
                                   param="token")
            w.commit()
            return s.get(File, file_id)

    async def _stream_to(self, w: BlobWriter, chunks: AsyncIterator[bytes]) -> None:
        """Body chunks (a few KiB each from the server) gathered into 1 MiB writes in a thread."""
        buf = bytearray()
        async for chunk in chunks:
            buf += chunk
            self._check_size(w.size + len(buf))
            if len(buf) >= 1 << 20:
                await run_in_threadpool(w.write, bytes(buf))
                buf.clear()
        if buf:
            await run_in_threadpool(w.write, bytes(buf))

    def preprocess(self, s: Session, owner: str, file_id: str) -> File:
        """Step 3: validate the stored bytes and record the report on the file. On a store the
        client PUT to directly, the bytes are first claimed (checked and moved into place)."""
        f = s.get(File, file_id)
        if (self.home.blobs.direct and f is not None and f.owner == owner and f.state == "uploading"
                and not f.multipart):
            self._claim(s, f)
        f = self.get(s, owner, file_id)
        if f.processing_status in ("COMPLETED", "FAILED"):
            return f  # idempotent: the report of a given content never changes
        return self.validate(s, f)

    def validate(self, s: Session, f: File) -> File:
        """Check the stored bytes and record the report. The check (seconds for a big file) runs
        before any write, and the write is committed at once, so the caller holds no write lock
        over what it does next (a job create goes on to load models and reach the hub)."""
        self._check(f)
        s.commit()
        return f

    def _claim(self, s: Session, f: File) -> None:
        """Bytes a client sent straight to the store: a server-side copy into place that holds only
        if the object is still the one whose size was checked (a re-sent PUT meanwhile is refused),
        then their sha256 over the local copy the validator reads next (one read from the store),
        compared with the announced checksum, and the row uploading → stored once (the state is
        what makes a presigned URL single-use: bytes PUT after the claim never reach the file).
        A mismatch discards the bytes, and the row stays unlisted until the upload is retried or
        swept."""
        blobs, key = self.home.blobs, staging_key(f)
        try:
            info = blobs.head(key)
        except FileNotFoundError:
            raise InvalidInput(f"The bytes of {f.id} have not arrived; PUT the file to its upload URL first.",
                               param="id", code="upload_incomplete") from None
        if info.size > self.settings.max_file_bytes:  # a presigned PUT cannot cap its size: refuse it here
            blobs.delete(key)
            self._check_size(info.size)
        try:
            blobs.copy(key, blob_key(f), if_etag=info.etag)
        except (ValueError, FileNotFoundError):
            raise Conflict(f"The bytes of {f.id} changed while they were checked; retry.", param="id") from None
        # Hashed where `_check` will read them: fetched once into the cache, streamed to disk.
        local = self.content_path(f)
        sha = sha256_file(local)
        if f.checksum and sha != f.checksum:
            blobs.delete(key)
            blobs.delete(blob_key(f))
            raise InvalidInput(f"The uploaded bytes do not match the announced checksum ({sha} != "
                               f"{f.checksum}); the upload was discarded. Upload the file again.", param="checksum")
        won = s.execute(update(File).where(File.id == f.id, File.state == "uploading", File.upload_nonce == f.upload_nonce)
                        .values(state="stored", upload_nonce=None, multipart=None, bytes=local.stat().st_size,
                                checksum=sha))
        s.commit()
        s.refresh(f)
        if won.rowcount == 1:
            blobs.delete(key)

    def _check(self, f: File) -> None:
        report = check_file(self.content_path(f), purpose=f.purpose)
        f.validation_report = report.to_validation_report(f.id)
        f.processing_status = "COMPLETED" if report.passed else "FAILED"
        f.line_count = report.num_lines
        f.num_samples = report.num_samples
        f.dataset_format = report.dataset_format

    def upload_oneshot(self, s: Session, owner: str, *, purpose: str, file_name: str,
                       file_type: str | None, chunks: Iterable[bytes]) -> File:
        """Bytes and report first, the row last: the database is written once, briefly, when the
        file is complete, and a failed upload leaves no row (its blob is removed)."""
        ftype = _check_meta(purpose, file_name, file_type, None)
        f = File(id=new_file_id(), owner=owner, filename=file_name, purpose=purpose, file_type=ftype,
                 state="stored", upload_nonce=None)
        with self.home.blobs.writer(blob_key(f)) as w:
            for chunk in chunks:
                w.write(chunk)
                self._check_size(w.size)
            w.commit()
        try:
            f.bytes, f.checksum = w.size, w.sha256
            self._check(f)
            self.sweep(s)
            s.add(f)
            s.commit()
        except BaseException:
            self.home.blobs.delete(blob_key(f))
            raise
        return f

    # -- multipart (files over 5 GiB) -------------------------------------------------------
    def initiate_multipart(self, s: Session, owner: str, *, file_name: str, file_size: int, num_parts: int,
                           purpose: str, file_type: str | None, checksum: str | None) -> tuple[File, list[str]]:
        ftype = _check_meta(purpose, file_name, file_type, checksum)
        self._check_size(file_size)
        if not 1 <= num_parts <= MAX_PARTS:
            raise InvalidInput(f"num_parts must be between 1 and {MAX_PARTS}; got {num_parts}.", param="num_parts")
        checksum = checksum.lower() if checksum else None
        if checksum:
            self._refuse_duplicate(s, owner, checksum, purpose)
        nonce = secrets.token_hex(16)
        f = File(id=new_file_id(), owner=owner, filename=file_name, purpose=purpose, file_type=ftype,
                 checksum=checksum, state="uploading", upload_nonce=nonce, bytes=file_size,
                 multipart={"upload_id": secrets.token_hex(12), "num_parts": num_parts})
        if self.home.blobs.direct:  # the parts go straight to an S3 multipart upload
            f.multipart = {**f.multipart, "s3_upload_id": self.home.blobs.multipart_begin(staging_key(f))}
        s.add(f)
        s.flush()
        ttl = self.settings.upload_token_ttl_s
        return f, [signing.sign(self.home.secret, f.id, nonce, ttl, part=n) for n in range(1, num_parts + 1)]

    async def receive_part(self, file_id: str, part: int, token: str, chunks: AsyncIterator[bytes]) -> str:
        """One part's bytes to its own blob; its ETag is the MD5 of those bytes. Nothing is written to
        the database: `complete_multipart` checks the ETags against the part blobs themselves, so
        parts uploaded in parallel never contend for the file's row."""
        nonce = self._verify(file_id, token, part=part)
        f = await run_in_threadpool(self._uploading, file_id, nonce)
        if not f.multipart or not 1 <= part <= f.multipart["num_parts"]:  # before any byte is written
            raise Unauthorized("This upload URL is not for a part of a multipart upload.", param="token")
        with self.home.blobs.writer(blob_key(f, part), md5=True) as w:
            await self._stream_to(w, chunks)
            await run_in_threadpool(w.sync)
            w.commit()
        return w.md5

    def complete_multipart(self, s: Session, owner: str, *, upload_id: str, file_id: str,
                           parts: Iterable[tuple[int, str]]) -> File:
        f = self._own_multipart(s, owner, upload_id, file_id)
        mp = f.multipart
        parts = sorted(parts)
        expected = list(range(1, mp["num_parts"] + 1))
        if [n for n, _ in parts] != expected:
            raise InvalidInput(f"parts must list part numbers {expected[0]}..{expected[-1]} once each.", param="parts")
        if s3_id := mp.get("s3_upload_id"):
            try:
                self.home.blobs.multipart_complete(staging_key(f), s3_id, parts)
            except ValueError as exc:
                raise InvalidInput(f"The store refused the parts ({exc}); check each part's ETag, or abort and "
                                   "upload again.", param="parts") from None
            self._claim(s, f)
            return self.validate(s, f)
        with self.home.blobs.writer(blob_key(f)) as w:
            for n, etag in parts:
                if not self.home.blobs.exists(blob_key(f, n)):
                    raise InvalidInput(f"part {n} was not uploaded.", param="parts")
                md5 = hashlib.md5()
                with self.home.blobs.open(blob_key(f, n)) as fh:
                    while chunk := fh.read(8 << 20):
                        w.write(chunk)
                        md5.update(chunk)
                if md5.hexdigest() != etag.strip('"'):
                    raise InvalidInput(f"part {n}: its etag does not match the uploaded bytes.", param="parts")
            if f.checksum and w.sha256 != f.checksum:
                raise InvalidInput("The assembled file does not match the announced checksum; upload it again.",
                                   param="checksum")
            w.commit()
        self.home.blobs.delete(f"uploads/{f.id}")
        f.bytes, f.checksum = w.size, w.sha256
        f.state, f.upload_nonce, f.multipart = "stored", None, None
        return self.validate(s, f)

    def abort_multipart(self, s: Session, owner: str, *, upload_id: str, file_id: str) -> None:
        f = self._own_multipart(s, owner, upload_id, file_id)
        self.home.blobs.delete(f"uploads/{f.id}")
        s.delete(f)
        s.flush()

    # -- helpers --------------------------------------------------------------------------------
    def _verify(self, file_id: str, token: str, *, part: int) -> str:
        try:
            return signing.verify(self.home.secret, token, file_id, part)
        except ValueError as exc:
            raise Unauthorized(f"Upload URL rejected: {exc}.", param="token") from None

    def _uploading(self, file_id: str, nonce: str) -> File:
        """The file a signed URL is for, while that URL is still good (a read: no lock taken)."""
        with self.home.db.session() as s:
            f = s.get(File, file_id)
        if f is None or f.state != "uploading" or f.upload_nonce != nonce:
            raise Unauthorized("Upload URL was already used or the upload was cancelled; start a new upload.",
                               param="token")
        return f

    def _own_multipart(self, s: Session, owner: str, upload_id: str, file_id: str) -> File:
        f = s.get(File, file_id)
        if f is None or f.owner != owner or not f.multipart or f.multipart.get("upload_id") != upload_id:
            raise NotFound(f"No multipart upload {upload_id!r} for file {file_id!r}.", param="upload_id")
        return f

    def _check_size(self, size: int | None) -> None:
        if size is not None and size > self.settings.max_file_bytes:
            raise PayloadTooLarge(
                f"File is larger than the {self.settings.max_file_bytes / (1 << 30):.1f} GiB limit; split the dataset.",
                param="file")

    def _refuse_duplicate(self, s: Session, owner: str, checksum: str, purpose: str) -> None:
        q = select(File.id).where(File.owner == owner, File.checksum == checksum, File.purpose == purpose,
                                  File.state == "stored")
        existing = s.scalar(q.limit(1))
        if existing:
            raise Conflict(f"This file is already uploaded as {existing}; use that id.",
                           param="checksum", code="file_already_exists", extra={"file_id": existing})

    def sweep(self, s: Session) -> None:
        """Drop uploads whose signed URL expired without the bytes arriving, then any blob under
        files/, uploads/ or the temp folder that no row owns. Blobs younger than an upload URL's
        life are left alone: their row may be in a transaction not yet visible here."""
        grace = self.settings.upload_token_ttl_s + 60
        cutoff = utcnow() - timedelta(seconds=grace)
        for f in s.scalars(select(File).where(File.state == "uploading", File.created_at < cutoff)):
            self.home.blobs.delete(f"uploads/{f.id}")  # on S3, its open multipart upload too
            s.delete(f)
        s.flush()
        known = set(s.scalars(select(File.id)))
        self.home.blobs.sweep_orphans(known, older_than_s=grace)
        if self.home.blobs.direct:  # a presigned URL re-used after its claim: bytes no row will read
            uploading = set(s.scalars(select(File.id).where(File.state == "uploading")))
            for b in self.home.blobs.list("uploads"):
                if b.key.split("/")[1] not in uploading and b.modified < cutoff:
                    self.home.blobs.delete(b.key)
