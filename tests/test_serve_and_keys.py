"""`tunehouse serve` on an empty home mints and stores an admin key; `keys create` mints keys
that work; the store uses WAL and atomic blob writes."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import httpx
import pytest

from conftest import bin_path
from tunehouse.store.local_blobs import LocalBlobStore as BlobStore
from tunehouse.store.db import Database


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(url: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("server did not come up")


def test_first_serve_creates_admin_key_once(tmp_path):
    home, port = tmp_path / "home", _free_port()
    env = dict(os.environ, TUNEHOUSE_HOME=str(home), TUNEHOUSE_EMBEDDED_WORKER="false")
    env.pop("TUNEHOUSE_API_KEY", None)
    proc = subprocess.Popen([bin_path("tunehouse"), "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_health(url, proc)
        stored = (home / "admin.key").read_text().strip()
        assert oct((home / "admin.key").stat().st_mode)[-3:] == "600"
        r = httpx.get(url + "/v3/whoami", headers={"Authorization": f"Bearer {stored}"})
        assert r.status_code == 200 and r.json()["project"]["id"] == "admin"
        # The CLI finds the stored key with no set-up.
        ls = subprocess.run([bin_path("tunehouse"), "files", "list", "--json", "--base-url", url], env=env,
                            capture_output=True, text=True, timeout=60)
        assert ls.returncode == 0 and ls.stdout.strip() == "[]", ls.stderr
        new = subprocess.run([bin_path("tunehouse"), "keys", "create", "--owner", "carol"], env=env,
                             capture_output=True, text=True, timeout=60).stdout.strip()
        r = httpx.get(url + "/v3/whoami", headers={"Authorization": f"Bearer {new}"})
        assert r.json()["project"]["id"] == "carol"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert stored in out, "the new admin key is printed once"
    assert "inference backend:" in " ".join(out.split()) and "(serve_lora=adapter)" in out  # rich wraps lines
    env["TUNEHOUSE_SERVE_LORA"] = "merged"
    proc = subprocess.Popen([bin_path("tunehouse"), "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_health(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert stored not in out and "Created the admin API key" not in out
    assert "LoRA fine-tunes served from their merged weights, one model each (serve_lora=merged)" in " ".join(out.split())


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["worker"]])
def test_a_bad_setting_is_refused_with_its_message(tmp_path, command):
    env = dict(os.environ, TUNEHOUSE_HOME=str(tmp_path / "home"), TUNEHOUSE_SERVE_LORA="merge")
    out = subprocess.run([bin_path("tunehouse"), *command], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    assert ("Error: TUNEHOUSE_SERVE_LORA must be `adapter` (LoRA fine-tunes share their base) or `merged` "
            "(each served from its merged weights); got 'merge'") in " ".join(out.stderr.split())
    assert not (tmp_path / "home").exists(), "nothing is started or written"
    env = dict(env, TUNEHOUSE_SERVE_LORA="adapter", TUNEHOUSE_HEARTBEAT_TIMEOUT_S="soon")
    out = subprocess.run([bin_path("tunehouse"), *command], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    assert "Error: TUNEHOUSE_HEARTBEAT_TIMEOUT_S: Input should be a valid number" in " ".join(out.stderr.split())


def test_keys_are_stored_hashed(tmp_path, settings):
    from tunehouse.store import keys
    from tunehouse.store.home import open_home

    home = open_home(settings)
    with home.db.session() as s:
        key = keys.create_key(s, "dave")
    home.db.dispose()  # checkpoint the WAL so the file holds everything written
    raw = b"".join(p.read_bytes() for p in settings.home.glob("tunehouse.db*"))
    assert key.encode() not in raw and keys.hash_key(key).encode() in raw
    with pytest.raises(ValueError):
        with home.db.session() as s:
            keys.create_key(s, "a/b")


def test_sqlite_runs_in_wal_mode(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    db.create()
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_blob_writes_are_atomic(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    with store.writer("a/b.bin") as w:
        w.write(b"half")  # no commit: e.g. the client went away
    assert not store.exists("a/b.bin") and not list(store.tmp_dir.iterdir())
    with store.writer("a/b.bin") as w:
        w.write(b"whole")
        w.commit()
    assert store.local_file("a/b.bin").read_bytes() == b"whole"
    with pytest.raises(ValueError):
        store.local_file("../escape")
