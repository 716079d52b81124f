"""`tunehouse fine-tuning` (alias `ft`): the together CLI's commands and `create` flags, plus a
live `watch`."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Annotated, Literal, Optional, get_type_hints

import typer
from rich.progress import BarColumn, Progress, TextColumn

from tunehouse.cli import common
from tunehouse.cli.common import (
    TERMINAL, ApiKey, BaseUrl, JsonOut, api_call, console, err, fail, print_rows, status_text, transfer_progress, when,
)
from tunehouse.cli.files import upload_checked
from tunehouse.client import ApiError, Client
from tunehouse.train.config import CONFIGS, SFTConfig, field_docs
from tunehouse.train.wire import to_request

ft_app = typer.Typer(help="Create, follow and download fine-tuning jobs (the together CLI's commands and flags).",
                     no_args_is_help=True)


# Flags generated from the training configs (STYLE principle 5: flag = API field = config field):
# `--field-name` with the field's docstring as help; bools as --x/--no-x.
_SHORT = {"n_checkpoints": ("-c",), "batch_size": ("-b",), "learning_rate": ("--lr",)}
_FILES = ("model", "training_file", "validation_file")  # options of their own below


def _config_fields() -> dict[str, tuple[type, str]]:
    """Every hyperparameter of SFT and DPO (shared ones once) → (flag type, help)."""
    out: dict[str, tuple[type, str]] = {}
    for method, cls in CONFIGS.items():
        hints, docs = get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in _FILES or f.name in out:
                continue
            hint = hints[f.name]
            kind = bool if hint is bool else int if hint in (int, int | None) else float if hint is float else str
            scope = "" if all(f.name in {g.name for g in dataclasses.fields(c)} for c in CONFIGS.values()) \
                else f" ({method.upper()} only.)"
            out[f.name] = (kind, docs.get(f.name, "") + scope)
    return out


CONFIG_FLAGS = _config_fields()


def _flag(name: str, kind: type, help_: str) -> inspect.Parameter:
    flag = f"--{name.replace('_', '-')}"
    decls = (f"{flag}/--no-{name.replace('_', '-')}",) if kind is bool else (flag, *_SHORT.get(name, ()))
    metavar = {"batch_size": "INT|max", "train_on_inputs": "true|false|auto"}.get(name)
    option = typer.Option(*decls, help=help_, metavar=metavar, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


def _typed(name: str, value):
    if name == "train_on_inputs" and value in ("true", "false"):
        return value == "true"
    if name == "batch_size" and value != "max":
        if not str(value).isdigit():
            raise typer.BadParameter(f'an integer or "max", got {value!r}', param_hint="--batch-size")
        return int(value)
    return value


def ft_create(
    training_file: Annotated[str, typer.Option("--training-file", "-t", help="Training file id, or a local path "
                                               "(checked, then uploaded).")],
    validation_file: Annotated[Optional[str], typer.Option("--validation-file", "-v", help="Validation file id, "
                                                           "or a local path (checked, then uploaded).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=field_docs(SFTConfig)["model"])] = None,
    from_checkpoint: Annotated[Optional[str], typer.Option(
        help="Continue a job instead of starting from a model: ft-ID, ft-ID:STEP, OUTPUT_NAME or OUTPUT_NAME:STEP.")
    ] = None,
    training_method: Annotated[Optional[str], typer.Option(help="sft (the default), or dpo on preference pairs.")
                               ] = None,
    suffix: Annotated[Optional[str], typer.Option(help="Added to the output model name: 1-40 of A-Z a-z 0-9 . _ -")
                      ] = None,
    from_hf_model: Annotated[Optional[str], typer.Option(
        help="Start from these weights (a model folder on the server, a registered model, or a hub repo the server "
             "can reach) instead of --model's; --model names their base model.")] = None,
    hf_model_revision: Annotated[Optional[str], typer.Option(help="Hub revision of --from-hf-model.")] = None,
    hf_api_token: Annotated[Optional[str], typer.Option(help="Hugging Face token for --from-hf-model and "
                                                        "--hf-output-repo-name.")] = None,
    hf_output_repo_name: Annotated[Optional[str], typer.Option(
        help="Also push the output to this hub repo (needs --hf-api-token and a server that reaches the hub).")
    ] = None,
    confirm: Annotated[bool, typer.Option("--confirm", "-y", help="Skip the confirmation prompt.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Then follow the job, as `watch` does.")] = False,
    base_url: BaseUrl = None, api_key: ApiKey = None, json_out: JsonOut = False, **hyperparameters,
):
    """Start a fine-tuning job. Flags left out are left out of the request, so server defaults apply."""
    given = {k: _typed(k, v) for k, v in hyperparameters.items() if v is not None}
    method = (training_method or "sft").lower()
    body = to_request(given, method) | {k: v for k, v in dict(
        training_file=training_file, validation_file=validation_file, model=model, from_checkpoint=from_checkpoint,
        suffix=suffix, from_hf_model=from_hf_model, hf_model_revision=hf_model_revision, hf_api_token=hf_api_token,
        hf_output_repo_name=hf_output_repo_name).items() if v is not None}
    if training_method:
        body.setdefault("training_method", {})["method"] = method
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
            err.print_json(data={k: "***" if k in ("wandb_api_key", "hf_api_token") else v for k, v in body.items()})
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


def _with_config_flags(func):
    """`func` with one keyword parameter per config field, which typer turns into its flags."""
    sig = inspect.signature(func, eval_str=True)
    fixed = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    fixed = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in fixed]
    generated = [_flag(name, kind, help_) for name, (kind, help_) in CONFIG_FLAGS.items()]

    def command(**kwargs):
        return func(**kwargs)
    command.__signature__ = sig.replace(parameters=fixed + generated)
    command.__doc__ = func.__doc__
    return command


ft_app.command("create")(_with_config_flags(ft_create))


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
                                                   "folder, named after the output model); with --gguf, a folder.")
                      ] = None,
    checkpoint_type: Annotated[Literal["merged", "adapter", "default"], typer.Option(
        help="merged (LoRA merged into the base), adapter, or default (merged for LoRA, the model for Full jobs).")
    ] = "default",
    checkpoint_step: Annotated[Optional[int], typer.Option("--checkpoint-step", "-s", help="An intermediate step "
                                                           "(instead of ID:STEP).")] = None,
    gguf: Annotated[bool, typer.Option("--gguf", help="The final model as GGUF for llama.cpp and Ollama, unpacked "
                                       "into a folder with a Modelfile (and the LoRA adapter as a GGUF adapter).")
                    ] = False,
    gguf_type: Annotated[Literal["f16", "f32", "bf16", "q8_0"], typer.Option(help="With --gguf: the weights' type.")
                         ] = "f16",
    base_url: BaseUrl = None, api_key: ApiKey = None,
):
    """Download a job's weights as a zstd-compressed tar (resumed if the connection breaks), or with
    --gguf as a ready-to-run GGUF folder (the server builds it on the first download)."""
    job_id, _, step = job_ref.partition(":")
    if step and not step.isdigit():
        raise typer.BadParameter(f"ID[:STEP] with an integer step, got {job_ref!r}", param_hint="ID[:STEP]")
    if gguf and output is not None:
        output.mkdir(parents=True, exist_ok=True)
    try:
        with transfer_progress("building GGUF, downloading" if gguf else "downloading") as bar:
            task = bar.add_task("download", total=None)  # no total while the server builds the archive
            path = common.client_for(base_url, api_key).download(
                job_id, output, "gguf" if gguf else checkpoint_type, checkpoint_step or (int(step) if step else None),
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                gguf_type=gguf_type if gguf else None)
    except ApiError as exc:
        fail(exc)
    if not gguf:
        console.print(f"Wrote {path.stat().st_size} bytes to {path}")
        return
    folder = unpack_tar(path)
    console.print(f"Wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}\n"
                  f"Run it with Ollama: ollama create {folder.name.lower()} -f {folder / 'Modelfile'}")


def unpack_tar(path: Path) -> Path:
    """Unpack a GGUF download beside itself, delete the tar, and return the one folder it held."""
    with tarfile.open(path) as tar:
        tops = {Path(n).parts[0] for n in tar.getnames()}
        tar.extractall(path.parent, filter="data")
    path.unlink()
    return path.parent / tops.pop()


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
