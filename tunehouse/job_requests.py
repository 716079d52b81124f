"""Turn a `POST /v1/fine-tunes` body into a validated `JobSpec` and a new job.

The hyperparameters, their defaults and bounds are the training config's (`train/config.py`),
read off the body by `train/wire.py`; this module adds what depends on the request's context:
where the weights start (a base model, a parent checkpoint, `from_hf_model`), the model's
limits, the files, and the defaults a model or parent decides (`max_seq_length`, a parent's
LoRA shape, `batch_size: "max"`). Every problem is collected and reported at once, as the hosted
service does: a user fixes their call in one round trip, not one field at a time."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse import jobs
from tunehouse.errors import InvalidInput, NotFound, TunehouseError
from tunehouse.files import FileService
from tunehouse.hub import check_push_target, resolve_hf_model
from tunehouse.ids import new_job_id
from tunehouse.job_spec import JobSpec, ParentRef
from tunehouse.models.registry import Registry
from tunehouse.store.tables import Checkpoint, File, Job
from tunehouse.train import wire
from tunehouse.train.batch_size import resolve_max
from tunehouse.train.config import CONFIGS, ConfigError, TrainConfig

SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,40}$")
# Request-level fields: not hyperparameters, but each one is acted on below.
REQUEST_PATHS = frozenset({"from_checkpoint", "from_hf_model", "hf_model_revision", "hf_api_token",
                           "hf_output_repo_name", "suffix", "multimodal_params.train_vision", "training_method.method"})
LORA_SHAPE = ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_trainable_modules")


@dataclass
class Parent:
    job: Job
    checkpoint: Checkpoint


@dataclass
class Start:
    """Where a job's weights come from, and the limits of that model."""

    model: str | None = None
    limits: dict = field(default_factory=dict)
    parent: Parent | None = None
    weights: str | None = None


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
    cps = [c for c in cps if (c.checkpoint_type == "Final" if step is None else c.step == step)]
    if not cps:
        steps = ", ".join(str(c.step) for c in jobs.checkpoints(s, job.id)) or "none yet"
        raise InvalidInput(f"from_checkpoint {ref!r}: job {job.id} has no such checkpoint (steps: {steps}).",
                           param="from_checkpoint")
    return Parent(job, cps[-1])


def create_job(s: Session, owner: str, body: dict, registry: Registry, files: FileService) -> Job:
    method, problems = _method(body)
    values, request, more = wire.from_request(body, method, REQUEST_PATHS)
    problems += more
    start = _start(s, owner, registry, values, request, problems)
    train = _owned_file(s, files, owner, values.get("training_file"), "training_file", method, problems)
    if values.get("validation_file"):
        _owned_file(s, files, owner, values["validation_file"], "validation_file", method, problems)
    values = _context_defaults(values, start, registry, s, method)
    cfg = _config(method, values, problems)
    problems += limit_problems(values, start.limits, method, train) + _request_problems(request, start)
    problems = list({path: (path, message) for path, message in reversed(problems)}.values())[::-1]
    if problems:
        raise InvalidInput("Invalid fine-tuning request: " + " ".join(m for _, m in problems),
                           param=problems[0][0], code="invalid_fine_tune_request")
    parent = start.parent
    spec = JobSpec(method=method, train=cfg, suffix=request.get("suffix"),
                   from_checkpoint=request.get("from_checkpoint"),
                   parent=(ParentRef.of(parent.job.id, parent.checkpoint, JobSpec.of(parent.job).train)
                           if parent else None),
                   from_hf_model=request.get("from_hf_model"), hf_model_revision=request.get("hf_model_revision"),
                   weights=start.weights, hf_api_token=request.get("hf_api_token"),
                   hf_output_repo_name=request.get("hf_output_repo_name"))
    return _insert(s, owner, spec, train, files.home.secret)


def _method(body: dict) -> tuple[str, list]:
    tm = body.get("training_method")
    method = (tm.get("method") if isinstance(tm, dict) else None) or "sft"
    if isinstance(method, str) and method.lower() in CONFIGS:
        return method.lower(), []
    return "sft", [("training_method.method", f"training_method.method must be 'sft' or 'dpo'; got {method!r}.")]


def _start(s: Session, owner: str, registry: Registry, values: dict, request: dict, problems: list) -> Start:
    """The base model and its limits, a parent checkpoint, and `from_hf_model`'s weights."""
    ref, hf = request.get("from_checkpoint"), request.get("from_hf_model")
    if ref and (values.get("model") or hf):
        problems.append(("from_checkpoint", "from_checkpoint continues a job from its own weights: give it "
                                            "without model and from_hf_model."))
        return Start()
    if not ref and not values.get("model"):
        problems.append(("model", "Give model (a base model: see `tunehouse models list`), or from_checkpoint "
                                  "to continue one of your jobs."))
        return Start()
    start = Start(model=values.get("model"))
    try:
        if ref:
            start.parent = resolve_parent(s, owner, ref)
            start.model = start.parent.job.model
        start.limits = registry.limits(start.model, s)
        if hf:
            start.weights = resolve_hf_model(registry, s, start.model, hf, request.get("hf_model_revision"),
                                             request.get("hf_api_token"))
    except TunehouseError as exc:
        problems.append((exc.param or "model", exc.message))
    values["model"] = start.model
    return start


def _owned_file(s: Session, files: FileService, owner: str, file_id: str | None, field_: str, method: str,
                problems: list) -> File | None:
    if not isinstance(file_id, str) or not file_id:
        return None  # the config reports the missing or mistyped id
    try:
        f = files.get(s, owner, file_id)
    except NotFound:
        problems.append((field_, f"{field_}: no file {file_id!r} (upload it first; ids look like file-…)."))
        return None
    if f.processing_status == "PENDING":
        files.validate(s, f)
    if f.processing_status != "COMPLETED":
        first = (f.validation_report or {}).get("error") or "it failed validation"
        problems.append((field_, f"{field_}: file {file_id} failed validation: {first} "
                                 f"(see `tunehouse files retrieve {file_id}`)."))
    elif f.purpose != "fine-tune":
        problems.append((field_, f"{field_}: file {file_id} has purpose {f.purpose!r}; upload it with purpose "
                                 "fine-tune."))
    elif method == "dpo" and f.dataset_format != "PREFERENCE":
        problems.append((field_, f"{field_}: DPO needs a preference dataset (input, preferred_output, "
                                 f"non_preferred_output) in JSONL; file {f.id} is {f.dataset_format or f.file_type}."))
    elif method == "sft" and f.dataset_format == "PREFERENCE":
        problems.append((field_, f"{field_}: file {f.id} holds preference pairs; train on it with "
                                 "training_method dpo."))
    return f


def _context_defaults(values: dict, start: Start, registry: Registry, s: Session, method: str) -> dict:
    """Defaults that the model or the parent decides; everything else defaults in the config."""
    out = dict(values)
    if start.parent and not any(k in values for k in LORA_SHAPE):  # continue in the parent's shape
        out |= _lora_shape(JobSpec.of(start.parent.job).train)
    seq_limit = start.limits.get(f"max_seq_length_{method}")
    if "max_seq_length" not in values and seq_limit:
        out["max_seq_length"] = min(_default("max_seq_length"), seq_limit)
    if out.get("batch_size", "max") == "max" and start.model and start.limits:  # no limits: unknown model
        lora = out.get("lora", True)
        bounds = start.limits["lora_training" if lora else "full_training"]
        known = {m.name for m in registry.list(s)}
        weights = registry.path(start.weights, s) if start.weights in known else start.weights
        folder = weights or (registry.path(start.model, s) if registry.is_materialised(start.model) else None)
        out["batch_size"] = resolve_max(folder, seq_len=out.get("max_seq_length", _default("max_seq_length")), lora=lora,
                                        max_batch=bounds["max_batch_size_dpo" if method == "dpo" else "max_batch_size"])
    return out


def _default(name: str):
    return TrainConfig.__dataclass_fields__[name].default


def _lora_shape(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in LORA_SHAPE}


def _config(method: str, values: dict, problems: list) -> TrainConfig | None:
    try:
        return CONFIGS[method](**values)
    except ConfigError as exc:
        paths = {f.name: wire.wire_path(f) for f in wire.hyperparameters(CONFIGS[method])}
        problems += [(paths.get(name, name), message + ".") for name, message in exc.problems]
    except TypeError:  # a required field missing: model / training_file
        for name in ("model", "training_file"):
            if name not in values and all(p != name for p, _ in problems):
                problems.append((name, f"{name} is required."))
    return None


def limit_problems(values: dict, limits: dict, method: str, train: File | None) -> list[tuple[str, str]]:
    """The model's limits (`/v1/fine-tunes/models/limits`) against the request's values (config
    defaults filled in); a value the config already refuses is not judged again."""
    if not limits:
        return []
    fields = {f.name: f for f in wire.hyperparameters(CONFIGS[method])}
    v = {n: f.default for n, f in fields.items() if f.default is not dataclasses.MISSING} | values
    lora, model = v["lora"] is not False, limits["model_name"]
    bounds = limits["lora_training" if lora else "full_training"]
    max_batch = bounds["max_batch_size_dpo" if method == "dpo" else "max_batch_size"]
    seq_limit = limits[f"max_seq_length_{method}"]
    checks = [
        ("batch_size", lambda x: bounds["min_batch_size"] <= x <= max_batch,
         f"between {bounds['min_batch_size']} and {max_batch}{' for DPO' if method == 'dpo' else ''}"),
        ("n_epochs", lambda x: x <= limits["max_num_epochs"], f"≤ {limits['max_num_epochs']}"),
        ("n_evals", lambda x: x <= limits["max_num_evals"], f"≤ {limits['max_num_evals']}"),
        ("n_checkpoints", lambda x: x <= limits["max_num_checkpoints"], f"≤ {limits['max_num_checkpoints']}"),
        ("learning_rate", lambda x: limits["min_learning_rate"] <= x <= limits["max_learning_rate"],
         f"in [{limits['min_learning_rate']}, {limits['max_learning_rate']}]"),
        ("max_seq_length", lambda x: limits["min_max_seq_length"] <= x <= seq_limit,
         f"between {limits['min_max_seq_length']} and {seq_limit} for {model}"),
    ]
    if lora:
        targets = bounds["target_modules"]
        mods = v["lora_trainable_modules"]
        unknown = [m for m in mods.split(",") if m not in targets + ["all-linear"]] if isinstance(mods, str) else []
        checks += [("lora_r", lambda x: x <= bounds["max_rank"], f"≤ {bounds['max_rank']} for {model}"),
                   ("lora_trainable_modules", lambda x: not unknown,
                    f"\"all-linear\" or names from {', '.join(targets)} (unknown: {', '.join(unknown)})")]
    out = []
    for name, ok, bound in checks:
        if name == "batch_size" and v[name] == "max" or fields[name].metadata["check"](v[name]) is not None:
            continue
        if not ok(v[name]):
            out.append((wire.wire_path(fields[name]), f"{name} must be {bound}; got {v[name]!r}."))
    report = (train.validation_report or {}) if train is not None else {}
    if report.get("dataset_is_multimodal") and not limits["supports_vision"]:
        out.append(("training_file", f"training_file must be text only: {model} has no vision support, and file "
                                     f"{train.id} has images."))
    if report.get("dataset_has_tools") and not limits.get("supports_tools", False):
        out.append(("training_file", f"training_file must be without tools: {model} cannot be trained on tool "
                                     "calls."))
    return out


def _request_problems(request: dict, start: Start) -> list[tuple[str, str]]:
    out = []
    suffix = request.get("suffix")
    if suffix is not None and not (isinstance(suffix, str) and SUFFIX_RE.match(suffix)):
        out.append(("suffix", f"suffix must be 1-40 letters, digits, '.', '_' or '-'; got {suffix!r}."))
    if request.get("multimodal_params.train_vision") and not start.limits.get("supports_vision"):
        out.append(("multimodal_params.train_vision", f"{start.model} has no vision support "
                                                      "(supports_vision is false): remove train_vision."))
    if request.get("hf_model_revision") and not request.get("from_hf_model"):
        out.append(("hf_model_revision", "hf_model_revision applies to from_hf_model; give both or neither."))
    if request.get("hf_output_repo_name"):
        try:
            check_push_target(request["hf_output_repo_name"], request.get("hf_api_token"))
        except TunehouseError as exc:
            out.append(("hf_output_repo_name", exc.message))
    return out


def _insert(s: Session, owner: str, spec: JobSpec, train: File, secret: bytes) -> Job:
    cfg, job_id = spec.train, new_job_id()
    suffix = f"-{spec.suffix}" if spec.suffix else ""
    job = Job(id=job_id, owner=owner, status="pending", method=spec.method, model=cfg.model,
              training_file=cfg.training_file, validation_file=cfg.validation_file,
              from_checkpoint=spec.from_checkpoint, config=spec.to_json(secret),
              model_output_name=f"{owner}/{cfg.model.rsplit('/', 1)[-1]}{suffix}-{job_id[3:11]}",
              progress={"token_count": 0, "train_lines": train.num_samples})
    s.add(job)
    s.flush()
    jobs.add_event(s, job.id, "JOB_PENDING", "Fine tune request created")
    beta = getattr(cfg, "dpo_beta", None)
    if beta is not None and not cfg.dpo_reference_free and not 0.05 <= beta <= 0.9:
        jobs.add_event(s, job.id, "WARNING", f"dpo_beta {beta} is outside the usual 0.05-0.9: the policy may drift "
                       "far from the reference (small beta) or barely move (large beta).", level="warning")
    jobs.set_status(job, "queued")
    return job
