"""Shared fixtures: a temporary home, a live server on a loopback port, API keys for two owners,
and the paths of the official SDK environments (together 3.x here, 1.x in its own venv)."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from services import missing
from tunehouse.api.app import create_app
from tunehouse.api.server import serve_in_thread
from tunehouse.settings import Settings
from tunehouse.store import keys

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def pytest_configure(config):
    """One OpenMP/torch thread for the test process and for every training child and server it
    starts (they inherit the variable): the tiny models gain nothing from a second thread, and on
    a busy 2-core machine two spinning OpenMP threads made a 16-step tiny job train in 14 s
    instead of 1.3 s. Set OMP_NUM_THREADS yourself to change it. Serving backend: see below."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The torch engine unless a test says otherwise: the inference contract suite
    # (test_api_inference.py) and test_llama_engine.py run llama.cpp's backend explicitly, and the
    # rest assert the torch engine's exact log-probs, counters and batching.
    os.environ.setdefault("TUNEHOUSE_SERVE_BACKEND", "torch")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Modules holding a `slow` test run first: under pytest-xdist (`make test`) the real-model
    quick-start (minutes) then starts at once beside the rest, not alone at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@dataclass
class Live:
    url: str  # http://127.0.0.1:PORT, no /v1
    key: str  # owner "alice"
    other_key: str  # owner "bob"
    settings: Settings
    app: object


@pytest.fixture
def store_backend(request) -> str:
    """`local` (SQLite file + blob folder) unless a module parametrises it, as the store, jobs,
    worker and API modules do: `pytestmark = pytest.mark.parametrize("store_backend", BACKENDS,
    indirect=True)` runs each of their tests on `remote` (PostgreSQL + S3) as well."""
    return getattr(request, "param", "local")


BACKENDS = ["local", "remote"]


def backend_settings(request, store_backend: str) -> dict:
    """Settings fields for the backend: none for `local`; a fresh database and bucket for `remote`."""
    if store_backend == "local":
        return {}
    from services.postgres import database_settings
    from services.s3 import blob_settings

    return {**database_settings(request), **blob_settings(request)}


@pytest.fixture
def settings(tmp_path, store_backend, request) -> Settings:
    return Settings(home=tmp_path / "home", embedded_worker=False, **backend_settings(request, store_backend))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Built/converted models shared by every test home (the tiny model is built once)."""
    return tmp_path_factory.mktemp("model-cache")


def _serve(settings: Settings):
    app = create_app(settings)
    with app.state.home.db.session() as s:
        alice = keys.create_key(s, "alice", admin=True)
        bob = keys.create_key(s, "bob")
    bg = serve_in_thread(app)
    return Live(bg.url, alice, bob, settings, app), bg


@pytest.fixture
def live(settings) -> Live:
    server, bg = _serve(settings)
    yield server
    bg.stop()


@pytest.fixture
def live_worker(tmp_path, model_cache, store_backend, request) -> Live:
    """A live server with its embedded worker, training on the tiny model."""
    server, bg = _serve(Settings(home=tmp_path / "home", model_cache=model_cache, embedded_worker=True,
                                 **backend_settings(request, store_backend)))
    yield server
    bg.stop()


def together1_python() -> Path | None:
    """The interpreter of the venv holding together==1.6.0 (made by `make test`)."""
    env = os.environ.get("TUNEHOUSE_TOGETHER1_PYTHON")
    p = Path(env) if env else ROOT / ".venv-together1" / "bin" / "python"
    return p if p.exists() else None


def require_together1() -> Path:
    """The together 1.x interpreter; without it a test is skipped locally and fails under CI=true
    (CI runs `make test`, which makes the venv: a missing one is a broken set-up, not a skip)."""
    p = together1_python()
    if p is None:
        missing("together==1.6.0 venv missing: run `make test` (it creates .venv-together1)")
    return p


@pytest.fixture
def v1_python() -> Path:
    return require_together1()


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """The llama-server binary `make test` builds (`make llama-server`), for the llama.cpp backend's tests."""
    from tunehouse.serve.llama_server import find_llama_server

    found = find_llama_server(os.environ.get("TUNEHOUSE_LLAMA_SERVER"))
    if found is None:
        missing("no llama-server: run `make llama-server` (`make test` builds it first)")
    return found


def sdk_env(live: Live, key: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TOGETHER_BASE_URL=live.url, TOGETHER_API_KEY=key or live.key, TOGETHER_TELEMETRY_DISABLED="1",
               TOGETHER_DISABLE_VERSION_CHECK="1", NO_COLOR="1", COLUMNS="200", TERM="dumb")
    return env


def bin_path(name: str) -> str:
    """A console script of the running interpreter's venv."""
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else shutil.which(name) or name
