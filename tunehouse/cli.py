"""The `tunehouse` command: serve, keys, files, quickstart. Thin over the client and services."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from tunehouse.client import ApiError, Client
from tunehouse.settings import Settings

app = typer.Typer(help="tunehouse: self-hosted fine-tuning for open LLMs (Together-compatible API).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Manage API keys (works on the local home, no server needed).", no_args_is_help=True)
files_app = typer.Typer(help="Check, upload and manage datasets.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(files_app, name="files")

console = Console()
err = Console(stderr=True)

BaseUrl = Annotated[Optional[str], typer.Option("--base-url", envvar="TUNEHOUSE_BASE_URL",
                                                help="Server URL (default http://127.0.0.1:8000).")]
ApiKey = Annotated[Optional[str], typer.Option("--api-key", envvar="TUNEHOUSE_API_KEY",
                                               help="API key (default: the admin key in the home).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _client(base_url: str | None, api_key: str | None) -> Client:
    return Client(base_url, api_key)


def _fail(exc: ApiError) -> None:
    err.print(f"[red]Error:[/red] {exc.message}")
    raise typer.Exit(1)


def _progress(label: str) -> Progress:
    return Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                    console=err, transient=True)


# -- server ---------------------------------------------------------------------------------
@app.command()
def serve(host: Annotated[Optional[str], typer.Option(help="Interface to bind.")] = None,
          port: Annotated[Optional[int], typer.Option(help="Port to listen on.")] = None,
          home: Annotated[Optional[Path], typer.Option(help="tunehouse home folder.")] = None):
    """Start the API server (SQLite + local blob folder by default)."""
    import uvicorn

    from tunehouse.api.app import create_app
    from tunehouse.store.home import ensure_admin_key, open_home

    overrides = {k: v for k, v in {"host": host, "port": port, "home": home}.items() if v is not None}
    settings = Settings(**overrides)
    new_key = ensure_admin_key(open_home(settings))
    if new_key:
        console.print(f"[bold]Created the admin API key[/bold] (shown once; also stored in "
                      f"{settings.admin_key_path}):\n  {new_key}")
    console.print(f"tunehouse serving on http://{settings.host}:{settings.port} (home {settings.home})")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")


@keys_app.command("create")
def keys_create(owner: Annotated[str, typer.Option(help="Who owns what this key creates.")],
                admin: Annotated[bool, typer.Option(help="Mark the key as admin.")] = False,
                home: Annotated[Optional[Path], typer.Option(help="tunehouse home folder.")] = None):
    """Mint a new API key and print it (it is stored hashed and cannot be shown again)."""
    from tunehouse.store import keys
    from tunehouse.store.home import open_home

    h = open_home(Settings(**({"home": home} if home else {})))
    try:
        with h.db.session() as s:
            key = keys.create_key(s, owner, admin=admin)
    except ValueError as exc:
        err.print(f"[red]Error:[/red] {exc}")
        raise typer.Exit(1)
    print(key)


@keys_app.command("list")
def keys_list(home: Annotated[Optional[Path], typer.Option(help="tunehouse home folder.")] = None):
    """List keys (prefix and owner only)."""
    from tunehouse.store import keys
    from tunehouse.store.home import open_home

    h = open_home(Settings(**({"home": home} if home else {})))
    table = Table("prefix", "owner", "admin", "created", "revoked")
    with h.db.session() as s:
        for k in keys.list_keys(s):
            table.add_row(k.prefix + "…", k.owner, str(k.is_admin), str(k.created_at)[:19], str(k.revoked))
    console.print(table)


# -- files ----------------------------------------------------------------------------------
@files_app.command("check")
def files_check(path: Path, purpose: Annotated[str, typer.Option(help="fine-tune, eval or batch-api.")] = "fine-tune",
                json_out: JsonOut = False,
                max_errors: Annotated[int, typer.Option(help="Stop listing after this many errors.")] = 100):
    """Validate a dataset locally (no server): every problem with its line, field and rule."""
    from tunehouse.data.formats import check_file

    with _progress("checking") as bar:
        task = bar.add_task("check", total=path.stat().st_size if path.is_file() else 0)
        report = check_file(path, purpose=purpose, max_errors=max_errors,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    if json_out:
        print(json.dumps(report.to_sdk_dict(), indent=2))
    else:
        _print_report(report)
    raise typer.Exit(0 if report.passed else 1)


def _print_report(report) -> None:
    d = report.to_sdk_dict()
    if report.passed:
        console.print(f"[green]OK[/green] {d.get('num_samples')} samples, format {d.get('dataset_format')}.")
        return
    console.print(f"[red]X[/red] {len(report.problems)} problem(s){' (list truncated)' if d.get('errors_truncated') else ''}:")
    table = Table("line", "field", "rule", "what to change", show_lines=False)
    for p in report.problems:
        table.add_row(str(p.line or ""), p.field or "", p.rule, p.message)
    console.print(table)


@files_app.command("upload")
def files_upload(path: Path, purpose: Annotated[str, typer.Option(help="fine-tune, eval or batch-api.")] = "fine-tune",
                 check: Annotated[bool, typer.Option(help="Validate locally before sending.")] = True,
                 base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Upload a dataset (checked locally first, validated again by the server)."""
    if check:
        from tunehouse.data.formats import check_file

        report = check_file(path, purpose=purpose)
        if not report.passed:
            _print_report(report)
            err.print("[red]Not uploaded.[/red] Fix the problems above, or pass --no-check to let the server judge.")
            raise typer.Exit(1)
    client = _client(base_url, api_key)
    try:
        with _progress("uploading") as bar:
            task = bar.add_task("upload", total=path.stat().st_size)
            f = client.upload(path, purpose, progress=lambda done, total: bar.update(task, completed=done))
    except ApiError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(f, indent=2))
        return
    if f.get("already_existed"):
        console.print(f"File already exists under ID {f['id']}")
    else:
        console.print(f"Uploaded {f['filename']} as [bold]{f['id']}[/bold] ({f['bytes']} bytes), "
                      f"processing status {f.get('processing_status')}")


@files_app.command("list")
def files_list(base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """List your uploaded files."""
    try:
        data = _client(base_url, api_key).list_files()
    except ApiError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(data, indent=2))
        return
    table = Table("id", "filename", "bytes", "purpose", "type", "lines", "status")
    for f in data:
        table.add_row(f["id"], f["filename"], str(f["bytes"]), f["purpose"], f["FileType"], str(f.get("LineCount")),
                      f.get("processing_status") or "")
    console.print(table)


@files_app.command("retrieve")
def files_retrieve(file_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Show one file, with its validation report."""
    try:
        f = _client(base_url, api_key).retrieve_file(file_id)
    except ApiError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(f, indent=2))
        return
    for k, v in f.items():
        if k != "validation_report":
            console.print(f"[bold]{k}[/bold]: {v}")
    report = f.get("validation_report") or {}
    for e in report.get("errors", []):
        console.print(f"  line {e.get('line')}, {e.get('field')}: {e.get('message')}")


@files_app.command("content")
def files_content(file_id: str, output: Annotated[Optional[Path], typer.Option("--output", "-o")] = None,
                  base_url: BaseUrl = None, api_key: ApiKey = None):
    """Download a file's bytes (to --output, or stdout)."""
    client = _client(base_url, api_key)
    try:
        if output is None:
            resp = client.http.get(f"/v1/files/{file_id}/content")
            client._json(resp) if resp.status_code >= 400 else sys.stdout.buffer.write(resp.content)
            return
        n = client.download_file(file_id, output)
    except ApiError as exc:
        _fail(exc)
    console.print(f"Wrote {n} bytes to {output}")


@files_app.command("delete")
def files_delete(file_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Delete a file."""
    try:
        res = _client(base_url, api_key).delete_file(file_id)
    except ApiError as exc:
        _fail(exc)
    print(json.dumps(res) if json_out else f"Deleted {file_id}")


@app.command()
def quickstart(home: Annotated[Optional[Path], typer.Option(help="tunehouse home folder.")] = None):
    """The end-to-end walk-through on an embedded server: check, upload and list a dataset."""
    from tunehouse import quickstart as qs

    qs.run(Settings(**({"home": home} if home else {})))
