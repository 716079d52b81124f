"""Run the app under uvicorn in a background thread (the quick-start's embedded server and the
tests' live server): port 0 picks a free port, and the real bound port is returned."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import uvicorn


@dataclass
class BackgroundServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)
        if self.thread.is_alive():  # a server that will not stop is a bug to see, not to step over
            raise RuntimeError(f"the tunehouse server thread did not stop within {timeout} s")


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30) -> BackgroundServer:
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="tunehouse-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the tunehouse server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return BackgroundServer(server, thread, f"http://{host}:{bound}")
