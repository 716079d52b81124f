"""`tunehouse fine-tuning` (alias `ft`): the together CLI's commands and `create` flags, plus a
live `watch`."""

from __future__ import annotations

import ast
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn

from tunehouse.cli import common
from tunehouse.cli.common import (
    TERMINAL, ApiKey, BaseUrl, JsonOut, api_call, console, err, fail, print_rows, status_text, transfer_progress, when,
)
from tunehouse.cli.files import upload_checked
from tunehouse.client import ApiError, Client
from tunehouse.train.config import SFTConfig

ft_app = typer.Typer(help="Create, follow and download fine-tuning jobs (the together CLI's commands and flags).",
                     no_args_is_help=True)


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
    client = common.client_for(base_url, api_key)
    # A local path is checked and uploaded first (as the v3 CLI does); the server wants file ids.
    for name in ("training_file", "validation_file"):
        if name in body and Path(body[name]).is_file():
            body[name] = upload_checked(client, Path(body[name]))["id"]
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
        fail(exc)
    if json_out:
        print(json.dumps(job, indent=2))
    else:
        console.print(f"Created fine-tuning job [bold]{job['id']}[/bold] ({job['status']}); output model "
                      f"{job['model_output_name']}.")
        if not watch:
            console.print(f"Follow it with `tunehouse ft watch {job['id']}`.")
    if watch:
        raise typer.Exit(_watch(client, job["id"]))


@ft_app.command("list")
def ft_list(base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """List your fine-tuning jobs, oldest first."""
    print_rows(api_call(common.client_for(base_url, api_key).list_jobs), json_out,
                ("id", "output model", "status", "created", "steps"),
                lambda j: (j["id"], j["model_output_name"], status_text(j["status"]), when(j["created_at"]),
                           f"{j.get('steps_completed', 0)}/{j.get('total_steps') or '?'}"))


@ft_app.command("retrieve")
def ft_retrieve(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Show one job (its events: `list-events`)."""
    job = api_call(common.client_for(base_url, api_key).retrieve_job, job_id)
    if json_out:
        print(json.dumps(job, indent=2))
    else:
        console.print_json(data={k: v for k, v in job.items() if k != "events"})


@ft_app.command("list-events")
def ft_list_events(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """A job's events, oldest first."""
    print_rows(api_call(common.client_for(base_url, api_key).list_events, job_id), json_out,
                ("created", "level", "type", "message"),
                lambda e: (when(e["created_at"]), e.get("level") or "", e.get("type") or "", e["message"]))


@ft_app.command("list-checkpoints")
def ft_list_checkpoints(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """A job's checkpoints; the first column is what `download` takes."""
    print_rows(api_call(common.client_for(base_url, api_key).list_checkpoints, job_id), json_out,
                ("download id", "type", "step", "created"),
                lambda c: (c["path"], c["checkpoint_type"], str(c["step"]), when(c["created_at"])))


@ft_app.command("list-metrics")
def ft_list_metrics(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Training metrics by optimizer step (train_loss, lr, valid_loss, …)."""
    rows = api_call(common.client_for(base_url, api_key).list_metrics, job_id)
    names = tuple(dict.fromkeys(k for r in rows for k in r))
    print_rows(rows, json_out, names,
                lambda r: [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in names])


@ft_app.command("cancel")
def ft_cancel(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Stop a job; a running one keeps the checkpoints it has saved."""
    job = api_call(common.client_for(base_url, api_key).cancel_job, job_id)
    print(json.dumps(job, indent=2) if json_out else f"Job {job_id} is now {job['status']}.")


@ft_app.command("delete")
def ft_delete(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False):
    """Delete a job with its events, checkpoints and weights."""
    res = api_call(common.client_for(base_url, api_key).delete_job, job_id)
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
        with transfer_progress("downloading") as bar:
            task = bar.add_task("download", total=None)
            path = common.client_for(base_url, api_key).download(
                job_id, output, checkpoint_type, checkpoint_step or (int(step) if step else None),
                progress=lambda done, total: bar.update(task, completed=done, total=total))
    except ApiError as exc:
        fail(exc)
    console.print(f"Wrote {path.stat().st_size} bytes to {path}")


@ft_app.command("watch")
def ft_watch(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None,
             interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 1.0):
    """Follow a job live: progress, loss, learning rate, ETA and new events.

    Exits once the job has ended: code 0 if it completed, 1 otherwise."""
    raise typer.Exit(_watch(common.client_for(base_url, api_key), job_id, interval))


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
                bar.update(task, description=status_text(job["status"]), completed=job.get("steps_completed", 0),
                           total=job.get("total_steps") or None, of=job.get("total_steps") or "?", stats=shown)
                if job["status"] in TERMINAL:
                    break
                time.sleep(interval)
    except ApiError as exc:
        fail(exc)
    if job["status"] == "completed":
        console.print(f"[green]Completed.[/green] Output model {job['model_output_name']}; "
                      f"download it with `tunehouse ft download {job_id}`.")
        return 0
    console.print(f"Job {job_id} ended {status_text(job['status'])}.")
    return 1
