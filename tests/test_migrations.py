"""Schema migrations: a new database (SQLite, PostgreSQL) is made by `upgrade head` and matches
`tables.py`; processes opening one database at once upgrade it once; a home written by release
227d48c (before migrations; tests/data/make_old_home.py) is upgraded with every file, job and
model still there."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import tarfile
import threading

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from conftest import BACKENDS, DATA
from tunehouse.api.app import create_app
from tunehouse.api.server import serve_in_thread
from tunehouse.settings import Settings
from tunehouse.store import migrate
from tunehouse.store.db import Database
from tunehouse.store.tables import Base, Metric

OLD = json.loads((DATA / "home-227d48c.json").read_text())


@pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
def test_new_database_is_made_by_the_migrations_and_matches_the_tables(settings):
    db = Database(settings.db_url)
    db.create()
    with db.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == migrate.head()
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"tables.py and the migrations differ (add a revision): {diff}"
    db.create()  # again: at head, nothing to do
    db.dispose()


@pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
def test_processes_starting_together_upgrade_once(settings):
    """Eight openers of one empty database at once (the API server, workers, training children
    starting together): every one succeeds and the schema is made once."""
    settings.home.mkdir(parents=True)
    barrier, errors = threading.Barrier(8), []

    def open_db():
        db = Database(settings.db_url)
        barrier.wait()
        try:
            db.create()
        except Exception as exc:  # noqa: BLE001 — collected and asserted below
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=open_db) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = Database(settings.db_url)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [migrate.head()]
    db.dispose()


def _old_home(tmp_path):
    with tarfile.open(DATA / "home-227d48c.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "home"


def test_home_of_release_227d48c_is_upgraded_with_everything_in_it(tmp_path):
    home = _old_home(tmp_path)
    with sqlite3.connect(home / "tunehouse.db") as conn:
        assert "alembic_version" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    app = create_app(Settings(home=home, embedded_worker=False))
    bg = serve_in_thread(app)
    try:
        with httpx.Client(base_url=f"{bg.url}/v1") as http:
            for owner_key in ("admin_key", "bob_key"):
                _same_as_recorded(http, {"Authorization": f"Bearer {OLD[owner_key]}"})
    finally:
        bg.stop()
    with app.state.home.db.session() as s:
        assert s.scalar(text("SELECT version_num FROM alembic_version")) == migrate.head()
        assert s.scalar(select(func.count()).select_from(Metric)) == len(OLD["metrics"])


def _same_as_recorded(http: httpx.Client, auth: dict) -> None:
    """Files (with their bytes), jobs (with events, checkpoints, metrics) and models, as the
    release that wrote them recorded them; each owner sees exactly their own."""
    files = http.get("/files", headers=auth).json()["data"]
    owner = {f["owner"] for f in OLD["files"] if f["id"] in {x["id"] for x in files}}
    assert len(owner) == 1, "one owner's files"
    mine = [f for f in OLD["files"] if f["owner"] in owner]
    assert sorted((f["id"], f["filename"], f["bytes"]) for f in files) == \
        sorted((f["id"], f["filename"], f["bytes"]) for f in mine)
    for f in mine:
        content = http.get(f"/files/{f['id']}/content", headers=auth)
        assert content.status_code == 200 and hashlib.sha256(content.content).hexdigest() == f["content_sha256"]

    listed = http.get("/fine-tunes", headers=auth).json()["data"]
    my_jobs = [j for j in OLD["jobs"] if j["owner"] in owner]
    assert sorted(j["id"] for j in listed) == sorted(j["id"] for j in my_jobs)
    for j in my_jobs:
        got = http.get(f"/fine-tunes/{j['id']}", headers=auth).json()
        assert (got["status"], got["model"], got["training_file"]) == (j["status"], j["model"], j["training_file"])
        assert got["model_output_name"] == j["model_output_name"]
        events = http.get(f"/fine-tunes/{j['id']}/events", headers=auth).json()["data"]
        expected = [e["message"] for e in OLD["events"] if e["job_id"] == j["id"]]
        assert [e["message"] for e in events if e["message"] in expected] == expected
        cps = http.get(f"/fine-tunes/{j['id']}/checkpoints", headers=auth).json()["data"]
        assert sorted((c["step"], c["checkpoint_type"]) for c in cps) == \
            sorted((c["step"], c["checkpoint_type"]) for c in OLD["checkpoints"] if c["job_id"] == j["id"])
        rows = http.get(f"/fine-tunes/{j['id']}/metrics", headers=auth).json()["metrics"]
        expected_losses = [m["values"]["train_loss"] for m in OLD["metrics"] if m["job_id"] == j["id"]]
        assert [r["train_loss"] for r in rows if "train_loss" in r] == expected_losses

    models = {m["id"] for m in http.get("/models", headers=auth).json()["data"]}
    assert {m["name"] for m in OLD["models"]} <= models


def test_old_home_with_duplicate_metrics_is_repaired_before_the_stamp(tmp_path):
    """A home older still (before metrics were unique per step) holds the duplicates a resume
    wrote: the last row of each step is kept, then the index is made."""
    home = _old_home(tmp_path)
    job_id = OLD["metrics"][0]["job_id"]
    with sqlite3.connect(home / "tunehouse.db") as conn:
        conn.execute("DROP INDEX ux_metrics_job_step")
        conn.execute("INSERT INTO metrics (job_id, step, \"values\", created_at) VALUES (?, 2, ?, '2026-01-01')",
                     (job_id, json.dumps({"train_loss": 0.5})))
    db = Database(f"sqlite:///{home / 'tunehouse.db'}")
    db.create()
    with db.session() as s:
        rows = s.execute(select(Metric.step, Metric.values).where(Metric.job_id == job_id).order_by(Metric.step)).all()
    db.dispose()
    assert [(step, v["train_loss"]) for step, v in rows] == [(1, 2.0), (2, 0.5), (3, 2.0 / 3)]


def test_db_commands_upgrade_and_report(tmp_path):
    from tunehouse.cli import app

    home = _old_home(tmp_path)
    runner = CliRunner()
    before = runner.invoke(app, ["db", "current", "--home", str(home)], env={"COLUMNS": "200"})
    assert before.exit_code == 0 and "revision none" in before.output and "tunehouse db upgrade" in before.output
    up = runner.invoke(app, ["db", "upgrade", "--home", str(home)], env={"COLUMNS": "200"})
    assert up.exit_code == 0 and f"to {migrate.head()}" in up.output, up.output
    after = runner.invoke(app, ["db", "current", "--home", str(home)], env={"COLUMNS": "200"})
    assert f"revision {migrate.head()}" in after.output and "up to date" in after.output


def test_auto_upgrade_off_refuses_an_old_schema(tmp_path):
    from tunehouse.store.home import open_home

    home = _old_home(tmp_path)
    with pytest.raises(RuntimeError, match="tunehouse db upgrade"):
        open_home(Settings(home=home, database_auto_upgrade=False))
    shutil.rmtree(home)


def test_the_repair_query_runs_on_postgresql(request):
    """The same repair on PostgreSQL, for a database made by `create_all` (as a development
    build before migrations would have): duplicates dropped, index made, stamped, at head."""
    from sqlalchemy import create_engine

    from services.postgres import database_url

    url = database_url(request)
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ux_metrics_job_step"))
        conn.execute(text("INSERT INTO jobs (id, owner, status, method, model, training_file, config, attempts, "
                          "created_at, updated_at) VALUES ('ft-1', 'a', 'completed', 'sft', 'm', 'f', '{}', 1, "
                          "now(), now())"))
        for step, loss in ((1, 3.0), (2, 2.0), (2, 1.5), (3, 1.0)):
            conn.execute(text("INSERT INTO metrics (job_id, step, \"values\", created_at) VALUES ('ft-1', :s, :v, "
                              "now())"), {"s": step, "v": json.dumps({"train_loss": loss})})
    engine.dispose()
    db = Database(url)
    db.create()
    with db.session() as s:
        rows = s.execute(select(Metric.step, Metric.values).order_by(Metric.step)).all()
        assert s.scalar(text("SELECT version_num FROM alembic_version")) == migrate.head()
    db.dispose()
    assert [(step, v["train_loss"]) for step, v in rows] == [(1, 3.0), (2, 1.5), (3, 1.0)]
