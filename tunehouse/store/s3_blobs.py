"""The S3 blob store: `blob_url=s3://bucket/prefix` on AWS S3 or any S3-compatible server (MinIO,
SeaweedFS, R2, GCS interop). Endpoint and credentials come from the usual AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, or a
profile / instance role), read by boto3 itself.

Client: boto3. It is the one of the three candidates that signs every operation we hand to a
client: presigned GET and PUT, and presigned UploadPart URLs for S3 multipart
(`generate_presigned_url("upload_part", …)`), next to Create/Complete/AbortMultipartUpload and
ListMultipartUploads for the sweep. obstore signs only whole-object GET/PUT URLs and has no
ListMultipartUploads; s3fs sits on aiobotocore (an async copy of botocore that pins its versions)
and exposes presigning only for GET. boto3 is AWS's own, released weekly, thread-safe per client,
and its transfer manager (s3transfer) does the parallel multipart copies of `put_dir`/`local_dir`.

Writers stream through S3 multipart upload, not a spooled temp file: memory holds one part (8 MiB,
growing by 8 MiB every 1000 parts so 10,000 parts reach 440 GB), no local disk is needed for a
50 GB blob, nothing is visible until CompleteMultipartUpload, and an abort is one
AbortMultipartUpload (a crashed writer's parts are aborted by `sweep_temp`). A blob smaller than
one part is a single PutObject.

Local copies (`local_file`, `local_dir`) come from `BlobCache`, validated against the ETag."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from tunehouse.store.blob_cache import BlobCache
from tunehouse.store.blobs import BlobInfo, BlobStore, BlobWriter, check_key

PART = 8 << 20  # S3's minimum part is 5 MiB; 8 MiB is the AWS CLI's default
CHUNK = 1 << 20
WORKERS = 8  # parallel transfers in put_dir / local_dir (and the connection pool to match)
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys


class BlobStoreError(RuntimeError):
    """The store cannot be used as configured; the message names the setting to fix."""


def make_client():
    """The S3 client from the AWS_* variables, one per configuration in a process (boto3 clients
    are thread-safe). Path-style addressing when an endpoint is set (MinIO,
    SeaweedFS and most self-hosted servers have no per-bucket DNS names). Checksums only where the
    operation requires them: botocore ≥ 1.36 otherwise adds CRC32 trailers that GCS interop,
    older MinIO and R2's presigned flows refuse."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        s3={"addressing_style": "path" if endpoint else "auto"},
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=WORKERS * 2,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    key = (endpoint, region, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
           os.environ.get("AWS_PROFILE"))
    with _clients_lock:  # one client per configuration: building one parses ~1 MB of JSON (0.2 s)
        if key not in _clients:
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint or None, region_name=region,
                                                           config=config)
        return _clients[key]


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


class S3BlobWriter(BlobWriter):
    """Streams into a multipart upload, one part in memory; a blob under one part is one PutObject."""

    def __init__(self, store: S3BlobStore, key: str, *, md5: bool = False):
        super().__init__(md5=md5)
        self.store, self.key = store, key
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._done = False

    def _part_size(self) -> int:
        return PART * (1 + len(self._parts) // 1000)

    def _put(self, chunk: bytes) -> None:
        self._buf += chunk
        while len(self._buf) >= self._part_size():
            n = self._part_size()
            with memoryview(self._buf) as view:
                part = bytes(view[:n])  # one copy (a bytearray slice would make two)
            del self._buf[:n]
            self._send(part)
            del part

    def _send(self, data: bytes) -> None:
        s = self.store
        if self._upload_id is None:
            self._upload_id = s.client.create_multipart_upload(Bucket=s.bucket, Key=s._full(self.key))["UploadId"]
        number = len(self._parts) + 1
        r = s.client.upload_part(Bucket=s.bucket, Key=s._full(self.key), UploadId=self._upload_id,
                                 PartNumber=number, Body=data)
        self._parts.append({"PartNumber": number, "ETag": r["ETag"]})

    def commit(self) -> None:
        s = self.store
        if self._upload_id is None:
            s.client.put_object(Bucket=s.bucket, Key=s._full(self.key), Body=bytes(self._buf))
        else:
            if self._buf:
                self._send(bytes(self._buf))
            s.client.complete_multipart_upload(Bucket=s.bucket, Key=s._full(self.key), UploadId=self._upload_id,
                                               MultipartUpload={"Parts": self._parts})
        self._buf = bytearray()
        self._done = True

    def abort(self) -> None:
        self._buf = bytearray()
        if self._upload_id is not None and not self._done:
            self.store.multipart_abort(self.key, self._upload_id)
        self._done = True


class S3BlobStore(BlobStore):
    direct = True

    def __init__(self, url: str, cache_dir: Path, cache_bytes: int, client=None):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = url
        self.client = client or make_client()
        self.cache = BlobCache(cache_dir, cache_bytes)
        self._check()

    def _check(self) -> None:
        """Fail at start, naming what to fix, rather than on the first upload."""
        where = f"blob_url {self.url!r} (TUNEHOUSE_BLOB_URL)"
        endpoint = self.client.meta.endpoint_url
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise BlobStoreError(f"No S3 credentials for {where}: set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE).") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise BlobStoreError(f"S3 bucket {self.bucket!r} does not exist at {endpoint}: create it, "
                                     f"or fix {where} or AWS_ENDPOINT_URL.") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
                raise BlobStoreError(f"S3 at {endpoint} refused the credentials for bucket {self.bucket!r}: "
                                     "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_DEFAULT_REGION "
                                     f"for AWS), and that the key may use the bucket in {where}.") from None
            raise BlobStoreError(f"S3 at {endpoint} answered {code} for bucket {self.bucket!r} "
                                 f"({where}): {exc}") from None
        except BotoCoreError as exc:
            raise BlobStoreError(f"Cannot reach S3 at {endpoint} for {where}: {exc}; "
                                 "check AWS_ENDPOINT_URL.") from None

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def _head(self, key: str) -> dict:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"no blob {key!r} in {self.url}") from None
            raise

    # -- reading -----------------------------------------------------------------------------
    def head(self, key: str) -> BlobInfo:
        h = self._head(key)
        return BlobInfo(key, h["ContentLength"], h["LastModified"].astimezone(timezone.utc), h["ETag"])

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int:
        return self._head(key)["ContentLength"]

    def open(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"no blob {key!r} in {self.url}") from None
            raise

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key), Range=f"bytes={start}-{end}")["Body"]
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"no blob {key!r} in {self.url}") from None
            raise
        with body:
            yield from body.iter_chunks(CHUNK)

    def _objects(self, prefix: str) -> Iterator[dict]:
        """Raw ListObjectsV2 entries under `prefix/` (full keys)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._full(prefix) + "/")
        for page in pages:
            yield from page.get("Contents", ())

    def list(self, prefix: str) -> list[BlobInfo]:
        return sorted((BlobInfo(self._rel(o["Key"]), o["Size"], o["LastModified"].astimezone(timezone.utc))
                       for o in self._objects(prefix)), key=lambda b: b.key)

    # -- writing -----------------------------------------------------------------------------
    @contextmanager
    def writer(self, key: str, *, md5: bool = False) -> Iterator[S3BlobWriter]:
        w = S3BlobWriter(self, key, md5=md5)
        try:
            yield w
        finally:
            w.abort()  # no-op after a commit

    def put_file(self, key: str, src: Path) -> None:
        """s3transfer: parallel multipart parts for a big file."""
        self.client.upload_file(str(src), self.bucket, self._full(key), Config=_transfer())

    def copy(self, src: str, dst: str, *, if_etag: str | None = None) -> None:
        """Server-side: CopyObject, or UploadPartCopy parts past 8 MiB (CopyObject stops at 5 GB)."""
        extra = {"CopySourceIfMatch": if_etag} if if_etag else {}
        try:
            self.client.copy({"Bucket": self.bucket, "Key": self._full(src)}, self.bucket, self._full(dst),
                             ExtraArgs=extra, Config=_transfer())
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "412"):
                raise ValueError(f"blob {src!r} changed while being copied") from None
            if _missing(exc):
                raise FileNotFoundError(f"no blob {src!r} in {self.url}") from None
            raise

    def put_dir(self, prefix: str, src: Path) -> None:
        """Every file under `src` uploaded (WORKERS at a time, each multipart when big), then the
        objects under `prefix/` that `src` does not hold are deleted. Not atomic across objects:
        readers find a checkpoint through its database row, written after this returns."""
        src = Path(src)
        files = {p.relative_to(src).as_posix(): p for p in src.rglob("*") if p.is_file()}
        stale = {b.key for b in self.list(prefix)} - {f"{prefix}/{rel}" for rel in files}
        with ThreadPoolExecutor(WORKERS) as pool:
            for f in [pool.submit(self.client.upload_file, str(p), self.bucket, self._full(f"{prefix}/{rel}"),
                                  Config=_transfer(threads=2)) for rel, p in files.items()]:
                f.result()
        self._delete_keys(sorted(stale))

    def delete(self, key: str) -> None:
        """The blob, every blob under `key/`, and any multipart upload still open for them."""
        keys = [b.key for b in self.list(key)]
        if self.exists(key):
            keys.append(key)
        self._delete_keys(keys)
        for up in self._multipart_uploads(key):
            if up["Key"] == self._full(key) or up["Key"].startswith(self._full(key) + "/"):
                self.multipart_abort(self._rel(up["Key"]), up["UploadId"])

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": self._full(k)} for k in keys[i:i + DELETE_BATCH]]
            try:
                r = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except ClientError as exc:  # GCS's XML interop has no DeleteObjects: one at a time there
                if exc.response.get("Error", {}).get("Code") not in ("NotImplemented", "MalformedXML", "InvalidArgument"):
                    raise
                for o in batch:
                    self.client.delete_object(Bucket=self.bucket, Key=o["Key"])
                continue
            if errors := r.get("Errors"):
                raise OSError(f"S3 refused to delete {len(errors)} object(s) in {self.url}: {errors[0]}")

    # -- local copies ------------------------------------------------------------------------
    def local_file(self, key: str) -> Path:
        head = self._head(key)

        def fill(path: Path) -> None:
            self.client.download_file(self.bucket, self._full(key), str(path), Config=_transfer())

        return self.cache.get(key, head["ETag"], head["ContentLength"], fill, name=key.rsplit("/", 1)[-1])

    def local_dir(self, prefix: str) -> Path:
        objects = sorted(self._objects(prefix), key=lambda o: o["Key"])
        if not objects:
            raise FileNotFoundError(f"no blobs under {prefix!r} in {self.url}")
        h = hashlib.sha256()
        for o in objects:
            h.update(f"{o['Key']}\0{o['ETag']}\0{o['Size']}\n".encode())
        base = self._full(prefix) + "/"

        def fill(path: Path) -> None:
            path.mkdir(mode=0o700, exist_ok=True)
            targets = [(o["Key"], path / o["Key"][len(base):]) for o in objects]
            for _, dst in targets:
                dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with ThreadPoolExecutor(WORKERS) as pool:
                for f in [pool.submit(self.client.download_file, self.bucket, full, str(dst),
                                      Config=_transfer(threads=2)) for full, dst in targets]:
                    f.result()

        return self.cache.get(prefix + "/", h.hexdigest(), sum(o["Size"] for o in objects), fill)

    # -- transfers that bypass the API server ------------------------------------------------
    def presigned_get(self, key: str, expires_s: int, filename: str | None = None) -> str:
        params = {"Bucket": self.bucket, "Key": self._full(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)

    def presigned_put(self, key: str, expires_s: int) -> str:
        """Signs the host only (no Content-Type): the together SDKs send different ones."""
        return self.client.generate_presigned_url("put_object", Params={"Bucket": self.bucket, "Key": self._full(key)},
                                                  ExpiresIn=expires_s)

    def multipart_begin(self, key: str) -> str:
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=self._full(key))["UploadId"]

    def presigned_part(self, key: str, upload_id: str, part: int, expires_s: int) -> str:
        return self.client.generate_presigned_url(
            "upload_part", Params={"Bucket": self.bucket, "Key": self._full(key), "UploadId": upload_id,
                                   "PartNumber": part}, ExpiresIn=expires_s)

    def multipart_complete(self, key: str, upload_id: str, parts: Iterable[tuple[int, str]]) -> None:
        """`parts`: (number, ETag as the client got it from the part PUT)."""
        body = [{"PartNumber": n, "ETag": etag if etag.startswith('"') else f'"{etag}"'} for n, etag in sorted(parts)]
        try:
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self._full(key), UploadId=upload_id,
                                                  MultipartUpload={"Parts": body})
        except ClientError as exc:  # InvalidPart, InvalidPartOrder, EntityTooSmall, NoSuchUpload: the client's
            error = exc.response.get("Error", {})
            raise ValueError(f"{error.get('Code')}: {error.get('Message')}") from None

    def multipart_abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._full(key), UploadId=upload_id)
        except ClientError as exc:
            if not _missing(exc):
                raise

    # -- upkeep ------------------------------------------------------------------------------
    def _multipart_uploads(self, prefix: str = "") -> Iterator[dict]:
        full = self._full(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full):
            yield from page.get("Uploads", ())

    def sweep_orphans(self, file_ids: set[str], older_than_s: float) -> list[str]:
        """Objects under files/ and uploads/ whose row is gone, and multipart uploads (ours or a
        client's) that no row owns or that nobody touched for `older_than_s`."""
        cutoff, gone = datetime.now(timezone.utc) - timedelta(seconds=older_than_s), []
        doomed = []
        for top in self.FILE_TOPS:
            for o in self._objects(top):
                rel = self._rel(o["Key"])
                if _file_id(rel) not in file_ids and o["LastModified"] < cutoff:
                    doomed.append(rel)
        self._delete_keys(doomed)
        gone += doomed
        for up in self._multipart_uploads():
            rel = self._rel(up["Key"])
            ours = rel.split("/", 1)[0] not in self.FILE_TOPS
            if (ours or _file_id(rel) not in file_ids) and self._untouched(up, cutoff):
                self.multipart_abort(rel, up["UploadId"])
                gone.append(f"{rel} (multipart upload {up['UploadId']})")
        self.cache.sweep_temp(older_than_s)
        return gone

    def _untouched(self, up: dict, cutoff: datetime) -> bool:
        """No part of the multipart upload arrived after `cutoff` (a 50 GB checkpoint upload may
        take hours; its latest part, not its start, says whether a writer is still at it)."""
        if up["Initiated"] >= cutoff:
            return False
        pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=up["Key"],
                                                                 UploadId=up["UploadId"])
        try:
            return all(p["LastModified"] < cutoff for page in pages for p in page.get("Parts", ()))
        except ClientError as exc:
            if _missing(exc):
                return False  # completed or aborted meanwhile
            raise

    def sweep_temp(self, older_than_s: float = 3600) -> None:
        """Multipart uploads a crashed writer left open (not a client's: their rows own them)."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_s)
        for up in self._multipart_uploads():
            rel = self._rel(up["Key"])
            if rel.split("/", 1)[0] not in self.FILE_TOPS and self._untouched(up, cutoff):
                self.multipart_abort(rel, up["UploadId"])
        self.cache.sweep_temp(older_than_s)


def _file_id(key: str) -> str:
    """`uploads/file-x/3` or `files/file-x.jsonl` → `file-x`."""
    return key.split("/")[1].split(".", 1)[0]



def _transfer(threads: int = WORKERS) -> TransferConfig:
    return TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=threads)
