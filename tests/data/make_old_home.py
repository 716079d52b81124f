"""Make `home-227d48c.tar.gz`: a small tunehouse home written by release 227d48c (the last one
before migrations; its schema came from `create_all`), and `home-227d48c.json`, what it holds.
`test_migrations.py` opens a copy with today's code and compares.

Run it with that release's code, e.g. from the repository root:

    git worktree add /tmp/th-227d48c 227d48c
    PYTHONPATH=/tmp/th-227d48c .venv/bin/python tests/data/make_old_home.py tests/data

It writes through that release's own services: a key per owner, two datasets uploaded and
validated by the FileService, two jobs created as `POST /v1/fine-tunes` does (one then claimed
and completed with events, metrics and checkpoint blobs; one left queued), and a model added as
`tunehouse models add` does. Times and ids are random: the JSON records them. The archive is
5.7 kB; the tiny model the jobs name is built in a cache outside the home.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tunehouse import jobs
from tunehouse.files import FileService
from tunehouse.job_requests import create_job
from tunehouse.models.registry import Registry
from tunehouse.settings import Settings
from tunehouse.store import keys
from tunehouse.store.home import ensure_admin_key, open_home

HERE = Path(__file__).resolve().parent
CHAT = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in ("red", "blue", "green", "cat", "dog", "sun")]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def make(root: Path) -> dict:
    home = open_home(Settings(home=root / "home", model_cache=root / "cache", embedded_worker=False))
    ensure_admin_key(home, owner="alice")  # the key `serve` mints, given the owner of the first upload
    with home.db.session() as s:
        bob_key = keys.create_key(s, "bob")
    files = FileService(home)
    with home.db.session() as s:
        train = files.upload_oneshot(s, "alice", purpose="fine-tune", file_name="train.jsonl", file_type="jsonl",
                                     chunks=[jsonl(CHAT)])
    with home.db.session() as s:
        val = files.upload_oneshot(s, "bob", purpose="fine-tune", file_name="val.jsonl", file_type="jsonl",
                                   chunks=[jsonl(CHAT[:2])])
    Registry(home).add("acme/small-chat", "acme/small-chat-hub-id")

    registry = Registry(home)
    with home.db.session() as s:  # what POST /v1/fine-tunes does
        done_id = create_job(s, "alice", {"training_file": train.id, "model": "tunehouse/tiny-llama",
                                          "n_epochs": 1, "suffix": "old"}, registry, files).id
    with home.db.session() as s:
        create_job(s, "bob", {"training_file": val.id, "model": "tunehouse/tiny-llama", "learning_rate": 1e-3},
                   registry, files)
    with home.db.session() as s:
        job = jobs.claim_next(s, "old-worker")
        assert job.id == done_id, "the older job is claimed first"
        jobs.add_event(s, done_id, "JOB_START", "Job started")
        for step in (1, 2, 3):
            jobs.record_metric(s, done_id, step, {"train_loss": 2.0 / step, "train/global_step": step})
        for step, kind in ((2, "Intermediate"), (3, "Final")):
            key = f"jobs/{done_id}/out/{'final' if kind == 'Final' else f'checkpoints/step-{step:06d}'}"
            home.blobs.path(key).mkdir(parents=True, exist_ok=True)
            (home.blobs.path(key) / "adapter_config.json").write_text(json.dumps({"r": 8, "step": step}))
            jobs.record_checkpoint(s, done_id, step, kind, key)
        for status in ("uploading", "completed"):
            jobs.set_status(job, status)
        jobs.add_event(s, done_id, "JOB_COMPLETE", "Job finished", step=3)
    home.db.dispose()

    with sqlite3.connect(root / "home" / "tunehouse.db") as conn:  # everything in the main file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return snapshot(root / "home", bob_key)


def snapshot(home_dir: Path, bob_key: str) -> dict:
    """What the test compares: rows as plain values, file contents by sha256."""
    db = sqlite3.connect(home_dir / "tunehouse.db")
    db.row_factory = sqlite3.Row

    def rows(sql: str) -> list[dict]:
        return [dict(r) for r in db.execute(sql)]

    files = rows("SELECT id, owner, filename, file_type, bytes, checksum, processing_status, num_samples "
                 "FROM files ORDER BY id")
    for f in files:
        blob = home_dir / "blobs" / "files" / f"{f['id']}.{f['file_type']}"
        f["content_sha256"] = hashlib.sha256(blob.read_bytes()).hexdigest()
    out = {
        "release": "227d48c",
        "admin_key": (home_dir / "admin.key").read_text().strip(),
        "bob_key": bob_key,
        "files": files,
        "jobs": rows("SELECT id, owner, status, model, training_file, validation_file, model_output_name, attempts, "
                     "config FROM jobs ORDER BY id"),
        "events": rows("SELECT job_id, type, message FROM events ORDER BY id"),
        "metrics": rows("SELECT job_id, step, \"values\" FROM metrics ORDER BY job_id, step"),
        "checkpoints": rows("SELECT job_id, step, checkpoint_type, blob_key FROM checkpoints ORDER BY job_id, step"),
        "models": rows("SELECT name, source FROM models ORDER BY name"),
    }
    db.close()
    for j in out["jobs"]:
        j["config"] = json.loads(j["config"])
    for m in out["metrics"]:
        m["values"] = json.loads(m["values"])
    return out


def main(dest: Path) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(sys.modules["tunehouse"].__file__).parent).stdout.strip()
    if not commit.startswith("227d48c"):
        sys.exit(f"run this with release 227d48c's code on PYTHONPATH (found {commit or 'no git checkout'})")
    with tempfile.TemporaryDirectory() as tmp:
        record = make(Path(tmp))
        with tarfile.open(dest / "home-227d48c.tar.gz", "w:gz") as tar:
            tar.add(Path(tmp) / "home", arcname="home")
    (dest / "home-227d48c.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {dest / 'home-227d48c.tar.gz'} and {dest / 'home-227d48c.json'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
