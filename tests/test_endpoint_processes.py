"""Dedicated endpoint processes belong to their server: they answer only the server (its internal
token), stop when their endpoint is deleted, and die with a SIGKILLed server. A real
`tunehouse serve` runs as a subprocess here, so it can be killed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import bin_path
from test_serve_and_keys import _free_port, _wait_health

TINY = "tunehouse/tiny-llama"


def _endpoint_pids(name: str) -> list[int]:
    """Live processes of the endpoint process module serving `name`."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            state = next(line for line in (d / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if b"tunehouse.serve.endpoint_proc" in cmd and name.encode() in cmd and "zombie" not in state:
            pids.append(int(d.name))
    return pids


def _gone(name: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while _endpoint_pids(name) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _endpoint_pids(name)


@pytest.fixture
def serve(tmp_path, model_cache):
    home, port = tmp_path / "home", _free_port()
    env = dict(os.environ, TUNEHOUSE_HOME=str(home), TUNEHOUSE_EMBEDDED_WORKER="false",
               TUNEHOUSE_MODEL_CACHE=str(model_cache))
    proc = subprocess.Popen([bin_path("tunehouse"), "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, proc)
        yield proc, url, {"Authorization": f"Bearer {(home / 'admin.key').read_text().strip()}"}, home
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=30)


def _start(url: str, h: dict) -> dict:
    r = httpx.post(f"{url}/v1/endpoints", headers=h, timeout=120,
                   json={"model": TINY, "hardware": "1x_cpu", "autoscaling": {"min_replicas": 1, "max_replicas": 1}})
    assert r.status_code == 200, r.text
    ep = r.json()
    deadline = time.monotonic() + 120
    while ep["state"] != "STARTED" and time.monotonic() < deadline:
        assert ep["state"] not in ("FAILED", "ERROR"), ep
        time.sleep(0.2)
        ep = httpx.get(f"{url}/v1/endpoints/{ep['id']}", headers=h).json()
    assert ep["state"] == "STARTED", ep
    return ep


def test_internal_port_needs_token_and_delete_stops_process(serve):
    _, url, h, home = serve
    ep = _start(url, h)
    [pid] = _endpoint_pids(ep["name"])
    port = int((home / "run" / "endpoints" / f"{ep['id']}.port").read_text())
    body = {"model": ep["name"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    direct = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
    assert direct.status_code == 401, direct.text
    forged = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                        headers={"x-tunehouse-endpoint-token": "guess"})
    assert forged.status_code == 401
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 401
    proxied = httpx.post(f"{url}/v1/chat/completions", headers=h, json=body, timeout=60)
    assert proxied.status_code == 200, proxied.text

    assert httpx.delete(f"{url}/v1/endpoints/{ep['id']}", headers=h).status_code == 204
    assert _gone(ep["name"]), f"endpoint process {pid} still runs after its endpoint was deleted"


def test_sigkilled_server_leaves_no_endpoint_process(serve):
    proc, url, h, _ = serve
    ep = _start(url, h)
    assert _endpoint_pids(ep["name"])
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert _gone(ep["name"], timeout=15), "the endpoint process outlived its SIGKILLed server"
