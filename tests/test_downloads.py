"""Range handling of weight downloads: the SDKs probe with bytes=0-1 and resume with bytes=N-."""

from __future__ import annotations

import asyncio

import pytest

from tunehouse.downloads import RangeNotSatisfiable, serve_range


def _body(resp) -> bytes:
    async def collect():
        return b"".join([chunk async for chunk in resp.body_iterator])

    return asyncio.run(collect())


def test_probe_resume_suffix_and_refusal(tmp_path):
    f = tmp_path / "m.tar.zst"
    f.write_bytes(bytes(range(256)) * 4)  # 1024 bytes
    probe = serve_range(f, "bytes=0-1", "m.tar.zst")
    assert probe.status_code == 206 and probe.headers["content-range"] == "bytes 0-1/1024"
    assert _body(probe) == bytes([0, 1])
    resume = serve_range(f, "bytes=1000-", "m.tar.zst")
    assert resume.headers["content-range"] == "bytes 1000-1023/1024" and _body(resume) == f.read_bytes()[1000:]
    tail = serve_range(f, "bytes=-10", "m.tar.zst")
    assert _body(tail) == f.read_bytes()[-10:]
    assert serve_range(f, None, "m.tar.zst").status_code == 200
    with pytest.raises(RangeNotSatisfiable) as exc:
        serve_range(f, "bytes=2000-", "m.tar.zst")
    assert exc.value.headers["Content-Range"] == "bytes */1024"
