"""Database engine and sessions. SQLite by default (WAL, so the API and the worker read while
the other writes); any SQLAlchemy URL such as PostgreSQL works the same way."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from tunehouse.store.tables import Base


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


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
        kwargs: dict = {"pool_size": 20, "max_overflow": 80}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create(self) -> None:
        _private_sqlite_file(self.url)
        Base.metadata.create_all(self.engine)

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

    def dispose(self) -> None:
        self.engine.dispose()
