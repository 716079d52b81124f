"""`tunehouse db upgrade | current`: the schema, for operators who upgrade explicitly (every
process also upgrades when it starts, unless TUNEHOUSE_DATABASE_AUTO_UPGRADE=false)."""

from __future__ import annotations

import typer

from tunehouse.cli.common import HomeDir, console, settings_for

db_app = typer.Typer(help="The database schema (TUNEHOUSE_DATABASE_URL, or the home's SQLite file).",
                     no_args_is_help=True)


def _where(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def upgrade(home: HomeDir = None):
    """Upgrade the schema to this release's head (safe while servers and workers run)."""
    from tunehouse.store import migrate
    from tunehouse.store.db import private_sqlite_file, migration_engine

    url = settings_for(home).db_url
    private_sqlite_file(url)
    engine = migration_engine(url)
    try:
        before = migrate.current(engine)
        done = migrate.upgrade(engine)
        after = migrate.current(engine)
    finally:
        engine.dispose()
    if done:
        console.print(f"Upgraded {_where(url)} from {before or 'no schema'} to {after}.")
    else:
        console.print(f"{_where(url)} is already at {after} (head).")


@db_app.command("current")
def current(home: HomeDir = None):
    """Print the database's schema revision and this release's head."""
    from tunehouse.store import migrate
    from tunehouse.store.db import migration_engine, private_sqlite_file

    url = settings_for(home).db_url
    private_sqlite_file(url)  # SQLite would make a missing file with the umask's mode
    engine = migration_engine(url)
    try:
        found = migrate.current(engine)
    finally:
        engine.dispose()
    head = migrate.head()
    state = "up to date" if found == head else "run `tunehouse db upgrade`"
    console.print(f"{_where(url)}: revision {found or 'none'} (head {head}; {state})")
