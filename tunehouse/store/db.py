"""Database engine and sessions. SQLite by default (WAL, so the API and the worker read while
the other writes); any SQLAlchemy URL such as PostgreSQL works the same way.

SQLite allows one writer at a time, so every write transaction here is short: services do their
slow work (hashing, validation, disk writes) before they write, and a transaction starts with
`BEGIN IMMEDIATE` at its first write, waiting (busy_timeout) for the write lock rather than
failing. Writers outside a request (the worker, the training child) go through `Database.retrying`,
which also survives what the timeout does not: a locked database, a dropped connection.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tunehouse.store.tables import Base, Metric

log = logging.getLogger(__name__)
T = TypeVar("T")
BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.close()
    # The driver opens a transaction just before the first INSERT/UPDATE/DELETE (reads before it
    # run in autocommit, holding no snapshot); IMMEDIATE takes the write lock at that BEGIN, so a
    # writer waits its turn in the busy handler instead of failing with SQLITE_BUSY on upgrade.
    dbapi_conn.isolation_level = "IMMEDIATE"


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: locked/busy, or the connection went away."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError)


def _private_sqlite_file(url: str) -> None:
    """Create the SQLite file 0600 (or tighten an older one) before SQLite opens it: SQLite
    gives its -wal and -shm files the database file's mode."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return
    path = Path(u.database)
    # Never open and close an existing database file here: closing any descriptor of it drops
    # every POSIX lock this process holds on it, and SQLite connections of this process that
    # are open already then fail ("disk I/O error", seen when a second home was opened in a
    # process serving the first).
    if not path.exists():
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists():
            p.chmod(0o600)


class Database:
    """Engine + session factory; `create()` makes the schema (idempotent)."""

    def __init__(self, url: str):
        self.url = url
        # Room for every request thread (anyio's pool has 40) to hold a session while a helper it
        # calls opens another: a pool of 5+10 starved 50 concurrent chat requests (30 s timeouts).
        kwargs: dict = {"pool_size": 20, "max_overflow": 80, "pool_pre_ping": not url.startswith("sqlite")}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create(self) -> None:
        _private_sqlite_file(self.url)
        Base.metadata.create_all(self.engine)
        self._ensure_metric_index()

    def _ensure_metric_index(self) -> None:
        """A home made before metrics were unique per (job, step) may hold the duplicates a resume
        wrote (208 rows for 198 steps): keep the last row of each step, then add the index."""
        index = next(i for i in Metric.__table__.indexes if i.unique)
        if index.name in {i["name"] for i in inspect(self.engine).get_indexes(Metric.__tablename__)}:
            return
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM metrics WHERE id NOT IN "
                              "(SELECT MAX(id) FROM metrics GROUP BY job_id, step)"))
            index.create(conn, checkfirst=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def retrying(self, fn: Callable[[Session], T], *, what: str = "database write",
                 give_up_after_s: float = 120.0) -> T:
        """`fn(session)` in its own committed session; a transient error rolls it back and runs it
        again with jittered exponential backoff (0.05 s doubling to 5 s) until `give_up_after_s`.
        `fn` must be safe to run again: it sees a fresh session each time."""
        deadline, wait = time.monotonic() + give_up_after_s, 0.05
        while True:
            try:
                with self.session() as s:
                    return fn(s)
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + wait > deadline:
                    raise
                log.warning("%s failed (%s); retrying in %.2f s", what, str(exc).splitlines()[0], wait)
                time.sleep(wait * random.uniform(0.5, 1.0))
                wait = min(wait * 2, 5.0)

    def dispose(self) -> None:
        self.engine.dispose()
