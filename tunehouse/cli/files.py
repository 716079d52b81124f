"""`tunehouse files`: check a dataset locally, upload, list, retrieve, download, delete."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tunehouse.cli.common import (
    ApiKey, BaseUrl, JsonOut, api_call, client_for, console, err, fail, transfer_progress,
)
from tunehouse.client import ApiError, Client

files_app = typer.Typer(help="Check, upload and manage datasets.", no_args_is_help=True)


@files_app.command("check")
def files_check(path: Path, purpose: Annotated[str, typer.Option(help="fine-tune, eval or batch-api.")] = "fine-tune",
                json_out: JsonOut = False,
                max_errors: Annotated[int, typer.Option(help="Stop listing after this many errors.")] = 100):
    """Validate a dataset locally (no server): every problem with its line, field and rule."""
    from tunehouse.data.formats import check_file

    with transfer_progress("checking") as bar:
        task = bar.add_task("check", total=path.stat().st_size if path.is_file() else 0)
        report = check_file(path, purpose=purpose, max_errors=max_errors,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    if json_out:
        print(json.dumps(report.to_sdk_dict(), indent=2))
    else:
        print_report(report)
    raise typer.Exit(0 if report.passed else 1)


def print_report(report) -> None:
    d = report.to_sdk_dict()
    if report.passed:
        console.print(f"[green]OK[/green] {d.get('num_samples')} samples, format {d.get('dataset_format')}.")
        return
    console.print(f"[red]X[/red] {len(report.problems)} problem(s){' (list truncated)' if d.get('errors_truncated') else ''}:")
    table = Table("line", "field", "rule", "what to change", show_lines=False)
    for p in report.problems:
        table.add_row(str(p.line or ""), p.field or "", p.rule, p.message)
    console.print(table)


def upload_checked(client: Client, path: Path, purpose: str = "fine-tune", check: bool = True) -> dict:
    """Check a local dataset (unless told not to), then upload it with a progress bar."""
    if check:
        from tunehouse.data.formats import check_file

        report = check_file(path, purpose=purpose)
        if not report.passed:
            print_report(report)
            err.print("[red]Not uploaded.[/red] Fix the problems above, or pass --no-check to let the server judge.")
            raise typer.Exit(1)
    try:
        with transfer_progress(f"uploading {path.name}") as bar:
            task = bar.add_task("upload", total=path.stat().st_size)
            return client.upload(path, purpose, progress=lambda done, total: bar.update(task, completed=done))
    except ApiError as exc:
        fail(exc)


@files_app.command("upload")
def files_upload(path: Path, purpose: Annotated[str, typer.Option(help="fine-tune, eval or batch-api.")] = "fine-tune",
                 check: Annotated[bool, typer.Option(help="Validate locally before sending.")] = True,
                 base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Upload a dataset (checked locally first, validated again by the server)."""
    f = upload_checked(client_for(base_url, api_key), path, purpose, check)
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
    data = api_call(client_for(base_url, api_key).list_files)
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
    f = api_call(client_for(base_url, api_key).retrieve_file, file_id)
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
    client = client_for(base_url, api_key)
    try:
        if output is None:
            resp = client.http.get(f"/v1/files/{file_id}/content")
            client._json(resp) if resp.status_code >= 400 else sys.stdout.buffer.write(resp.content)
            return
        n = client.download_file(file_id, output)
    except ApiError as exc:
        fail(exc)
    console.print(f"Wrote {n} bytes to {output}")


@files_app.command("delete")
def files_delete(file_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Delete a file."""
    res = api_call(client_for(base_url, api_key).delete_file, file_id)
    print(json.dumps(res) if json_out else f"Deleted {file_id}")
