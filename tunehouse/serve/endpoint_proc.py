"""A dedicated endpoint's own process: `python -m tunehouse.serve.endpoint_proc --model-dir D
--name NAME --port-file F`. It loads one model (merged weights) once, serves the chat and text
completion routes on a free loopback port (written to F once it listens), and is reached only
through the API server, which authenticates and proxies."""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tunehouse.api import errors
from tunehouse.api import inference_schemas as wire
from tunehouse.api.inference import answer_chat, answer_text
from tunehouse.api.server import serve_in_thread
from tunehouse.serve.endpoints import PARENT_ENV, TOKEN_ENV, TOKEN_HEADER
from tunehouse.serve.backend import build_engine
from tunehouse.serve.engine import Engine, ModelRef
from tunehouse.settings import Settings


def build_app(model_dir: Path, name: str, token: str) -> tuple[FastAPI, Engine]:
    config = json.loads((model_dir / "config.json").read_text())
    ref = ModelRef(name, name, model_dir, int(config.get("max_position_embeddings") or 2048))
    engine = build_engine(Settings())  # the server's settings, from the environment it passed on
    app = FastAPI(title=f"tunehouse endpoint {name}")
    errors.install(app)

    @app.middleware("http")
    async def internal_only(request: Request, call_next):
        if not hmac.compare_digest(request.headers.get(TOKEN_HEADER, "").encode(), token.encode()):
            return JSONResponse(status_code=401, content={"error": {
                "message": "This is an endpoint's internal port; send requests to the tunehouse server.",
                "type": "authentication_error", "param": None, "code": "invalid_internal_token"}})
        return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": name}

    @app.post("/v1/chat/completions")
    async def chat(body: wire.ChatRequest, request: Request):
        return await answer_chat(engine, ref, body, request)

    @app.post("/v1/completions")
    async def text(body: wire.CompletionRequest, request: Request):
        return await answer_text(engine, ref, body, request)

    return app, engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--port-file", type=Path, required=True)
    args = ap.parse_args()
    os.umask(0o077)
    token = os.environ.pop(TOKEN_ENV)  # not inherited by anything this process starts
    _watch_parent(int(os.environ.pop(PARENT_ENV)))
    app, engine = build_app(args.model_dir, args.name, token)
    bg = serve_in_thread(app)
    # One token through the whole path loads the weights: STARTED then means ready to answer fast.
    httpx.post(f"{bg.url}/v1/completions", json={"model": args.name, "prompt": "Hello", "max_tokens": 1},
               headers={TOKEN_HEADER: token}, timeout=600).raise_for_status()
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(bg.url.rsplit(":", 1)[1])
    os.replace(tmp, args.port_file)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    while not stop["now"] and bg.thread.is_alive():
        bg.thread.join(1.0)
    bg.stop()
    engine.close()


def _watch_parent(server_pid: int) -> None:
    """Exit once the server is gone: our parent pid changes when it dies (we are re-parented).
    Backs up the parent-death signal, which a server that died before it was set cannot send."""

    def watch():
        while os.getppid() == server_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # the clean stop below, if it is installed yet
        time.sleep(10)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


if __name__ == "__main__":
    main()
