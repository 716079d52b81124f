"""Range handling of weight downloads: the SDKs probe with bytes=0-1 and resume with bytes=N-.
Streamed from the blob store, on both backends."""

from __future__ import annotations

import asyncio

import pytest

from conftest import BACKENDS
from tunehouse.downloads import RangeNotSatisfiable, serve_range
from tunehouse.store.blobs import open_blobs

pytestmark = pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)


def _body(resp) -> bytes:
    async def collect():
        return b"".join([chunk async for chunk in resp.body_iterator])

    return asyncio.run(collect())


def test_probe_resume_suffix_and_refusal(settings):
    blobs = open_blobs(settings)
    data = bytes(range(256)) * 4  # 1024 bytes
    blobs.put_bytes("jobs/j/downloads/m.tar.zst", data)
    key = "jobs/j/downloads/m.tar.zst"
    probe = serve_range(blobs, key, "bytes=0-1", "m.tar.zst")
    assert probe.status_code == 206 and probe.headers["content-range"] == "bytes 0-1/1024"
    assert _body(probe) == bytes([0, 1])
    resume = serve_range(blobs, key, "bytes=1000-", "m.tar.zst")
    assert resume.headers["content-range"] == "bytes 1000-1023/1024" and _body(resume) == data[1000:]
    assert resume.headers["content-length"] == "24"
    tail = serve_range(blobs, key, "bytes=-10", "m.tar.zst")
    assert _body(tail) == data[-10:]
    whole = serve_range(blobs, key, None, "m.tar.zst")
    assert whole.status_code == 200 and whole.headers["content-length"] == "1024" and _body(whole) == data
    assert whole.headers["content-disposition"] == 'attachment; filename="m.tar.zst"'
    assert serve_range(blobs, key, None, "modèle.tar.zst").headers["content-disposition"] == \
        "attachment; filename*=utf-8''mod%C3%A8le.tar.zst"
    with pytest.raises(RangeNotSatisfiable) as exc:
        serve_range(blobs, key, "bytes=2000-", "m.tar.zst")
    assert exc.value.headers["Content-Range"] == "bytes */1024"
    with pytest.raises(FileNotFoundError):
        serve_range(blobs, "jobs/j/downloads/none", None, "x")
