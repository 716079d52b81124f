"""A real PostgreSQL for the tests: Debian's server binaries (`make test` installs the package),
one cluster per test session, `initdb` in a temp folder, listening on a free 127.0.0.1 port with
its unix socket in that folder; stopped and removed when the session ends. Each test gets its own
database (CREATE DATABASE, ~10 ms; dropped at its teardown).

`initdb` refuses to run as root: as root the folder belongs to `postgres` and the server runs
through `runuser -u postgres --`."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

from services import missing

_server: "PostgresServer | None" = None


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="tunehouse-pg-"))
        self.data, self.port = self.dir / "data", _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        # Durability off: a test cluster, thrown away at the end. max_connections stays at its
        # default (100) so the pool sizes are tried against what a stock server allows.
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"), "-o", opts,
                  "-w", "-t", "60", "start")

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, cwd=self.dir)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        name = f"test_{uuid.uuid4().hex[:16]}"
        self.admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: engines a test left open (an app's pool) must not keep the database alive.
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def require_postgres() -> None:
    """Without PostgreSQL's server binaries a test is skipped locally and fails under CI=true
    (CI runs `make test`, which installs them: a missing one is a broken set-up, not a skip)."""
    if _bin("initdb") and _bin("pg_ctl"):
        return
    missing("PostgreSQL missing (no initdb/pg_ctl): run `make postgres` or `apt-get install postgresql`")


def server(request) -> PostgresServer:
    """The session's PostgreSQL, started by the first test that needs it."""
    global _server
    require_postgres()
    if _server is None:
        _server = PostgresServer()
        request.config.add_cleanup(_stop)
    return _server


def _stop() -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None


def database_url(request) -> str:
    """A fresh, empty database for this test, dropped at its teardown."""
    srv = server(request)
    name = srv.create_database()
    request.addfinalizer(lambda: srv.drop_database(name))
    return srv.url(name)


def database_settings(request) -> dict:
    """Settings fields that point a test's home at its own fresh PostgreSQL database."""
    return {"database_url": database_url(request)}
