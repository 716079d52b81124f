"""Load on a live loopback server with a real SQLite file: 50 concurrent uploads (one-shot and the
together SDK's three-step flow) and 100 chat requests while a job trains on the tiny model. Nothing
fails, `/health` keeps answering fast, the job completes with one metric row per step, and every
upload is listed once with its bytes intact.

Before the fix, 5 concurrent one-shot uploads of 1.6 KB gave 3 errors 500 "database is locked" and a
/health that answered after 30 s; a training child died on its metric write the same way."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import httpx

from jobs_support import wait_for, write_chat
from together import Together

TINY = "tunehouse/tiny-llama"
UPLOADS, CHATS = 50, 100


def _dataset(i: int) -> bytes:
    """About 1.6 KB of valid chat JSONL, different for every i (no duplicate-checksum refusals)."""
    rows = [{"messages": [{"role": "user", "content": f"Upload {i}, question {j}: say something."},
                          {"role": "assistant", "content": f"Answer {j} of upload {i}."}]} for j in range(12)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _upload_oneshot(url: str, key: str, i: int) -> str:
    r = httpx.post(f"{url}/v1/files/upload", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   data={"purpose": "fine-tune", "file_name": f"load-{i}.jsonl"},
                   files={"file": (f"load-{i}.jsonl", _dataset(i))})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _upload_three_step(url: str, key: str, i: int) -> str:
    """What the together SDKs do: announce (302 to a signed URL), PUT the bytes, preprocess."""
    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{url}/v1/files", headers=auth, timeout=60,
                   data={"purpose": "fine-tune", "file_name": f"load-{i}.jsonl", "file_type": "jsonl"})
    assert r.status_code == 302, r.text
    file_id = r.headers["X-Together-File-Id"]
    put = httpx.put(r.headers["Location"], content=_dataset(i), timeout=60)
    assert put.status_code == 200, put.text
    pre = httpx.post(f"{url}/v1/files/{file_id}/preprocess", headers=auth, timeout=60)
    assert pre.status_code == 200 and pre.json()["processing_status"] == "COMPLETED", pre.text
    return file_id


def _chat(url: str, key: str, i: int) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": TINY, "messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def _load(url: str, key: str) -> tuple[list[str], dict[str, int]]:
    """All uploads and chats at once from 64 threads → (errors, {file id: dataset number})."""
    with ThreadPoolExecutor(max_workers=64) as pool:
        uploads = [pool.submit(_upload_oneshot if i % 2 else _upload_three_step, url, key, i) for i in range(UPLOADS)]
        chats = [pool.submit(_chat, url, key, i) for i in range(CHATS)]
        errors = [repr(f.exception()) for f in uploads + chats if f.exception() is not None]
    return errors, {f.result(): i for i, f in enumerate(uploads) if f.exception() is None}


def test_uploads_and_chat_while_a_job_trains(live_worker, tmp_path):
    url, key = live_worker.url, live_worker.key
    c = Together(base_url=url, api_key=key, max_retries=0)
    train = c.files.upload(write_chat(tmp_path / "train.jsonl", 60))
    job = c.fine_tuning.create(training_file=train.id, model=TINY, lora=True, n_epochs=2, n_checkpoints=4,
                               batch_size=1, packing=False, learning_rate=1e-3)
    wait_for(c, job.id, statuses={"running"}, timeout=60)
    _chat(url, key, -1)  # load the model once, so the load below measures serving, not loading

    latencies, stop = [], threading.Event()

    def poll_health():
        with httpx.Client(timeout=30) as h:
            while not stop.is_set():
                t0 = time.monotonic()
                assert h.get(f"{url}/health").status_code == 200
                latencies.append(time.monotonic() - t0)
                stop.wait(0.05)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    t_load = time.monotonic()
    # the clients run in their own process, as real ones do: 64 client threads inside the server's
    # process would compete with it for the GIL and the measure would be of the test, not the server
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as proc:
        errors, ids = proc.submit(_load, url, key).result(timeout=300)
    stop.set()
    poller.join(30)
    trained = c.fine_tuning.retrieve(job.id)
    print(f"load: {time.monotonic() - t_load:.1f} s, job {trained.status} at the end of it; /health "
          f"p50 {sorted(latencies)[len(latencies) // 2]:.3f} s, max {max(latencies):.3f} s over {len(latencies)} polls")
    assert errors == [], f"{len(errors)} of {UPLOADS + CHATS} requests failed: {errors[:3]}"

    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    assert len(latencies) >= 10 and p99 < 1.0, f"/health p99 {p99:.2f} s over {len(latencies)} polls"

    done = wait_for(c, job.id, timeout=180)
    assert done.status == "completed", [e.message for e in c.fine_tuning.list_events(job.id).data]
    assert "JOB_RESTARTED" not in [e.type for e in c.fine_tuning.list_events(job.id).data]
    metrics = httpx.get(f"{url}/v1/fine-tunes/{job.id}/metrics", headers={"Authorization": f"Bearer {key}"}).json()
    assert [m["train/global_step"] for m in metrics["metrics"]] == list(range(1, done.total_steps + 1))

    listed = [f["id"] for f in httpx.get(f"{url}/v1/files", headers={"Authorization": f"Bearer {key}"}).json()["data"]]
    assert sorted(i for i in listed if i in ids) == sorted(ids) and len(listed) == len(set(listed)) == UPLOADS + 1
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as h:
        for file_id, i in ids.items():
            assert h.get(f"{url}/v1/files/{file_id}/content").content == _dataset(i), f"upload {i} intact"


def test_an_upload_in_progress_survives_another_process_opening_the_home(tmp_path):
    """Every training child opens the home, which sweeps the blob store's temp files: it used to
    delete the temp file of an upload still being received, whose commit then failed."""
    from tunehouse.store.local_blobs import LocalBlobStore as BlobStore

    store = BlobStore(tmp_path / "blobs")
    with store.writer("files/a.jsonl") as w:
        w.write(b"first half ")
        BlobStore(tmp_path / "blobs").sweep_temp()  # what a training child starting now does
        w.write(b"second half")
        w.commit()
    assert store.local_file("files/a.jsonl").read_bytes() == b"first half second half"
    stale = store.tmp_dir / "dead.part"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    store.sweep_temp()
    assert not stale.exists(), "what a crashed writer left long ago is still removed"
