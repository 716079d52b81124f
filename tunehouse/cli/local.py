"""Commands on the local home (no server needed, except `serve` which is the server): serve,
worker, keys, models."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from tunehouse.cli.common import HomeDir, JsonOut, console, err, fail, settings_for, status_text

keys_app = typer.Typer(help="Manage API keys (works on the local home, no server needed).", no_args_is_help=True)
models_app = typer.Typer(help="Base models this home can fine-tune (works on the local home).", no_args_is_help=True)


Gpus = Annotated[Optional[str], typer.Option(help="GPUs the training worker owns, e.g. 0,1,2,3 (default: every "
                                                 "visible GPU).")]
NumProcesses = Annotated[Optional[int], typer.Option(help="Training processes per job (torchrun; default one per GPU, "
                                                          "one on a CPU).", min=1)]


LORA_MODES = {"adapter": "as adapters on their shared base", "merged": "from their merged weights, one model each"}


def serve(host: Annotated[Optional[str], typer.Option(help="Interface to bind.")] = None,
          port: Annotated[Optional[int], typer.Option(help="Port to listen on.")] = None,
          home: HomeDir = None, gpus: Gpus = None, num_processes: NumProcesses = None,
          worker: Annotated[Optional[bool], typer.Option(
              "--worker/--no-worker", help="Run a training worker inside the server (default: on, or "
                                           "TUNEHOUSE_EMBEDDED_WORKER). Off for API servers of a cluster whose "
                                           "workers run `tunehouse worker` on the GPU machines.")] = None):
    """Start the API server (SQLite + local blob folder by default; see docs/deploy.md for PostgreSQL + S3)."""
    import uvicorn

    from tunehouse.api.app import create_app
    from tunehouse.serve.backend import choose
    from tunehouse.store.home import ensure_admin_key, open_home

    overrides = {k: v for k, v in {"host": host, "port": port, "home": home, "gpus": gpus,
                                   "num_processes": num_processes, "embedded_worker": worker}.items() if v is not None}
    settings = settings_for(overrides.pop("home", None), **overrides)
    try:
        backend, _, why = choose(settings)
    except FileNotFoundError as exc:  # serve_backend=llama.cpp without a binary, or a wrong llama_server path
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    new_key = ensure_admin_key(open_home(settings))
    if new_key:
        console.print(f"[bold]Created the admin API key[/bold] (shown once; also stored in "
                      f"{settings.admin_key_path}):\n  {new_key}")
    console.print(f"tunehouse serving on http://{settings.host}:{settings.port} (home {settings.home}); "
                  f"dashboard: open http://{settings.host}:{settings.port}/ and sign in with an API key")
    console.print(f"inference backend: {backend} ({why}); LoRA fine-tunes served {LORA_MODES[settings.serve_lora]} "
                  f"(serve_lora={settings.serve_lora})")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")


@keys_app.command("create")
def keys_create(owner: Annotated[str, typer.Option(help="Who owns what this key creates.")],
                admin: Annotated[bool, typer.Option(help="Mark the key as admin.")] = False,
                home: HomeDir = None):
    """Mint a new API key and print it (it is stored hashed and cannot be shown again)."""
    from tunehouse.store import keys
    from tunehouse.store.home import open_home

    h = open_home(settings_for(home))
    try:
        with h.db.session() as s:
            key = keys.create_key(s, owner, admin=admin)
    except ValueError as exc:
        err.print(f"[red]Error:[/red] {exc}")
        raise typer.Exit(1)
    print(key)


@keys_app.command("list")
def keys_list(home: HomeDir = None):
    """List keys (prefix and owner only)."""
    from tunehouse.store import keys
    from tunehouse.store.home import open_home

    h = open_home(settings_for(home))
    table = Table("id", "prefix", "owner", "admin", "created", "revoked")
    with h.db.session() as s:
        for k in keys.list_keys(s):
            table.add_row(str(k.id), k.prefix + "…", k.owner, str(k.is_admin), str(k.created_at)[:19], str(k.revoked))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key's id or prefix, as `keys list` shows them.")],
                home: HomeDir = None):
    """Revoke a key: requests with it are refused from the next one on."""
    from tunehouse.errors import TunehouseError
    from tunehouse.store import keys
    from tunehouse.store.home import open_home

    h = open_home(settings_for(home))
    try:
        with h.db.session() as s:
            row = keys.revoke(s, key)
            console.print(f"Revoked key {row.id} ({row.prefix}…, owner {row.owner}).")
    except TunehouseError as exc:
        fail(exc)


@models_app.command("list")
def models_list(home: HomeDir = None, json_out: JsonOut = False):
    """Models jobs can start from: the built-ins and those added with `models add`."""
    from tunehouse.models.registry import Registry
    from tunehouse.store.home import open_home

    models = Registry(open_home(settings_for(home))).list()
    if json_out:
        print(json.dumps([{"name": m.name, "source": m.source, "context_length": m.context_length} for m in models],
                         indent=2))
        return
    table = Table("name", "source", "context length")
    for m in models:
        table.add_row(m.name, m.source, str(m.context_length))
    console.print(table)


@models_app.command("add")
def models_add(name: Annotated[str, typer.Argument(help="The name jobs will use, e.g. my-org/my-model.")],
               source: Annotated[str, typer.Argument(help="A Hugging Face model folder, or a hub id.")],
               home: HomeDir = None):
    """Register a base model under NAME."""
    from tunehouse.errors import TunehouseError
    from tunehouse.models.registry import Registry
    from tunehouse.store.home import open_home

    try:
        m = Registry(open_home(settings_for(home))).add(name, source)
    except TunehouseError as exc:
        fail(exc)
    console.print(f"Added {m.name} from {m.source} (context length {m.context_length}).")


def worker(home: HomeDir = None, gpus: Gpus = None, num_processes: NumProcesses = None):
    """Run a training worker on the home (Ctrl-C stops it; a running job is requeued).

    For a server started with TUNEHOUSE_EMBEDDED_WORKER=false, or as an extra worker."""
    import signal

    from tunehouse.store.home import open_home
    from tunehouse.store.tables import Job
    from tunehouse.worker.loop import Worker

    class NarratedWorker(Worker):
        def _run_child(self, job_id: str, attempt: int) -> None:
            console.print(f"running {job_id} (attempt {attempt})")
            super()._run_child(job_id, attempt)
            with self.home.db.session() as s:
                job = s.get(Job, job_id)
                console.print(f"{job_id}: {status_text(job.status) if job else 'deleted'}")

    settings = settings_for(home, **{k: v for k, v in {"gpus": gpus, "num_processes": num_processes}.items()
                                     if v is not None})
    w = NarratedWorker(open_home(settings))

    def on_signal(signum, _frame) -> None:
        if w.stopping.is_set():  # a second Ctrl-C: stop now (the job is recovered from its last checkpoint)
            raise KeyboardInterrupt
        console.print(f"{signal.Signals(signum).name}: stopping (a running job is stopped and requeued)…")
        w.stop()

    # The loop runs in this (main) thread and the handler only sets the stop event: a Thread.join
    # interrupted by KeyboardInterrupt then reports the live thread as finished (seen on CPython
    # 3.11.7), and exiting would kill the training child mid-step without requeueing its job.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    where = f"GPUs {','.join(map(str, w.gpus))}" if w.gpus else "the CPU"
    console.print(f"worker {w.worker_id} waiting for jobs in {settings.home} (Ctrl-C to stop); "
                  f"{w.num_processes} training process{'es' if w.num_processes > 1 else ''} per job on {where}")
    w.run_forever()
    console.print("worker stopped")
