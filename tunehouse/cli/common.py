"""What every `tunehouse` command shares: consoles, the common options, the client and how
errors and tables are printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from tunehouse.client import ApiError, Client
from tunehouse.settings import Settings

console = Console()
err = Console(stderr=True)

BaseUrl = Annotated[Optional[str], typer.Option("--base-url", envvar="TUNEHOUSE_BASE_URL",
                                                help="Server URL (default http://127.0.0.1:8000).")]
ApiKey = Annotated[Optional[str], typer.Option("--api-key", envvar="TUNEHOUSE_API_KEY",
                                               help="API key (default: the admin key in the home).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
HomeDir = Annotated[Optional[Path], typer.Option("--home", help="tunehouse home folder.")]

TERMINAL = ("completed", "cancelled", "error", "user_error")
STATUS_STYLE = {"completed": "green", "cancelled": "yellow", "error": "red", "user_error": "red",
                "running": "cyan", "compressing": "cyan", "uploading": "cyan"}


def client_for(base_url: str | None, api_key: str | None) -> Client:
    return Client(base_url, api_key)


def settings_for(home: Path | None, **overrides) -> Settings:
    """The settings from the environment and these flags; a bad TUNEHOUSE_* value is its message
    in red and exit code 1, not a traceback."""
    try:
        return Settings(**({"home": home} if home else {}), **overrides)
    except ValidationError as exc:
        for e in exc.errors():
            where = "TUNEHOUSE_" + "_".join(str(part) for part in e["loc"]).upper() if e["loc"] else "settings"
            message = e["msg"].removeprefix("Value error, ")
            err.print(f"[red]Error:[/red] {message}" if message.startswith(where) else f"[red]Error:[/red] {where}: {message}")
        raise typer.Exit(1) from None


def fail(exc: ApiError) -> None:
    err.print(f"[red]Error:[/red] {exc.message}")
    raise typer.Exit(1)


def transfer_progress(label: str) -> Progress:
    return Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                    console=err, transient=True)


def api_call(call, *args, **kw):
    """Run one client call; an API error becomes a red message and exit code 1."""
    try:
        return call(*args, **kw)
    except ApiError as exc:
        fail(exc)


def print_rows(rows: list[dict], json_out: bool, headers: tuple[str, ...], cells) -> None:
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table()
    for i, h in enumerate(headers):  # ids (first column) stay whole: they are what users copy
        table.add_column(h, no_wrap=i == 0)
    for r in rows:
        table.add_row(*cells(r))
    console.print(table)


def when(iso: str) -> str:
    return iso[:16].replace("T", " ")


def status_text(status: str) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status
