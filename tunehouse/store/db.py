"""Database engine and sessions. SQLite by default (WAL, so the API and the worker read while
the other writes); PostgreSQL by URL (`postgresql+psycopg://…`) when processes on several
machines share the records. The schema is Alembic's (`migrate.py`): `create()` upgrades to head.

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

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from tunehouse.store import migrate

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


# PostgreSQL SQLSTATEs worth a retry: serialization failure, deadlock detected, admin/crash
# shutdown, cannot connect now (starting up), too many connections, and class 08 (connection
# exceptions). Other OperationalErrors there (a cancelled statement, a full disk) are not.
PG_TRANSIENT = ("40001", "40P01", "57P01", "57P02", "57P03", "53300", "08")


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: SQLite locked/busy, a PostgreSQL serialization failure,
    deadlock or shutdown, or the connection went away."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    code = getattr(exc.orig, "sqlstate", None)  # psycopg's; sqlite3 errors have none
    return code is None or code.startswith(PG_TRANSIENT)


def make_engine(url: str, **kwargs) -> Engine:
    """An engine with the per-database connection set-up: SQLite pragmas; PostgreSQL sessions
    in UTC (times come back as UTC, whatever the server's TimeZone)."""
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}
    elif make_url(url).get_driver_name() == "psycopg":
        kwargs["connect_args"] = {"options": "-c TimeZone=UTC"}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def migration_engine(url: str) -> Engine:
    """A one-connection engine for `migrate.upgrade`: on SQLite its transactions start with
    `BEGIN IMMEDIATE`, so the upgrade holds the write lock from its first read (DDL alone would
    not make the driver begin one)."""
    engine = make_engine(url, poolclass=NullPool)
    if url.startswith("sqlite"):
        # A SQLite migration that changes a column recreates the table (copy, drop, rename): with
        # foreign keys on, dropping `jobs` would cascade-delete every event, metric and
        # checkpoint. Off for the upgrade (it cannot change inside a transaction); `migrate`
        # checks the keys before it commits.
        event.listen(engine, "connect", lambda dbapi_conn, _record: dbapi_conn.execute("PRAGMA foreign_keys=OFF"))
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return engine


def private_sqlite_file(url: str) -> None:
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
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists():
            p.chmod(0o600)


class Database:
    """Engine + session factory; `create()` brings the schema to head (idempotent)."""

    def __init__(self, url: str, *, pool_size: int | None = None, max_overflow: int | None = None):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            # Room for every request thread (anyio's pool has 40) to hold a session while a helper
            # it calls opens another: a pool of 5+10 starved 50 concurrent chat requests (30 s
            # timeouts). SQLite connections are files: they cost the server nothing.
            sizes = (20, 80)
        else:
            # Each connection is a server process: a stock PostgreSQL allows 100 (97 for us), shared
            # by every API server, worker and training child. 10 kept + 20 on demand = 30 at most
            # per process; two API servers (60) and a dozen workers with their children (1-2 each
            # in use) fit. Settings `database_pool_size` / `database_max_overflow` change it.
            sizes = (10, 20)
        kwargs = {"pool_size": pool_size if pool_size is not None else sizes[0],
                  "max_overflow": max_overflow if max_overflow is not None else sizes[1],
                  "pool_pre_ping": not self.is_sqlite}
        self.engine: Engine = make_engine(url, **kwargs)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create(self, *, upgrade: bool = True) -> None:
        """Upgrade the schema to head (a new database is made by the migrations). With
        `upgrade=False` a database that is not at head is refused instead."""
        private_sqlite_file(self.url)
        engine = migration_engine(self.url)
        try:
            if upgrade:
                migrate.upgrade(engine)
            elif (found := migrate.current(engine)) != migrate.head():
                raise RuntimeError(f"The database schema is at revision {found or 'none'}, this release needs "
                                   f"{migrate.head()}: run `tunehouse db upgrade` (or drop "
                                   "TUNEHOUSE_DATABASE_AUTO_UPGRADE=false, and each process upgrades it at start).")
        finally:
            engine.dispose()

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
