"""The job state machine and recovery rules, without HTTP or training; on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from conftest import BACKENDS
from tunehouse import jobs
from tunehouse.errors import Conflict
from tunehouse.ids import new_job_id
from tunehouse.store.db import Database
from tunehouse.store.tables import Job, utcnow

CONFIG = {"train": {"lora": True}, "extra": {}}
pytestmark = pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)


@pytest.fixture
def db(settings):
    d = Database(settings.db_url)
    d.create()
    yield d
    d.dispose()


def _job(s, status="queued", **kw) -> Job:
    job = Job(id=new_job_id(), owner="alice", status=status, model="m",
              training_file="file-x", config=CONFIG, **kw)
    s.add(job)
    s.flush()
    return job


def test_allowed_and_refused_transitions(db):
    with db.session() as s:
        job = _job(s, "pending")
        for status in ("queued", "running", "uploading", "completed"):
            jobs.set_status(job, status)
        with pytest.raises(Conflict):
            jobs.set_status(job, "running")  # terminal states are final
    assert jobs.TERMINAL == {"completed", "cancelled", "error", "user_error"}
    assert all(not jobs.TRANSITIONS[t] for t in jobs.TERMINAL)


def test_cancel_before_start_is_immediate_and_running_is_requested(db):
    with db.session() as s:
        queued, running = _job(s, "queued"), _job(s, "running")
        assert jobs.request_cancel(s, queued).status == "cancelled"
        assert jobs.request_cancel(s, running).status == "cancel_requested"
        with pytest.raises(Conflict):
            jobs.request_cancel(s, running)


def test_claim_is_exclusive_and_oldest_first(db):
    with db.session() as s:
        first = _job(s, "queued")
        first.created_at = utcnow() - timedelta(seconds=5)
        _job(s, "queued")
    with db.session() as s:
        a = jobs.claim_next(s, "w1")
        b = jobs.claim_next(s, "w2")
        c = jobs.claim_next(s, "w3")
    assert a.id == first.id and a.status == "running" and a.attempts == 1 and a.worker_id == "w1"
    assert b is not None and b.id != a.id and c is None


def test_stale_heartbeat_requeues_then_fails_after_max_attempts(db):
    with db.session() as s:
        job = _job(s, "running", worker_id="dead", heartbeat_at=utcnow() - timedelta(minutes=5), attempts=1)
        job_id = job.id
    for attempt in range(1, jobs.MAX_ATTEMPTS + 1):
        with db.session() as s:
            assert jobs.recover_stale(s, timeout_s=60) == [job_id]
            job = s.get(Job, job_id)
            if attempt < jobs.MAX_ATTEMPTS:
                assert job.status == "queued"
                claimed = jobs.claim_next(s, "w")
                claimed.heartbeat_at = utcnow() - timedelta(minutes=5)
            else:
                assert job.status == "error"
    with db.session() as s:
        types = [e.type for e in jobs.events(s, job_id)]
        last = jobs.events(s, job_id)[-1]
    assert types.count("JOB_RESTARTED") == jobs.MAX_ATTEMPTS - 1 and types[-1] == "JOB_ERROR"
    assert "3 attempts" in last.message and "heartbeats" in last.message


def test_fresh_heartbeat_is_left_alone_and_own_jobs_recover_on_start(db):
    with db.session() as s:
        alive = _job(s, "running", worker_id="w-alive", heartbeat_at=utcnow(), attempts=1)
        mine = _job(s, "running", worker_id="me", heartbeat_at=utcnow(), attempts=1)
        alive_id, mine_id = alive.id, mine.id
    with db.session() as s:
        assert jobs.recover_stale(s, timeout_s=60) == []
        assert jobs.recover_own(s, "me") == [mine_id]
        assert s.get(Job, alive_id).status == "running" and s.get(Job, mine_id).status == "queued"


def test_many_workers_claim_each_job_exactly_once(db, settings):
    """Eight workers, each with its own engine (its own connections), claim from 20 queued jobs
    at once until none is left: every job is claimed once, by one worker, on its first attempt."""
    with db.session() as s:
        ids = {_job(s, "queued").id for _ in range(20)}
    barrier, claims, errors = threading.Barrier(8), [], []

    def work(n: int) -> None:
        mine = Database(settings.db_url)
        barrier.wait()
        try:
            while True:
                job = mine.retrying(lambda s: jobs.claim_next(s, f"w{n}"), what="claim")
                if job is None:
                    return
                claims.append((job.id, f"w{n}"))
        except Exception as exc:  # noqa: BLE001 — asserted below
            errors.append(exc)
        finally:
            mine.dispose()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(job_id for job_id, _ in claims) == sorted(ids), "each job claimed exactly once"
    with db.session() as s:
        rows = {j.id: j for j in s.query(Job).all()}
    assert all(rows[i].status == "running" and rows[i].attempts == 1 for i in ids)
    assert {rows[i].worker_id for i, _ in claims} == {w for _, w in claims}
    assert len({w for _, w in claims}) > 1, "the claims were spread over several workers"
