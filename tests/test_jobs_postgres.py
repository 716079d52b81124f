"""What only PostgreSQL (workers on several machines) has: the claim skips rows other workers have
locked instead of waiting for them, heartbeats and staleness read the database's clock (a worker
whose own clock is 10 minutes off neither requeues a live job nor gets its job requeued), its
transient errors are retried, and two API servers start at once on one empty database."""

from __future__ import annotations

import threading
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from conftest import DATA
from services.postgres import database_url
from tunehouse import jobs
from tunehouse.api.app import create_app
from tunehouse.api.server import serve_in_thread
from tunehouse.ids import new_job_id
from tunehouse.settings import Settings
from tunehouse.store.db import Database, is_transient
from tunehouse.store.tables import ApiKey, Job, utcnow

CONFIG = {"train": {"lora": True}, "extra": {}}


@pytest.fixture
def db(request):
    d = Database(database_url(request))
    d.create()
    yield d
    d.dispose()


def _queued(db: Database, n: int, **kw) -> list[str]:
    with db.session() as s:
        rows = [Job(id=new_job_id(), owner="alice", status="queued", model="m", training_file="file-x", config=CONFIG,
                    created_at=utcnow() + timedelta(seconds=i), **kw) for i in range(n)]
        s.add_all(rows)
    return [r.id for r in rows]


def test_claim_skips_a_row_another_worker_holds(db):
    """Worker A has locked the oldest job in an open transaction; worker B gets the next one at
    once (a plain conditional UPDATE would wait for A's commit)."""
    first, second = _queued(db, 2)
    with db.session() as a:
        assert jobs.claim_next(a, "A").id == first
        with db.session() as b:
            b.execute(text("SET LOCAL lock_timeout = '2s'"))  # waiting would fail, not hang
            assert jobs.claim_next(b, "B").id == second
            assert jobs.claim_next(b, "B") is None  # A's row is skipped, not waited for


def _shift_clock(monkeypatch, minutes: int) -> None:
    monkeypatch.setattr(jobs, "utcnow", lambda: utcnow() + timedelta(minutes=minutes))


def test_worker_clock_ahead_does_not_requeue_a_live_job(db, monkeypatch):
    (job_id,) = _queued(db, 1)
    with db.session() as s:
        jobs.claim_next(s, "honest")
        jobs.heartbeat(s, job_id, "honest")
    _shift_clock(monkeypatch, +10)  # this worker believes it is 10 minutes later
    with db.session() as s:
        assert jobs.recover_stale(s, timeout_s=60) == []
        assert s.get(Job, job_id).status == "running"
    with db.session() as s:  # a job whose heartbeat really stopped 5 minutes ago is still requeued
        s.execute(text("UPDATE jobs SET heartbeat_at = now() - interval '5 minutes' WHERE id = :id"), {"id": job_id})
    with db.session() as s:
        assert jobs.recover_stale(s, timeout_s=60) == [job_id]


def test_worker_clock_behind_is_not_requeued(db, monkeypatch):
    (job_id,) = _queued(db, 1)
    _shift_clock(monkeypatch, -10)  # this worker's heartbeats would look 10 minutes old
    with db.session() as s:
        jobs.claim_next(s, "slow-clock")
    with db.session() as s:
        jobs.heartbeat(s, job_id, "slow-clock")
    monkeypatch.undo()
    with db.session() as s:  # another worker, with a right clock, checks for stale jobs
        assert jobs.recover_stale(s, timeout_s=60) == []
        job = s.get(Job, job_id)
        assert job.status == "running" and job.worker_id == "slow-clock"
        assert abs((job.heartbeat_at - s.scalar(text("SELECT now()"))).total_seconds()) < 5


def test_transient_errors_are_recognised(db):
    """Deadlock, serialization failure and a terminated connection (what an admin shutdown or a
    failover does) are retried; a constraint violation is not."""
    a_id, b_id = _queued(db, 2)
    caught = {}

    def lock_in_order(first: str, second: str, name: str, barrier: threading.Barrier) -> None:
        try:
            with db.session() as s:
                s.execute(text("UPDATE jobs SET attempts = 1 WHERE id = :id"), {"id": first})
                barrier.wait()
                s.execute(text("UPDATE jobs SET attempts = 2 WHERE id = :id"), {"id": second})
        except OperationalError as exc:
            caught[name] = exc

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=lock_in_order, args=(a_id, b_id, "x", barrier)),
               threading.Thread(target=lock_in_order, args=(b_id, a_id, "y", barrier))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (deadlock,) = caught.values()
    assert deadlock.orig.sqlstate == "40P01" and is_transient(deadlock)

    with db.engine.connect() as one, db.engine.connect() as two:
        for conn in (one, two):
            conn.execute(text("BEGIN ISOLATION LEVEL SERIALIZABLE"))
            conn.execute(text("SELECT attempts FROM jobs WHERE id = :id"), {"id": a_id}).all()
        one.execute(text("UPDATE jobs SET attempts = 5 WHERE id = :id"), {"id": a_id})
        one.commit()
        with pytest.raises(OperationalError) as serial:
            two.execute(text("UPDATE jobs SET attempts = 6 WHERE id = :id"), {"id": a_id})
        assert serial.value.orig.sqlstate == "40001" and is_transient(serial.value)
        two.rollback()

    with db.engine.connect() as victim:
        pid = victim.execute(text("SELECT pg_backend_pid()")).scalar()
        with db.engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(OperationalError) as shutdown:
            victim.execute(text("SELECT 1"))
        assert is_transient(shutdown.value)
    # retrying() rides over it: the pool's next connection is a fresh one
    assert db.retrying(lambda s: s.scalar(text("SELECT 1"))) == 1

    with pytest.raises(Exception) as dup, db.session() as s:
        s.execute(text("INSERT INTO jobs (id, owner, status, method, model, training_file, config, attempts, "
                       "created_at, updated_at) SELECT id, owner, status, method, model, training_file, config, "
                       "attempts, created_at, updated_at FROM jobs WHERE id = :id"), {"id": a_id})
    assert not is_transient(dup.value)


def test_two_servers_start_together_on_an_empty_database(request, tmp_path):
    """Two API servers (separate homes, one database, TUNEHOUSE_ADMIN_KEY and TUNEHOUSE_SECRET set)
    start at once: the schema is made once, one admin key row exists, the key works on both, an
    upload begun on one finishes on the other, and neither writes admin.key or secret.key."""
    url, key = database_url(request), "th-" + "k" * 40
    barrier, apps, errors = threading.Barrier(2), [None, None], []

    def start(n: int) -> None:
        st = Settings(home=tmp_path / f"home{n}", database_url=url, admin_key=key, secret="s" * 32,
                      blob_dir=tmp_path / "blobs", embedded_worker=False)  # one store, as S3 will be
        barrier.wait()
        try:
            apps[n] = create_app(st)
        except Exception as exc:  # noqa: BLE001 — asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    servers = [serve_in_thread(app) for app in apps]
    auth = {"Authorization": f"Bearer {key}"}
    data = (DATA / "api" / "chat.jsonl").read_bytes()
    try:
        for bg in servers:
            r = httpx.get(f"{bg.url}/v3/whoami", headers=auth)
            assert r.status_code == 200 and r.json()["organization"]["id"] == "admin"
        # The upload flow split over both: server 0 signs the PUT URL, server 1 (the same
        # TUNEHOUSE_SECRET, no secret.key) accepts it; both then list and serve the file.
        begun = httpx.post(f"{servers[0].url}/v1/files", headers=auth, data={"file_name": "chat.jsonl",
                                                                            "purpose": "fine-tune"})
        assert begun.status_code == 302, begun.text
        put_url = begun.headers["location"].replace(servers[0].url, servers[1].url)
        assert httpx.put(put_url, content=data).status_code == 200
        file_id = begun.headers["x-together-file-id"]
        assert httpx.post(f"{servers[0].url}/v1/files/{file_id}/preprocess", headers=auth).status_code == 200
        for bg in servers:
            assert [f["id"] for f in httpx.get(f"{bg.url}/v1/files", headers=auth).json()["data"]] == [file_id]
            assert httpx.get(f"{bg.url}/v1/files/{file_id}/content", headers=auth).content == data
    finally:
        for bg in servers:
            bg.stop()
    with apps[0].state.home.db.session() as s:
        assert s.query(ApiKey).filter(ApiKey.is_admin).count() == 1
    assert not (tmp_path / "home0" / "admin.key").exists() and not (tmp_path / "home1" / "admin.key").exists()
    assert not (tmp_path / "home0" / "secret.key").exists()
    assert apps[0].state.home.secret == apps[1].state.home.secret == b"s" * 32
