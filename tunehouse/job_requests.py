"""Turn a `POST /v1/fine-tunes` body into a validated training config and a new job.

Every problem is collected and reported at once (field, bound, value), as the hosted service
does: a user fixes their call in one round trip, not one field at a time."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse import jobs
from tunehouse.api.schemas import FineTuneCreate
from tunehouse.errors import InvalidInput, NotFound, TunehouseError
from tunehouse.files import FileService
from tunehouse.ids import new_job_id
from tunehouse.models.registry import Registry
from tunehouse.store.tables import Checkpoint, File, Job
from tunehouse.train.config import SFTConfig

SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,40}$")
CPU_MAX_BATCH = 8  # what "max" resolves to without a GPU: larger batches only slow each step down


@dataclass
class Parent:
    job: Job
    checkpoint: Checkpoint


def parse_checkpoint_ref(ref: str) -> tuple[str, int | None]:
    """`ft-ID`, `ft-ID:STEP`, `NAME` or `NAME:STEP` → (id or name, step or None)."""
    head, sep, tail = ref.rpartition(":")
    if sep and tail.isdigit():
        return head, int(tail)
    return ref, None


def resolve_parent(s: Session, owner: str, ref: str) -> Parent:
    key, step = parse_checkpoint_ref(ref)
    job = s.get(Job, key) if key.startswith("ft-") else s.scalar(select(Job).where(Job.model_output_name == key))
    if job is None or job.owner != owner:
        raise NotFound(f"from_checkpoint {ref!r}: no job or output model of yours has that name.",
                       param="from_checkpoint")
    cps = jobs.checkpoints(s, job.id)
    if step is None:
        cps = [c for c in cps if c.checkpoint_type == "Final"]
    else:
        cps = [c for c in cps if c.step == step]
    if not cps:
        steps = ", ".join(str(c.step) for c in jobs.checkpoints(s, job.id)) or "none yet"
        raise InvalidInput(f"from_checkpoint {ref!r}: job {job.id} has no such checkpoint (steps: {steps}).",
                           param="from_checkpoint")
    return Parent(job, cps[-1])


def _owned_file(s: Session, files: FileService, owner: str, file_id: str, field: str, problems: list) -> File | None:
    try:
        f = files.get(s, owner, file_id)
    except NotFound:
        problems.append((field, f"{field}: no file {file_id!r} (upload it first; ids look like file-…)."))
        return None
    if f.processing_status == "PENDING":
        files.validate(s, f)
    if f.processing_status != "COMPLETED":
        first = (f.validation_report or {}).get("error") or "it failed validation"
        problems.append((field, f"{field}: file {file_id} failed validation: {first} "
                                f"(see `tunehouse files retrieve {file_id}`)."))
        return None
    if f.purpose != "fine-tune":
        problems.append((field, f"{field}: file {file_id} has purpose {f.purpose!r}; upload it with purpose fine-tune."))
    return f


def create_job(s: Session, owner: str, req: FineTuneCreate, registry: Registry, files: FileService) -> Job:
    problems: list[tuple[str, str]] = []

    def bad(field: str, message: str) -> None:
        if all(f != field for f, _ in problems):  # one message per field, the most specific first
            problems.append((field, message))

    # Where the weights come from: a base model, or a parent job's checkpoint.
    parent = None
    if bool(req.model) == bool(req.from_checkpoint):
        bad("model", "Give exactly one of model and from_checkpoint.")
    if req.from_checkpoint and req.from_hf_model:
        bad("from_hf_model", "from_hf_model and from_checkpoint cannot be used together.")
    if req.from_checkpoint:
        parent = resolve_parent(s, owner, req.from_checkpoint)
    base = parent.job.model if parent else req.model
    limits = None
    if base:
        try:
            limits = registry.limits(base, s)
        except TunehouseError as exc:
            bad("model", exc.message)

    # Files: owned, stored, validated, of the right kind.
    train = _owned_file(s, files, owner, req.training_file, "training_file", problems)
    validation_file = req.validation_file or None
    val = _owned_file(s, files, owner, validation_file, "validation_file", problems) if validation_file else None

    # Method: sft, or the DPO family; the file's format must fit the method.
    tm = req.training_method
    method = (tm.method if tm else "sft").lower()
    warnings: list[str] = []
    train_on_inputs = "auto"
    if tm and tm.train_on_inputs is not None:
        train_on_inputs = tm.train_on_inputs
    elif req.train_on_inputs is not None:
        train_on_inputs = req.train_on_inputs
    if train_on_inputs in ("true", "false"):
        train_on_inputs = train_on_inputs == "true"
    if method not in ("sft", "dpo"):
        bad("training_method.method", f"training_method.method must be 'sft' or 'dpo'; got {method!r}.")
    for field, f in (("training_file", train), ("validation_file", val)):
        if f is None:
            continue
        if method == "dpo" and f.dataset_format != "PREFERENCE":
            bad(field, f"{field}: DPO needs a preference dataset (input, preferred_output, non_preferred_output) "
                       f"in JSONL; file {f.id} is {f.dataset_format or f.file_type}.")
        if method == "sft" and f.dataset_format == "PREFERENCE":
            bad(field, f"{field}: file {f.id} holds preference pairs; train on it with training_method dpo.")
    dpo_fields: dict = {}
    if method == "dpo":
        if train_on_inputs != "auto":
            warnings.append("train_on_inputs is ignored for DPO: only completions are scored.")
        dpo_fields = {"dpo_beta": 0.1 if not tm or tm.dpo_beta is None else tm.dpo_beta,
                      "dpo_normalize_logratios_by_length": bool(tm and tm.dpo_normalize_logratios_by_length),
                      "dpo_reference_free": bool(tm and tm.dpo_reference_free),
                      "rpo_alpha": 0.0 if not tm or tm.rpo_alpha is None else tm.rpo_alpha,
                      "simpo_gamma": 0.0 if not tm or tm.simpo_gamma is None else tm.simpo_gamma}
        beta = dpo_fields["dpo_beta"]
        if isinstance(beta, (int, float)) and beta > 0 and not 0.05 <= beta <= 0.9:
            warnings.append(f"dpo_beta {beta} is outside the usual 0.05-0.9: the policy may drift far from "
                            "the reference (small beta) or barely move (large beta).")
    elif tm and any(getattr(tm, k) is not None for k in ("dpo_beta", "rpo_alpha", "simpo_gamma")):
        bad("training_method", "dpo_beta, rpo_alpha and simpo_gamma apply to training_method dpo only.")
    tt = req.training_type
    if tt is None and parent:
        lora, lora_fields = parent.job.config["train"]["lora"], parent.job.config["train"]
        lora_fields = {k: lora_fields[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_trainable_modules")}
    else:
        lora = tt is None or tt.type.lower() == "lora"
        if tt is not None and tt.type.lower() not in ("lora", "full"):
            bad("training_type.type", f"training_type.type must be 'Lora' or 'Full'; got {tt.type!r}.")
        lora_fields = {}
        if lora:
            r = tt.lora_r if tt and tt.lora_r is not None else (limits or {}).get("lora_training", {}).get("default_rank", 8)
            lora_fields = {"lora_r": r, "lora_alpha": tt.lora_alpha if tt and tt.lora_alpha is not None else 2 * r,
                           "lora_dropout": tt.lora_dropout if tt and tt.lora_dropout is not None else 0.0,
                           "lora_trainable_modules": (tt.lora_trainable_modules if tt and tt.lora_trainable_modules
                                                      else "all-linear")}
    if limits and lora and isinstance(lora_fields.get("lora_r"), int):
        max_rank = limits["lora_training"]["max_rank"]
        if lora_fields["lora_r"] > max_rank:
            bad("training_type.lora_r", f"lora_r must be ≤ {max_rank} for {base}; got {lora_fields['lora_r']}.")

    # Batch size: "max" is resolved here; an int must be within the model's bounds.
    bounds = (limits or {}).get("lora_training" if lora else "full_training") or {}
    max_batch = bounds.get("max_batch_size_dpo" if method == "dpo" else "max_batch_size", CPU_MAX_BATCH)
    batch_size = req.batch_size
    if batch_size == "max":
        batch_size = min(max_batch, CPU_MAX_BATCH)
    elif not isinstance(batch_size, int):
        bad("batch_size", f'batch_size must be an integer or "max"; got {batch_size!r}.')
        batch_size = 1
    elif bounds and not bounds["min_batch_size"] <= batch_size <= max_batch:
        bad("batch_size", f"batch_size must be between {bounds['min_batch_size']} and {max_batch}"
                          f"{' for DPO' if method == 'dpo' else ''}; got {batch_size}.")
    if limits:
        if req.n_epochs > limits["max_num_epochs"]:
            bad("n_epochs", f"n_epochs must be ≤ {limits['max_num_epochs']}; got {req.n_epochs}.")
        if not limits["min_learning_rate"] <= req.learning_rate <= limits["max_learning_rate"]:
            bad("learning_rate", f"learning_rate must be in [{limits['min_learning_rate']}, "
                                 f"{limits['max_learning_rate']}]; got {req.learning_rate}.")
        seq_limit = limits["max_seq_length_dpo" if method == "dpo" else "max_seq_length_sft"]
        if req.max_seq_length is not None and not limits["min_max_seq_length"] <= req.max_seq_length <= seq_limit:
            bad("max_seq_length", f"max_seq_length must be between {limits['min_max_seq_length']} and "
                                  f"{seq_limit} for {base}; got {req.max_seq_length}.")
    if req.suffix is not None and not SUFFIX_RE.match(req.suffix):
        bad("suffix", f"suffix must be 1-40 letters, digits, '.', '_' or '-'; got {req.suffix!r}.")
    if (req.multimodal_params or {}).get("train_vision"):
        bad("multimodal_params.train_vision", f"{base} does not support vision (supports_vision is false).")
    if req.hf_output_repo_name:
        bad("hf_output_repo_name", "Uploading to the Hugging Face hub is not available on this server; "
                                   "download the output with `tunehouse fine-tuning download`.")

    sched = req.lr_scheduler or None
    sched_args = sched.lr_scheduler_args if sched and sched.lr_scheduler_args else None
    values = dict(
        model=base or "?", training_file=req.training_file, validation_file=validation_file,
        n_epochs=req.n_epochs, n_checkpoints=req.n_checkpoints, n_evals=req.n_evals, batch_size=batch_size,
        gradient_accumulation_steps=req.gradient_accumulation_steps, learning_rate=req.learning_rate,
        lr_scheduler_type=sched.lr_scheduler_type if sched else "cosine",
        min_lr_ratio=sched_args.min_lr_ratio if sched_args and sched_args.min_lr_ratio is not None else 0.0,
        scheduler_num_cycles=sched_args.num_cycles if sched_args and sched_args.num_cycles is not None else 0.5,
        warmup_ratio=req.warmup_ratio, max_grad_norm=req.max_grad_norm, weight_decay=req.weight_decay,
        lora=lora, **lora_fields,
        max_seq_length=req.max_seq_length or min((limits or {}).get("max_seq_length_sft", 2048), 2048),
        packing=req.packing, random_seed=42 if req.random_seed is None else req.random_seed,
        wandb_api_key=req.wandb_api_key or req.wandb_key, wandb_base_url=req.wandb_base_url,
        wandb_project_name=req.wandb_project_name, wandb_name=req.wandb_name, wandb_entity=req.wandb_entity,
        early_stopping_enabled=bool(req.early_stopping_enabled),
        early_stopping_patience=2 if req.early_stopping_patience is None else req.early_stopping_patience,
        early_stopping_min_delta=req.early_stopping_min_delta or 0.0,
        early_stopping_warmup_evals=1 if req.early_stopping_warmup_evals is None else req.early_stopping_warmup_evals)
    try:
        if method == "dpo":
            from tunehouse.train.config import DPOConfig

            cfg = DPOConfig(**values, **dpo_fields)
        else:
            cfg = SFTConfig(**values, train_on_inputs=train_on_inputs)
    except ValueError as exc:
        for part in str(exc).split(": ", 1)[-1].split("; "):
            bad(part.split(" ", 1)[0], part + ".")
        cfg = None
    if problems:
        raise InvalidInput("Invalid fine-tuning request: " + " ".join(m for _, m in problems),
                           param=problems[0][0], code="invalid_fine_tune_request")

    job_id = new_job_id()
    suffix = f"-{req.suffix}" if req.suffix else ""
    output_name = f"{owner}/{base.rsplit('/', 1)[-1]}{suffix}-{job_id[3:11]}"
    extra = {"suffix": req.suffix, "from_checkpoint": req.from_checkpoint, "from_hf_model": req.from_hf_model,
             "hf_model_revision": req.hf_model_revision}
    if parent:
        extra["parent"] = {"job_id": parent.job.id, "step": parent.checkpoint.step,
                           "blob_key": parent.checkpoint.blob_key, "lora": parent.job.config["train"]["lora"],
                           "lora_shape": {k: parent.job.config["train"].get(k) for k in
                                          ("lora_r", "lora_alpha", "lora_trainable_modules")}}
    job = Job(id=job_id, owner=owner, status="pending", method=method, model=base, training_file=req.training_file,
              validation_file=validation_file, from_checkpoint=req.from_checkpoint,
              config={"train": cfg.to_dict(), "extra": extra}, model_output_name=output_name,
              progress={"token_count": 0, "train_lines": train.num_samples if train else None})
    s.add(job)
    s.flush()
    jobs.add_event(s, job.id, "JOB_PENDING", "Fine tune request created")
    for warning in warnings:
        jobs.add_event(s, job.id, "WARNING", warning, level="warning")
    jobs.set_status(job, "queued")
    return job
