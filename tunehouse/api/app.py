"""`create_app(settings)`: the FastAPI application. All state (database, blob store, services,
the embedded worker) is created here and hung on `app.state`, never at import, so each test
builds its own app over its own home."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from tunehouse import __version__
from tunehouse.api import errors
from tunehouse.api import files as files_routes
from tunehouse.api import fine_tunes as fine_tune_routes
from tunehouse.api.deps import CurrentCaller
from tunehouse.api.paths import NormalisePaths
from tunehouse.files import FileService
from tunehouse.models.registry import Registry
from tunehouse.settings import Settings
from tunehouse.store.home import open_home


def create_app(settings: Settings) -> FastAPI:
    home = open_home(settings)
    worker = None
    if settings.embedded_worker:
        from tunehouse.worker.loop import Worker

        worker = Worker(home)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if worker:
            worker.start_thread()
        yield
        if worker:
            worker.stop()

    app = FastAPI(title="tunehouse", version=__version__, lifespan=lifespan)
    app.state.home = home
    app.state.files = FileService(home)
    app.state.registry = Registry(home)
    app.state.worker = worker
    app.state.wake_worker = (lambda: worker.wake.set()) if worker else (lambda: None)
    errors.install(app)
    app.include_router(files_routes.router)
    app.include_router(fine_tune_routes.router)

    @app.get("/health", tags=["meta"])
    def health():
        return {"status": "ok", "version": __version__}

    @app.get("/v3/whoami", tags=["meta"])
    def whoami(caller: CurrentCaller):
        # The v3 CLI calls this before every command (api-reference §10).
        return {"type": "project_api_key", "api_key": {"id": str(caller.key_id)},
                "organization": {"id": caller.owner, "name": caller.owner},
                "project": {"id": caller.owner, "name": caller.owner, "slug": caller.owner}}

    app.add_middleware(NormalisePaths)
    return app
