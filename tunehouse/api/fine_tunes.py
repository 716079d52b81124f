"""/fine-tunes routes (and /finetune/download): parse, authorise, call the job services, shape."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Body, Query, Request, Response

from tunehouse import jobs
from tunehouse.api.deps import CurrentCaller, FilesDep, HomeDep, RegistryDep, SessionDep
from tunehouse.api.schemas import PriceEstimate, checkpoint_object, event_object, job_object
from tunehouse.errors import InvalidInput, NotFound
from tunehouse.downloads import build_archive, serve_range
from tunehouse.export.bundle import build_gguf_download
from tunehouse.job_requests import create_job, parse_checkpoint_ref, resolve_parent
from tunehouse.pricing import estimate

router = APIRouter(prefix="/v1", tags=["fine-tuning"])
# Steps are compared in SQL: a bound past int64 is an overflow in the driver, not an empty answer.
StepQuery = Annotated[int | None, Query(ge=0, le=2**63 - 1)]


@router.get("/fine-tunes/models/limits")
def model_limits(model_name: str, caller: CurrentCaller, session: SessionDep, registry: RegistryDep, home: HomeDep):
    """A base model's limits, and the worker's `training_hardware`; for `from_checkpoint` jobs the
    SDKs send the job id or output name."""
    from tunehouse.serve.hardware import training_hardware

    try:
        limits = registry.limits(model_name, session)
    except NotFound as unknown:
        try:
            parent = resolve_parent(session, caller.owner, model_name)
        except NotFound:
            raise unknown from None  # neither a model nor one of the caller's jobs: say how to add a model
        limits = registry.limits(parent.job.model, session)
    return {**limits, "training_hardware": training_hardware(home.settings)}


@router.get("/fine-tunes/models/supported")
def supported_models(_caller: CurrentCaller, registry: RegistryDep):
    return {"models": [m.name for m in registry.list()]}


@router.post("/fine-tunes/estimate-price")
def estimate_price(body: PriceEstimate, caller: CurrentCaller, session: SessionDep, files: FilesDep,
                   registry: RegistryDep):
    return estimate(session, caller.owner, body, files, registry)


@router.post("/fine-tunes")
def create(body: Annotated[dict, Body(description="The together SDK's fine-tuning create body; its fields "
                                            "are the training config's (`tunehouse fine-tuning create --help`).")],
           caller: CurrentCaller, session: SessionDep, files: FilesDep,
           registry: RegistryDep, request: Request):
    job = create_job(session, caller.owner, body, registry, files)
    request.app.state.wake_worker()
    return job_object(job, queue_depth=jobs.queue_position(session, job))


@router.get("/fine-tunes")
def list_jobs(caller: CurrentCaller, session: SessionDep):
    return {"object": "list", "data": [job_object(j) for j in jobs.list_owned(session, caller.owner)]}


@router.get("/fine-tunes/{job_id}")
def retrieve(job_id: str, caller: CurrentCaller, session: SessionDep):
    job = jobs.get_owned(session, caller.owner, job_id)
    return job_object(job, jobs.events(session, job.id), jobs.queue_position(session, job))


@router.post("/fine-tunes/{job_id}/cancel")
def cancel(job_id: str, caller: CurrentCaller, session: SessionDep):
    job = jobs.request_cancel(session, jobs.get_owned(session, caller.owner, job_id))
    return job_object(job)


@router.delete("/fine-tunes/{job_id}")
def delete(job_id: str, caller: CurrentCaller, session: SessionDep, home: HomeDep, request: Request,
           force: bool = False):
    job = jobs.get_owned(session, caller.owner, job_id)
    jobs.delete_job(session, job)
    request.app.state.engine.forget(f"jobs/{job_id}")  # its model is gone from inference too
    home.blobs.delete(f"jobs/{job_id}")  # every object under jobs/<id>/
    return {"id": job_id, "object": "fine-tune", "deleted": True, "message": f"Job {job_id} deleted"}


@router.get("/fine-tunes/{job_id}/events")
def list_events(job_id: str, caller: CurrentCaller, session: SessionDep):
    job = jobs.get_owned(session, caller.owner, job_id)
    return {"object": "list", "data": [event_object(e) for e in jobs.events(session, job.id)]}


@router.get("/fine-tunes/{job_id}/checkpoints")
def list_checkpoints(job_id: str, caller: CurrentCaller, session: SessionDep):
    job = jobs.get_owned(session, caller.owner, job_id)
    cps = sorted(jobs.checkpoints(session, job.id), key=lambda c: -c.step)
    return {"object": "list", "data": [checkpoint_object(job, c) for c in cps]}


@router.get("/fine-tunes/{job_id}/metrics")
def list_metrics(job_id: str, caller: CurrentCaller, session: SessionDep, global_step_from: StepQuery = None,
                 global_step_to: StepQuery = None, logged_at_from: datetime | None = None,
                 logged_at_to: datetime | None = None, resolution: int | None = Query(None, ge=1)):
    """Rows for optimizer steps and logging times in the inclusive bounds given (ISO-8601 times,
    as the v3 SDK sends them), thinned to at most `resolution` rows."""
    job = jobs.get_owned(session, caller.owner, job_id)
    rows = jobs.metrics(session, job.id, global_step_from, global_step_to, logged_at_from, logged_at_to)
    body = {"metrics": [{"train/global_step": m.step, **m.values} for m in jobs.thin(rows, resolution)]}
    # orjson straight to bytes: FastAPI's encoder took ~400 ms for a 10,000-row job (the dashboard's curves).
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/finetune/download")
def download(ft_id: str, caller: CurrentCaller, session: SessionDep, home: HomeDep, request: Request,
             checkpoint: str | None = None, checkpoint_step: StepQuery = None,
             gguf_type: Annotated[str | None, Query(description="f16 (default), f32, bf16 or q8_0; with checkpoint=gguf")
                                  ] = None):
    """The weights as a zstd tar, or with checkpoint=gguf a tar of GGUF file(s) and an Ollama Modelfile."""
    key, step = parse_checkpoint_ref(ft_id)
    job = jobs.get_owned(session, caller.owner, key)
    if (checkpoint or "").lower() == "gguf":
        archive, name = build_gguf_download(session, home, job, gguf_type, checkpoint_step or step)
    elif gguf_type:
        raise InvalidInput("gguf_type goes with checkpoint=gguf.", param="gguf_type")
    else:
        archive, _ = build_archive(session, home, job, checkpoint, checkpoint_step or step)
        name = f"{job.model_output_name.replace('/', '--')}.tar.zst"
    return serve_range(home.blobs, archive, request.headers.get("range"), name)
