"""The server secret and the admin key from settings (TUNEHOUSE_SECRET, TUNEHOUSE_ADMIN_KEY), for
API servers with no home of their own: used instead of the home's files, none written."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tunehouse import sealing, signing
from tunehouse.client import resolve_api_key
from tunehouse.settings import Settings
from tunehouse.store import keys
from tunehouse.store.home import ensure_admin_key, open_home
from tunehouse.store.tables import ApiKey

SECRET, ADMIN = "0123456789abcdef" * 4, "th-" + "a" * 40


def test_short_secret_and_admin_key_are_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEHOUSE_SECRET", "too-short")
    with pytest.raises(ValidationError, match="at least 32 characters.*openssl rand -hex 32"):
        Settings(home=tmp_path)
    monkeypatch.delenv("TUNEHOUSE_SECRET")
    with pytest.raises(ValidationError, match="TUNEHOUSE_ADMIN_KEY must be at least 32"):
        Settings(home=tmp_path, admin_key="th-short")


def test_secret_from_settings_signs_and_seals_and_no_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEHOUSE_SECRET", SECRET)
    one, two = open_home(Settings(home=tmp_path / "a")), open_home(Settings(home=tmp_path / "b"))
    assert one.secret == two.secret == SECRET.encode()
    assert not (tmp_path / "a" / "secret.key").exists()
    # what one server signs or seals, the other (another home, the same setting) accepts
    token = signing.sign(one.secret, "file-1", "nonce", 60)
    assert signing.verify(two.secret, token, "file-1") == "nonce"
    assert sealing.unseal(two.secret, sealing.seal(one.secret, "wandb-key")) == "wandb-key"
    repr_ = repr(Settings(home=tmp_path / "a"))
    assert SECRET not in repr_, "the secret stays out of logs and tracebacks"


def test_admin_key_from_settings_is_stored_once_and_no_file_is_written(tmp_path, monkeypatch):
    st = Settings(home=tmp_path / "h", admin_key=ADMIN)
    home = open_home(st)
    assert ensure_admin_key(home) is None and ensure_admin_key(home) is None
    assert not st.admin_key_path.exists()
    with home.db.session() as s:
        row = keys.lookup(s, ADMIN)
        assert row is not None and row.is_admin and s.query(ApiKey).count() == 1
    monkeypatch.delenv("TUNEHOUSE_API_KEY", raising=False)
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    assert resolve_api_key(None, st) == ADMIN  # the CLI finds it with no key file


def test_worker_passes_the_secret_to_its_training_child(tmp_path, monkeypatch):
    """The child builds its settings from its environment: it opens the jobs' sealed keys with
    the secret the worker was given, not a secret.key it would mint in the home."""
    from tunehouse.worker.loop import Worker

    monkeypatch.delenv("TUNEHOUSE_SECRET", raising=False)
    w = Worker(open_home(Settings(home=tmp_path / "h", secret=SECRET, embedded_worker=False)))
    for name, value in w._child_env().items():
        if name.startswith("TUNEHOUSE_"):
            monkeypatch.setenv(name, value)
    assert open_home(Settings()).secret == SECRET.encode()
    assert not (tmp_path / "h" / "secret.key").exists()


def test_plain_postgresql_urls_use_the_installed_driver(tmp_path):
    for given in ("postgresql://u:p@db:5432/th", "postgres://u:p@db:5432/th"):
        assert Settings(home=tmp_path, database_url=given).db_url == "postgresql+psycopg://u:p@db:5432/th"
    same = "postgresql+psycopg://u@db/th"
    assert Settings(home=tmp_path, database_url=same).db_url == same
