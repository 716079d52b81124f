"""Schema migrations: Alembic scripts shipped in the package (`migrations/env.py`,
`migrations/versions/`), run in code, with no alembic.ini.

`upgrade` is what every process runs when it opens a home (the API server, each worker, each
training child) and what `tunehouse db upgrade` runs. Several may start at once, so the work
happens inside one transaction that first takes a lock: `pg_advisory_xact_lock` on PostgreSQL,
`BEGIN IMMEDIATE` (the write lock) on SQLite. Whoever waited finds the schema at head and does
nothing. Both databases have transactional DDL: a failed upgrade leaves the old schema.

A home made before migrations existed (release 227d48c and earlier: tables made by
`create_all`, no `alembic_version`) is repaired as that release did, stamped at 0001 (exactly
that schema) and upgraded from there.

A new revision: change `tables.py`, then
    python -m tunehouse.store.migrate revision "what changed"
which autogenerates `versions/NNNN_….py` against a scratch SQLite database; read it before
committing (`test_migrations.py` fails while a table change has no migration). On SQLite a column
change recreates the table (Alembic's batch mode); the upgrade runs with foreign keys off so that
dropping the old `jobs` does not cascade to its events, metrics and checkpoints (0002 does this).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from tunehouse.store.tables import Metric

SCRIPTS = Path(__file__).with_name("migrations")
BEFORE_MIGRATIONS = "0001"  # the revision whose schema `create_all` made before migrations
# Any fixed 64-bit number that no other application on the server uses: b"tunehous".
LOCK_KEY = int.from_bytes(b"tunehous", "big")


def config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(config()).get_current_head()


def current(engine: Engine) -> str | None:
    """The database's revision; None for an empty database or one made before migrations."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> bool:
    """Bring the database to head; True when something was done. `engine` must begin its
    transactions with the write lock on SQLite (`db.migration_engine`)."""
    if current(engine) == head():  # the common case: no lock, one read
        return False
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and Metric.__tablename__ in tables:
            _repair_metric_index(conn)
            command.stamp(config(conn), BEFORE_MIGRATIONS)
        command.upgrade(config(conn), "head")
        if conn.dialect.name == "sqlite" and (broken := conn.exec_driver_sql("PRAGMA foreign_key_check").all()):
            raise RuntimeError(f"the upgrade would leave rows pointing at nothing ({broken[:3]}…); rolled back")
    return True


def _repair_metric_index(conn: Connection) -> None:
    """A home made before metrics were unique per (job, step) may hold the duplicates a resume
    wrote (208 rows for 198 steps): keep the last row of each step, then add the index."""
    index = next(i for i in Metric.__table__.indexes if i.unique)
    if index.name in {i["name"] for i in inspect(conn).get_indexes(Metric.__tablename__)}:
        return
    conn.execute(text("DELETE FROM metrics WHERE id NOT IN (SELECT MAX(id) FROM metrics GROUP BY job_id, step)"))
    index.create(conn, checkfirst=True)


def _new_revision(message: str) -> None:
    """Autogenerate the next revision from the difference between head and `tables.py`."""
    from tunehouse.store.db import migration_engine

    with tempfile.TemporaryDirectory() as scratch:
        engine = migration_engine(f"sqlite:///{scratch}/scratch.db")
        upgrade(engine)
        number = f"{int(head() or 0) + 1:04d}"
        with engine.begin() as conn:
            command.revision(config(conn), message=message, autogenerate=True, rev_id=number)
        engine.dispose()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "revision":
        sys.exit('usage: python -m tunehouse.store.migrate revision "what changed"')
    _new_revision(sys.argv[2])
