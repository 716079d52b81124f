"""`create_app(settings)`: the FastAPI application. All state (database, blob store, services,
the embedded worker) is created here and hung on `app.state`, never at import, so each test
builds its own app over its own home."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html

from tunehouse import __version__
from tunehouse.api import errors
from tunehouse.api import files as files_routes
from tunehouse.api import fine_tunes as fine_tune_routes
from tunehouse.api import endpoints as endpoint_routes
from tunehouse.api import evaluations as evaluation_routes
from tunehouse.api import inference as inference_routes
from tunehouse.api import keys as key_routes
from tunehouse.api import models as model_routes
from tunehouse.api.auth import authenticate
from tunehouse.api.deps import CurrentCaller
from tunehouse.api.paths import NormalisePaths
from tunehouse.api.ratelimit import FailureLimiter
from tunehouse.files import FileService
from tunehouse.models.registry import Registry
from tunehouse.serve.endpoints import Supervisor, model_dir_for
from tunehouse.settings import Settings
from tunehouse.store.home import ensure_configured_admin_key, open_home
from tunehouse.web import router as web_routes


def create_app(settings: Settings) -> FastAPI:
    home = open_home(settings)
    ensure_configured_admin_key(home)  # TUNEHOUSE_ADMIN_KEY, if set
    worker = None
    if settings.embedded_worker:
        from tunehouse.worker.loop import Worker

        worker = Worker(home)
    engine = _LazyEngine(settings, cores_shared=(lambda: worker.child is not None) if worker else None)
    registry = Registry(home)
    supervisor = Supervisor(home, lambda s, owner, name: model_dir_for(s, home, registry, owner, name))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if worker:
            worker.start_thread()
        supervisor.start()
        yield
        supervisor.stop()
        if worker:
            worker.stop()
        engine.close()

    public_docs = settings.docs == "public"
    app = FastAPI(title="tunehouse", version=__version__, lifespan=lifespan, docs_url="/docs" if public_docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if public_docs else None)
    app.state.auth_limiter = FailureLimiter(settings.auth_failure_burst, settings.auth_failures_per_minute)
    app.state.home = home
    app.state.files = FileService(home)
    app.state.registry = registry
    app.state.supervisor = supervisor
    app.state.supervisor_wake = supervisor.wake.set
    app.state.resolve_model_dir = supervisor.resolve_model_dir
    app.state.worker = worker
    app.state.wake_worker = (lambda: worker.wake.set()) if worker else (lambda: None)
    app.state.engine = engine  # call it to get the engine; the first call creates it
    errors.install(app)
    app.include_router(files_routes.router)
    app.include_router(fine_tune_routes.router)
    app.include_router(inference_routes.router)
    app.include_router(model_routes.router)
    app.include_router(endpoint_routes.router)
    app.include_router(key_routes.router)
    app.include_router(evaluation_routes.router)
    app.include_router(web_routes.router)  # the dashboard, at /
    if settings.docs == "key":
        _keyed_docs(app)

    @app.get("/health", tags=["meta"])
    async def health():  # on the event loop: under load it must not queue for a request thread
        return {"status": "ok", "version": __version__}

    @app.get("/v3/whoami", tags=["meta"])
    def whoami(caller: CurrentCaller):
        # The v3 CLI calls this before every command (api-reference §10).
        return {"type": "project_api_key", "api_key": {"id": str(caller.key_id)},
                "organization": {"id": caller.owner, "name": caller.owner},
                "project": {"id": caller.owner, "name": caller.owner, "slug": caller.owner}}

    app.add_middleware(NormalisePaths)
    return app


def _keyed_docs(app: FastAPI) -> None:
    """/openapi.json and /docs for callers sending an API key (scripts, curl). The Swagger page
    fetches the schema without the key, so a browser needs `docs: public`."""
    keyed = [Depends(authenticate)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=keyed)
    def openapi():
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=keyed)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="tunehouse API")


class _LazyEngine:
    """The inference engine, created on the first inference request (so starting the server loads
    no model) and shut down with the app."""

    def __init__(self, settings: Settings, cores_shared=None):
        self.settings, self.cores_shared = settings, cores_shared
        self.engine = None
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            if self.engine is None:
                from tunehouse.serve.backend import build_engine

                self.engine = build_engine(self.settings, self.cores_shared)
            return self.engine

    def forget(self, path) -> None:
        """Drop a deleted model's weights, if the engine has been started."""
        if self.engine is not None:
            self.engine.forget(path)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
