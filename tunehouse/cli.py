"""The `tunehouse` command: serve, worker, keys, models, files, fine-tuning (alias ft), quickstart.
Thin over the client and services; `fine-tuning create` takes the together CLI's flags."""

from __future__ import annotations

import ast
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from tunehouse.client import ApiError, Client
from tunehouse.settings import Settings
from tunehouse.train.config import SFTConfig

app = typer.Typer(help="tunehouse: self-hosted fine-tuning for open LLMs (Together-compatible API).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Manage API keys (works on the local home, no server needed).", no_args_is_help=True)
files_app = typer.Typer(help="Check, upload and manage datasets.", no_args_is_help=True)
ft_app = typer.Typer(help="Create, follow and download fine-tuning jobs (the together CLI's commands and flags).",
                     no_args_is_help=True)
models_app = typer.Typer(help="Base models this home can fine-tune (works on the local home).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(files_app, name="files")
app.add_typer(ft_app, name="fine-tuning")
app.add_typer(ft_app, name="ft", help="Alias of fine-tuning.")

console = Console()
err = Console(stderr=True)

BaseUrl = Annotated[Optional[str], typer.Option("--base-url", envvar="TUNEHOUSE_BASE_URL",
                                                help="Server URL (default http://127.0.0.1:8000).")]
ApiKey = Annotated[Optional[str], typer.Option("--api-key", envvar="TUNEHOUSE_API_KEY",
                                               help="API key (default: the admin key in the home).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
HomeDir = Annotated[Optional[Path], typer.Option("--home", help="tunehouse home folder.")]


def _client(base_url: str | None, api_key: str | None) -> Client:
    return Client(base_url, api_key)


def _settings(home: Path | None) -> Settings:
    return Settings(**({"home": home} if home else {}))


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
          home: HomeDir = None):
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
                home: HomeDir = None):
    """Mint a new API key and print it (it is stored hashed and cannot be shown again)."""
    from tunehouse.store import keys
    from tunehouse.store.home import open_home

    h = open_home(_settings(home))
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

    h = open_home(_settings(home))
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


def _upload(client: Client, path: Path, purpose: str = "fine-tune", check: bool = True) -> dict:
    """Check a local dataset (unless told not to), then upload it with a progress bar."""
    if check:
        from tunehouse.data.formats import check_file

        report = check_file(path, purpose=purpose)
        if not report.passed:
            _print_report(report)
            err.print("[red]Not uploaded.[/red] Fix the problems above, or pass --no-check to let the server judge.")
            raise typer.Exit(1)
    try:
        with _progress(f"uploading {path.name}") as bar:
            task = bar.add_task("upload", total=path.stat().st_size)
            return client.upload(path, purpose, progress=lambda done, total: bar.update(task, completed=done))
    except ApiError as exc:
        _fail(exc)


@files_app.command("upload")
def files_upload(path: Path, purpose: Annotated[str, typer.Option(help="fine-tune, eval or batch-api.")] = "fine-tune",
                 check: Annotated[bool, typer.Option(help="Validate locally before sending.")] = True,
                 base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Upload a dataset (checked locally first, validated again by the server)."""
    f = _upload(_client(base_url, api_key), path, purpose, check)
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


# -- fine-tuning ------------------------------------------------------------------------------
TERMINAL = ("completed", "cancelled", "error", "user_error")
STATUS_STYLE = {"completed": "green", "cancelled": "yellow", "error": "red", "user_error": "red",
                "running": "cyan", "uploading": "cyan"}


def _field_docs(cls: type) -> dict[str, str]:
    """A config dataclass's attribute docstrings, so each flag's help is the field's one description."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


_DOC = _field_docs(SFTConfig)


def _opt(field: str, *aliases: str, **kw) -> typer.Option:
    """`--field-name` (STYLE principle 5: flag = API field = config field) with the config's help."""
    return typer.Option(f"--{field.replace('_', '-')}", *aliases, help=_DOC.get(field), **kw)


def _batch_size(value: str | None) -> int | str | None:
    if value is None or value == "max":
        return value
    if not value.isdigit():
        raise typer.BadParameter(f'an integer or "max", got {value!r}', param_hint="--batch-size")
    return int(value)


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


@ft_app.command("create")
def ft_create(
    training_file: Annotated[str, typer.Option("--training-file", "-t", help="Training file id, or a local path "
                                               "(checked, then uploaded).")],
    validation_file: Annotated[Optional[str], typer.Option("--validation-file", "-v", help="Validation file id, "
                                                           "or a local path (checked, then uploaded).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=_DOC["model"])] = None,
    from_checkpoint: Annotated[Optional[str], typer.Option(
        help="Continue a job instead of starting from a model: ft-ID, ft-ID:STEP, OUTPUT_NAME or OUTPUT_NAME:STEP.")
    ] = None,
    n_epochs: Annotated[Optional[int], _opt("n_epochs")] = None,
    n_checkpoints: Annotated[Optional[int], _opt("n_checkpoints", "-c")] = None,
    n_evals: Annotated[Optional[int], _opt("n_evals")] = None,
    batch_size: Annotated[Optional[str], _opt("batch_size", "-b", metavar="INT|max")] = None,
    learning_rate: Annotated[Optional[float], _opt("learning_rate", "--lr")] = None,
    lr_scheduler_type: Annotated[Optional[str], _opt("lr_scheduler_type")] = None,
    min_lr_ratio: Annotated[Optional[float], _opt("min_lr_ratio")] = None,
    scheduler_num_cycles: Annotated[Optional[float], _opt("scheduler_num_cycles")] = None,
    warmup_ratio: Annotated[Optional[float], _opt("warmup_ratio")] = None,
    max_grad_norm: Annotated[Optional[float], _opt("max_grad_norm")] = None,
    weight_decay: Annotated[Optional[float], _opt("weight_decay")] = None,
    suffix: Annotated[Optional[str], typer.Option(help="Added to the output model name: 1-40 of A-Z a-z 0-9 . _ -")
                      ] = None,
    lora: Annotated[Optional[bool], typer.Option("--lora/--no-lora", help=_DOC["lora"] + " Unset: the server's "
                                                 "choice (LoRA, or the parent job's type).")] = None,
    lora_r: Annotated[Optional[int], _opt("lora_r")] = None,
    lora_alpha: Annotated[Optional[float], _opt("lora_alpha")] = None,
    lora_dropout: Annotated[Optional[float], _opt("lora_dropout")] = None,
    lora_trainable_modules: Annotated[Optional[str], _opt("lora_trainable_modules")] = None,
    training_method: Annotated[Optional[str], typer.Option(help="sft (the default), or dpo on preference pairs.")
                               ] = None,
    dpo_beta: Annotated[Optional[float], typer.Option(help="DPO: pull toward the reference model (server default "
                                                      "0.1).")] = None,
    dpo_normalize_logratios_by_length: Annotated[Optional[bool], typer.Option(
        "--dpo-normalize-logratios-by-length", help="DPO: divide log-ratios by response length.")] = None,
    rpo_alpha: Annotated[Optional[float], typer.Option(help="DPO: weight of the NLL term on chosen responses.")
                         ] = None,
    simpo_gamma: Annotated[Optional[float], typer.Option(help="DPO: SimPO reward margin; > 0 also turns on "
                                                         "reference-free and length normalisation, as the SDK does.")
                           ] = None,
    train_on_inputs: Annotated[Optional[Literal["true", "false", "auto"]], _opt("train_on_inputs")] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help=_DOC["packing"])] = None,
    max_seq_length: Annotated[Optional[int], _opt("max_seq_length")] = None,
    gradient_accumulation_steps: Annotated[Optional[int], _opt("gradient_accumulation_steps")] = None,
    random_seed: Annotated[Optional[int], _opt("random_seed")] = None,
    wandb_api_key: Annotated[Optional[str], _opt("wandb_api_key")] = None,
    wandb_base_url: Annotated[Optional[str], _opt("wandb_base_url")] = None,
    wandb_project_name: Annotated[Optional[str], _opt("wandb_project_name")] = None,
    wandb_name: Annotated[Optional[str], _opt("wandb_name")] = None,
    wandb_entity: Annotated[Optional[str], _opt("wandb_entity")] = None,
    early_stopping_enabled: Annotated[bool, typer.Option("--early-stopping-enabled",
                                                         help=_DOC["early_stopping_enabled"])] = False,
    early_stopping_patience: Annotated[Optional[int], _opt("early_stopping_patience")] = None,
    early_stopping_min_delta: Annotated[Optional[float], _opt("early_stopping_min_delta")] = None,
    early_stopping_warmup_evals: Annotated[Optional[int], _opt("early_stopping_warmup_evals")] = None,
    confirm: Annotated[bool, typer.Option("--confirm", "-y", help="Skip the confirmation prompt.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Then follow the job, as `watch` does.")] = False,
    base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False,
):
    """Start a fine-tuning job. Flags left out are left out of the request, so server defaults apply."""
    lora_args = _drop_none(dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                lora_trainable_modules=lora_trainable_modules))
    if lora is False and lora_args:
        err.print(f"[red]Error:[/red] LoRA flags ({', '.join(lora_args)}) were given with --no-lora; "
                  "use --lora or remove them.")
        raise typer.Exit(1)
    # The SDK's body (api-reference §5.2): training_type, training_method and lr_scheduler nested.
    if lora is False:
        training_type = {"type": "Full"}
    elif lora or lora_args:  # LoRA flags alone mean LoRA (the together CLI silently drops them)
        training_type = {"type": "Lora", **lora_args}
    else:
        training_type = None  # the server's choice: LoRA, or the parent job's type
    method = _drop_none(dict(train_on_inputs={"true": True, "false": False}.get(train_on_inputs, train_on_inputs),
                             dpo_beta=dpo_beta, dpo_normalize_logratios_by_length=dpo_normalize_logratios_by_length,
                             rpo_alpha=rpo_alpha, simpo_gamma=simpo_gamma))
    if simpo_gamma:  # SimPO has no reference model (the SDK's rule)
        method |= {"dpo_reference_free": True, "dpo_normalize_logratios_by_length": True}
    training_method = {"method": training_method or "sft", **method} if training_method or method else None
    scheduler_args = _drop_none(dict(min_lr_ratio=min_lr_ratio, num_cycles=scheduler_num_cycles)) or None
    lr_scheduler = _drop_none(dict(lr_scheduler_type=lr_scheduler_type, lr_scheduler_args=scheduler_args)) or None
    body = _drop_none(dict(
        training_file=training_file, validation_file=validation_file, model=model, from_checkpoint=from_checkpoint,
        n_epochs=n_epochs, n_checkpoints=n_checkpoints, n_evals=n_evals, batch_size=_batch_size(batch_size),
        learning_rate=learning_rate, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio,
        max_grad_norm=max_grad_norm, weight_decay=weight_decay, suffix=suffix, training_type=training_type,
        training_method=training_method, packing=packing, max_seq_length=max_seq_length,
        gradient_accumulation_steps=gradient_accumulation_steps, random_seed=random_seed,
        wandb_key=wandb_api_key,  # the SDKs' name for it; the server takes wandb_api_key too
        wandb_base_url=wandb_base_url, wandb_project_name=wandb_project_name, wandb_name=wandb_name,
        wandb_entity=wandb_entity, early_stopping_enabled=early_stopping_enabled or None,
        early_stopping_patience=early_stopping_patience, early_stopping_min_delta=early_stopping_min_delta,
        early_stopping_warmup_evals=early_stopping_warmup_evals))
    client = _client(base_url, api_key)
    # A local path is checked and uploaded first (as the v3 CLI does); the server wants file ids.
    for name in ("training_file", "validation_file"):
        if name in body and Path(body[name]).is_file():
            body[name] = _upload(client, Path(body[name]))["id"]
    try:
        if not confirm:
            asked = ("training_file", "validation_file", "model", "from_checkpoint", "n_epochs", "n_evals")
            price = client.estimate_price({k: body[k] for k in asked if k in body})
            total = price.get("estimated_total_price")  # absent when the server cannot estimate
            err.print("About to create a fine-tuning job" + (f", estimated price ${total:.2f}:" if total is not None
                                                              else ":"))
            err.print_json(data=body | ({"wandb_key": "***"} if wandb_api_key else {}))
            if sys.stdin.isatty() and not typer.confirm("Proceed?", err=True):
                err.print("Not created.")
                raise typer.Exit(1)
        job = client.create_job(body)
    except ApiError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(job, indent=2))
    else:
        console.print(f"Created fine-tuning job [bold]{job['id']}[/bold] ({job['status']}); output model "
                      f"{job['model_output_name']}.")
        if not watch:
            console.print(f"Follow it with `tunehouse ft watch {job['id']}`.")
    if watch:
        raise typer.Exit(_watch(client, job["id"]))


def _api(call, *args, **kw):
    """Run one client call; an API error becomes a red message and exit code 1."""
    try:
        return call(*args, **kw)
    except ApiError as exc:
        _fail(exc)


def _print_rows(rows: list[dict], json_out: bool, headers: tuple[str, ...], cells) -> None:
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table()
    for i, h in enumerate(headers):  # ids (first column) stay whole: they are what users copy
        table.add_column(h, no_wrap=i == 0)
    for r in rows:
        table.add_row(*cells(r))
    console.print(table)


@ft_app.command("list")
def ft_list(base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """List your fine-tuning jobs, oldest first."""
    _print_rows(_api(_client(base_url, api_key).list_jobs), json_out,
                ("id", "output model", "status", "created", "steps"),
                lambda j: (j["id"], j["model_output_name"], _status(j["status"]), _when(j["created_at"]),
                           f"{j.get('steps_completed', 0)}/{j.get('total_steps') or '?'}"))


@ft_app.command("retrieve")
def ft_retrieve(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Show one job (its events: `list-events`)."""
    job = _api(_client(base_url, api_key).retrieve_job, job_id)
    if json_out:
        print(json.dumps(job, indent=2))
    else:
        console.print_json(data={k: v for k, v in job.items() if k != "events"})


@ft_app.command("list-events")
def ft_list_events(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """A job's events, oldest first."""
    _print_rows(_api(_client(base_url, api_key).list_events, job_id), json_out,
                ("created", "level", "type", "message"),
                lambda e: (_when(e["created_at"]), e.get("level") or "", e.get("type") or "", e["message"]))


@ft_app.command("list-checkpoints")
def ft_list_checkpoints(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """A job's checkpoints; the first column is what `download` takes."""
    _print_rows(_api(_client(base_url, api_key).list_checkpoints, job_id), json_out,
                ("download id", "type", "step", "created"),
                lambda c: (c["path"], c["checkpoint_type"], str(c["step"]), _when(c["created_at"])))


@ft_app.command("list-metrics")
def ft_list_metrics(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Training metrics by optimizer step (train_loss, lr, valid_loss, …)."""
    rows = _api(_client(base_url, api_key).list_metrics, job_id)
    names = tuple(dict.fromkeys(k for r in rows for k in r))
    _print_rows(rows, json_out, names,
                lambda r: [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in names])


@ft_app.command("cancel")
def ft_cancel(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Stop a job; a running one keeps the checkpoints it has saved."""
    job = _api(_client(base_url, api_key).cancel_job, job_id)
    print(json.dumps(job, indent=2) if json_out else f"Job {job_id} is now {job['status']}.")


@ft_app.command("delete")
def ft_delete(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Delete a job with its events, checkpoints and weights."""
    res = _api(_client(base_url, api_key).delete_job, job_id)
    print(json.dumps(res) if json_out else f"Deleted {job_id}")


@ft_app.command("download")
def ft_download(
    job_ref: Annotated[str, typer.Argument(metavar="ID[:STEP]", help="A job id, or ID:STEP for an intermediate "
                                           "checkpoint (as `list-checkpoints` shows).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File or folder (default: the current "
                                                   "folder, named after the output model).")] = None,
    checkpoint_type: Annotated[Literal["merged", "adapter", "default"], typer.Option(
        help="merged (LoRA merged into the base), adapter, or default (merged for LoRA, the model for Full jobs).")
    ] = "default",
    checkpoint_step: Annotated[Optional[int], typer.Option("--checkpoint-step", "-s", help="An intermediate step "
                                                           "(instead of ID:STEP).")] = None,
    base_url: BaseUrl = None, api_key: ApiKey = None,
):
    """Download a job's weights as a zstd-compressed tar (resumed if the connection breaks)."""
    job_id, _, step = job_ref.partition(":")
    if step and not step.isdigit():
        raise typer.BadParameter(f"ID[:STEP] with an integer step, got {job_ref!r}", param_hint="ID[:STEP]")
    try:
        with _progress("downloading") as bar:
            task = bar.add_task("download", total=None)
            path = _client(base_url, api_key).download(
                job_id, output, checkpoint_type, checkpoint_step or (int(step) if step else None),
                progress=lambda done, total: bar.update(task, completed=done, total=total))
    except ApiError as exc:
        _fail(exc)
    console.print(f"Wrote {path.stat().st_size} bytes to {path}")


@ft_app.command("watch")
def ft_watch(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None,
             interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 1.0):
    """Follow a job live: progress, loss, learning rate, ETA and new events.

    Exits once the job has ended: code 0 if it completed, 1 otherwise."""
    raise typer.Exit(_watch(_client(base_url, api_key), job_id, interval))


def _watch(client: Client, job_id: str, interval: float = 1.0) -> int:
    seen, last_step, stats = 0, 0, {}
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=30),
               TextColumn("step {task.completed:.0f}/{task.fields[of]}"), TextColumn("{task.fields[stats]}"))
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("", total=None, of="?", stats="")
            while True:
                job = client.retrieve_job(job_id)
                for e in job.get("events", [])[seen:]:
                    style = {"warning": "yellow", "error": "red"}.get((e.get("level") or "").lower(), "")
                    bar.console.print(f"{e['created_at'][11:19]}  [{style}]{e['message']}[/{style}]" if style
                                      else f"{e['created_at'][11:19]}  {e['message']}", highlight=False)
                seen = len(job.get("events", []))
                if job.get("steps_completed", 0) > last_step:
                    for row in client.list_metrics(job_id, global_step_from=last_step + 1):
                        stats |= {k: row[k] for k in ("train_loss", "lr") if k in row}
                    last_step = job["steps_completed"]
                prog = job.get("progress") or {}
                eta = (f"ETA {time.strftime('%H:%M:%S', time.gmtime(prog['seconds_remaining']))}"
                       if prog.get("seconds_remaining") and job["status"] == "running" else "")
                shown = " ".join([f"{k} {v:.4g}" for k, v in stats.items()] + [eta])
                bar.update(task, description=_status(job["status"]), completed=job.get("steps_completed", 0),
                           total=job.get("total_steps") or None, of=job.get("total_steps") or "?", stats=shown)
                if job["status"] in TERMINAL:
                    break
                time.sleep(interval)
    except ApiError as exc:
        _fail(exc)
    if job["status"] == "completed":
        console.print(f"[green]Completed.[/green] Output model {job['model_output_name']}; "
                      f"download it with `tunehouse ft download {job_id}`.")
        return 0
    console.print(f"Job {job_id} ended {_status(job['status'])}.")
    return 1


def _when(iso: str) -> str:
    return iso[:16].replace("T", " ")


def _status(status: str) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


# -- models and the worker (local home, no server) -----------------------------------------------
@models_app.command("list")
def models_list(home: HomeDir = None, json_out: JsonOut = False):
    """Models jobs can start from: the built-ins and those added with `models add`."""
    from tunehouse.models.registry import Registry
    from tunehouse.store.home import open_home

    models = Registry(open_home(_settings(home))).list()
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
        m = Registry(open_home(_settings(home))).add(name, source)
    except TunehouseError as exc:
        _fail(exc)
    console.print(f"Added {m.name} from {m.source} (context length {m.context_length}).")


@app.command()
def worker(home: HomeDir = None):
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
                console.print(f"{job_id}: {_status(job.status) if job else 'deleted'}")

    settings = _settings(home)
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
    console.print(f"worker {w.worker_id} waiting for jobs in {settings.home} (Ctrl-C to stop)")
    w.run_forever()
    console.print("worker stopped")


@app.command()
def quickstart(home: HomeDir = None,
               coqa: Annotated[Optional[Path], typer.Option("--coqa", help="A real CoQA JSON file to use instead "
                                                            "of the generated stories.")] = None,
               model: Annotated[Optional[str], typer.Option(help="Base model (default SmolLM2-135M-Instruct).")] = None,
               small: Annotated[bool, typer.Option("--small", help="Tiny test model, few stories and steps "
                                                   "(under a minute).")] = False):
    """The end-to-end walk-through on an embedded server: data → check → upload → LoRA SFT (live) →
    base vs fine-tuned evaluation → DPO from the SFT job → how to chat with the result."""
    from tunehouse import quickstart as qs

    qs.run(_settings(home), small=small, model=model, coqa_file=coqa)


# -- chat -----------------------------------------------------------------------------------
@app.command()
def chat(model: Annotated[str, typer.Argument(help="A base model or one of your fine-tuned models.")],
         system: Annotated[Optional[str], typer.Option(help="System prompt for the conversation.")] = None,
         max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 512,
         temperature: Annotated[float, typer.Option(help="0 = greedy; higher = more varied.")] = 0.7,
         base_url: BaseUrl = None, api_key: ApiKey = None):
    """Chat with a model in the terminal; replies stream in as they are generated. The whole
    conversation is sent each turn; `/exit` (or end of input) quits."""
    client = _client(base_url, api_key)
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive:
        console.print(f"Chatting with [bold]{model}[/bold]; /exit to quit.")
    while True:
        if interactive:
            console.print("[bold green]you>[/bold green] ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        if interactive:
            console.print(f"[bold blue]{model}>[/bold blue] ", end="")
        try:
            reply = _stream_reply(client, {"model": model, "messages": messages, "max_tokens": max_tokens,
                                           "temperature": temperature, "stream": True})
        except ApiError as exc:
            _fail(exc)
        messages.append({"role": "assistant", "content": reply})


def _stream_reply(client: Client, body: dict) -> str:
    """POST a streamed chat completion, print the text as it arrives, return all of it."""
    import httpx

    reply = []
    try:
        with client.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiError(resp.status_code, resp.json().get("error", {}).get("message", resp.text), {})
            for line in resp.iter_lines():
                data = line.removeprefix("data: ")
                if not line.startswith("data: ") or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ApiError(500, chunk["error"]["message"], chunk)
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") or ""
                    reply.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
    except httpx.ConnectError as exc:
        raise ApiError(0, f"Cannot reach the tunehouse server at {client.base_url} ({exc}). "
                          "Start it with `tunehouse serve` or pass --base-url.") from None
    sys.stdout.write("\n")
    return "".join(reply)


# -- eval ----------------------------------------------------------------------------------------
@app.command("eval")
def eval_models(model: Annotated[list[str], typer.Option("--model", help="A model to compare; repeat the flag "
                                                         "for each (the first is the baseline).")],
                file: Annotated[Path, typer.Option("--file", help="Held-out chat JSONL; every assistant turn "
                                                   "is asked with the gold history before it.")],
                out: Annotated[Path, typer.Option("--out", help="Folder for eval.json and eval.svg.")] = Path("eval"),
                base_url: BaseUrl = None, api_key: ApiKey = None,
                max_tokens: Annotated[int, typer.Option(min=1, help="Answer length cap, tokens.")] = 32,
                concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
                json_out: JsonOut = False):
    """Compare models on a held-out chat file through /v1/chat/completions (any compatible server):
    exact match and token F1 of greedy answers, validation loss and perplexity; writes eval.json
    and an SVG bar chart."""
    from tunehouse.evaluate import compare

    client = _client(base_url, api_key)  # resolves the URL and key as every other command does
    client.close()
    try:
        result = compare.compare(model, file, base_url=client.base_url, api_key=client.api_key,
                                 max_tokens=max_tokens, concurrency=concurrency, console=None if json_out else err)
    except compare.CompareError as exc:
        err.print(f"[red]Error:[/red] {exc}")
        raise typer.Exit(1)
    json_path, svg_path = compare.write_outputs(result, out)
    if json_out:
        print(json.dumps({"models": result["models"], "json": str(json_path), "svg": str(svg_path)}, indent=2))
        return
    console.print(compare.results_table(result))
    console.print(f"Wrote {json_path} and {svg_path}")
