"""Helpers for job tests: wait for a job, unpack downloads, make bigger datasets."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import zstandard

TERMINAL = {"completed", "cancelled", "error", "user_error"}


def wait_for(client, job_id: str, statuses=TERMINAL, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s: "
                         + " | ".join(e.message for e in client.fine_tuning.list_events(job_id).data))


def untar_zst(data: bytes, dest: Path) -> list[str]:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(dest, filter="data")
        return tar.getnames()


def write_chat(path: Path, n: int, seed: int = 0) -> Path:
    """n short question/answer conversations (deterministic)."""
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
    with open(path, "w") as fh:
        for i in range(n):
            a, b = words[(i + seed) % 10], words[(3 * i + 1 + seed) % 10]
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Say {a} then {b}."},
                                              {"role": "assistant", "content": f"{a} {b}"}]}) + "\n")
    return path
