"""Resources stay consistent: a file in use by a job cannot be deleted, failed uploads leave no
bytes, orphan blobs are swept, and a single-use upload URL is used once even under a race."""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import DATA, _serve
from tunehouse.settings import Settings

TINY = "tunehouse/tiny-llama"
CHAT = (DATA / "api" / "chat.jsonl").read_bytes()


@pytest.fixture
def server(tmp_path, model_cache):
    live, bg = _serve(Settings(home=tmp_path / "home", model_cache=model_cache, embedded_worker=False))
    yield live
    bg.stop()


def _h(live):
    return {"Authorization": f"Bearer {live.key}"}


def _begin(live, name="train.jsonl") -> str:
    r = httpx.post(f"{live.url}/v1/files", headers=_h(live), data={"file_name": name, "purpose": "fine-tune"})
    assert r.status_code == 302, r.text
    return r.headers["Location"]


def _upload(live, data: bytes = CHAT) -> str:
    r = httpx.post(f"{live.url}/v1/files/upload", headers=_h(live), files={"file": ("train.jsonl", data)},
                   data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _blobs(live) -> list[str]:
    """Every file in the blob folder, temp files included, relative to it."""
    root = live.settings.blobs_path
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_file_of_a_queued_job_cannot_be_deleted(server):
    fid = _upload(server)
    job = httpx.post(f"{server.url}/v1/fine-tunes", headers=_h(server), timeout=60,
                     json={"model": TINY, "training_file": fid}).json()
    assert job["status"] in ("pending", "queued"), job  # no worker here: it stays queued
    r = httpx.delete(f"{server.url}/v1/files/{fid}", headers=_h(server))
    assert r.status_code == 409, r.text
    assert job["id"] in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/files/{fid}", headers=_h(server)).status_code == 200
    httpx.post(f"{server.url}/v1/fine-tunes/{job['id']}/cancel", headers=_h(server)).raise_for_status()
    r = httpx.delete(f"{server.url}/v1/files/{fid}", headers=_h(server))
    assert r.status_code == 200, r.text
    assert f"files/{fid}.jsonl" not in _blobs(server)


def test_interrupted_put_leaves_no_bytes(server):
    url = urlsplit(_begin(server))
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode()
                     + CHAT[:200])
        time.sleep(0.5)  # the server is inside the body, bytes written to a temp file
    deadline = time.monotonic() + 10
    while _blobs(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _blobs(server) == []
    listed = httpx.get(f"{server.url}/v1/files", headers=_h(server)).json()["data"]
    assert listed == []


def test_failed_multipart_part_leaves_no_bytes(server):
    r = httpx.post(f"{server.url}/v1/files/multipart/initiate", headers=_h(server),
                   json={"file_name": "big.jsonl", "file_size": len(CHAT), "num_parts": 1, "purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    part_url = r.json()["parts"][0]["URL"]

    def body():
        yield CHAT[:100]
        raise RuntimeError("the client gives up mid-part")

    with pytest.raises(Exception):
        httpx.put(part_url, content=body())
    time.sleep(0.5)
    assert _blobs(server) == []


def test_sweep_removes_orphan_blobs(server):
    root = server.settings.blobs_path
    planted = [root / "files" / "file-00000000-0000-0000-0000-000000000000.jsonl",
               root / "uploads" / "file-11111111-1111-1111-1111-111111111111" / "part-00001",
               root / ".tmp" / "dead.part"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"orphan")
        old = time.time() - 7200  # older than any upload in flight
        os.utime(p, (old, old))
        if p.parent.name.startswith("file-"):
            os.utime(p.parent, (old, old))
    kept = _upload(server)
    _begin(server)  # each new upload sweeps
    assert not any(p.exists() for p in planted)
    assert _blobs(server) == [f"files/{kept}.jsonl"]


def test_single_use_url_wins_once_under_a_race(server):
    url = _begin(server)
    results: list[int] = []
    gate = threading.Barrier(2)

    def body():
        gate.wait(5)  # both requests are in the server before either sends its bytes
        time.sleep(0.2)
        yield CHAT

    def put():
        results.append(httpx.put(url, content=body(), headers={"Content-Length": str(len(CHAT))}, timeout=30)
                       .status_code)

    threads = [threading.Thread(target=put) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [200, 401], results
    listed = httpx.get(f"{server.url}/v1/files", headers=_h(server)).json()["data"]
    assert len(listed) == 1
