"""Which models a caller can run, and where their weights are: every base model in the registry,
and each of the caller's completed fine-tuning jobs by its `model_output_name`.

- A LoRA job trained directly on a registry base is served as that base + its adapter (the base
  is loaded once and shared), or, with `serve_lora=merged`, from its `merged/` folder as a model of
  its own (about the base's decoding speed, at the cost of one more copy of the weights per fine-tune
  loaded). A LoRA job that started from a parent checkpoint was trained on weights that are not the
  registry base, so its `merged/` folder is always served as a model of its own; so is a full
  fine-tune's final folder.
- Another owner's model looks exactly like an unknown one (404), so names do not leak.

Weights are read from this machine's local copy of the blob store (`local_dir`: the blobs
themselves on the local backend, a cached copy on S3), fetched on first use; the ModelRef names
the job's store folder so the engine can forget it when the job is deleted.
"""

from __future__ import annotations

from datetime import timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse import jobs
from tunehouse.downloads import MERGED_DIR
from tunehouse.job_spec import JobSpec
from tunehouse.errors import InvalidInput, NotFound
from tunehouse.models.registry import Registry
from tunehouse.serve.engine import ModelRef
from tunehouse.store.home import Home
from tunehouse.store.tables import Job

FREE = {"input": 0.0, "output": 0.0, "hourly": 0.0, "base": 0.0, "finetune": 0.0}


def _unknown(name: str) -> NotFound:
    return NotFound(f"The model {name!r} does not exist. List the models you can use with GET /v1/models "
                    "(`tunehouse models list`); fine-tuned models are named by their job's model_output_name.",
                    param="model", code="model_not_found")


def resolve(s: Session, home: Home, registry: Registry, owner: str, name: str) -> ModelRef:
    """The weights (and adapter) behind `name` for `owner`, as the home's `serve_lora` setting serves
    LoRA fine-tunes, or a NotFound / InvalidInput that says why."""
    bases = {m.name: m for m in registry.list(s)}
    if name in bases:
        return ModelRef(name, name, Path(registry.path(name, s)), bases[name].context_length)
    job = s.scalar(select(Job).where(Job.model_output_name == name))
    if job is None or job.owner != owner:
        raise _unknown(name)
    if job.status != "completed":
        raise InvalidInput(f"The model {name!r} is not ready: its fine-tuning job {job.id} is {job.status}. "
                           "It can be used once the job has completed.", param="model", code="model_not_ready")
    final = [c for c in jobs.checkpoints(s, job.id) if c.checkpoint_type == "Final"]
    if not final:
        raise _unknown(name)
    base = bases.get(job.model) or registry.get(job.model, s)
    spec = JobSpec.of(job)
    lora = spec.lora
    on_base = lora and not spec.parent and not spec.weights  # trained on the registry's base itself
    shared = on_base and home.settings.serve_lora == "adapter"  # base + adapter, else weights of its own
    # only what is served is fetched: a full fine-tune's folder, a LoRA job's merged/ (its adapter
    # when it is served on the shared base: the final folder, merged/ included)
    key = final[0].blob_key if shared or not lora else f"{final[0].blob_key}/{MERGED_DIR}"
    try:
        folder = home.blobs.local_dir(key)
    except FileNotFoundError:
        raise _unknown(name) from None
    source = f"jobs/{job.id}"
    if shared:
        return ModelRef(name, base.name, Path(registry.path(base.name, s)), base.context_length, adapter_path=folder,
                        source=source)
    return ModelRef(name, name, folder, base.context_length, source=source)


def resolve_for(home: Home, registry: Registry, owner: str, name: str) -> ModelRef:
    """`resolve` in its own session (the routes call it in a worker thread: the first use of the
    default model converts it)."""
    with home.db.session() as s:
        return resolve(s, home, registry, owner, name)


def list_models(s: Session, registry: Registry, owner: str) -> list[dict]:
    """Model objects for `/v1/models`: fields both the openai SDK (`owned_by`, `created`) and the
    together 1.x SDK (`pricing`, `type`, `context_length`) read."""
    bases = registry.list(s)
    context = {m.name: m.context_length for m in bases}
    return ([_model_object(m.name, "tunehouse", 0, m.context_length) for m in bases]
            + [_fine_tuned_object(job, context.get(job.model)) for job in jobs.list_owned(s, owner)
               if job.status == "completed" and job.model_output_name])


def model_object(s: Session, registry: Registry, owner: str, name: str) -> dict:
    """One item of `list_models` by name; anything the owner would not see listed is a 404."""
    for m in registry.list(s):
        if m.name == name:
            return _model_object(m.name, "tunehouse", 0, m.context_length)
    job = s.scalar(select(Job).where(Job.model_output_name == name))
    if job is None or job.owner != owner or job.status != "completed":
        raise _unknown(name)
    base = next((m for m in registry.list(s) if m.name == job.model), None)
    return _fine_tuned_object(job, base.context_length if base else None)


def _fine_tuned_object(job: Job, context_length: int | None) -> dict:
    created = int(job.created_at.replace(tzinfo=timezone.utc).timestamp()) if job.created_at else 0
    return _model_object(job.model_output_name, job.owner, created, context_length)


def _model_object(name: str, owner: str, created: int, context_length: int | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": owner, "type": "chat",
            "display_name": name, "organization": owner, "context_length": context_length, "pricing": FREE}
