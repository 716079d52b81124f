"""/endpoints and /hardware routes (dedicated endpoints, the together 1.x shapes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from tunehouse.api.deps import CurrentCaller, SessionDep
from tunehouse.serve import endpoints as eps
from tunehouse.serve.hardware import hardware_options, training_hardware

router = APIRouter(prefix="/v1", tags=["endpoints"])


class Autoscaling(BaseModel):
    min_replicas: int = Field(1, ge=0, le=2**31 - 1)
    max_replicas: int = Field(1, ge=1, le=2**31 - 1)


# Lengths are the columns' (PostgreSQL refuses longer values with an error, not a 400).
class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=512)
    hardware: str = Field(max_length=128)
    autoscaling: Autoscaling = Autoscaling()
    state: str = "STARTED"
    display_name: str | None = Field(None, max_length=256)
    inactive_timeout: int | None = Field(None, ge=0, le=2**31 - 1,
                                         description="Minutes without requests before it stops; 0 = never.")
    availability_zone: str | None = None


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    autoscaling: Autoscaling | None = None
    state: str | None = None
    display_name: str | None = Field(None, max_length=256)
    inactive_timeout: int | None = Field(None, ge=0, le=2**31 - 1)


@router.get("/hardware")
def hardware(request: Request, _caller: CurrentCaller, model: str | None = None):
    """`model` narrows nothing: each option is one whole device, which loads any model served here.
    `training` is what this server's worker trains a job on (GPUs, processes)."""
    return {"object": "list", "data": hardware_options(), "training": training_hardware(request.app.state.home.settings)}


@router.get("/clusters/availability-zones")
def zones(_caller: CurrentCaller):
    return {"avzones": list(eps.ZONES)}


@router.post("/endpoints")
def create(body: EndpointCreate, caller: CurrentCaller, session: SessionDep, request: Request):
    ep = eps.create(session, caller.owner, model=body.model, hardware=body.hardware,
                    min_replicas=body.autoscaling.min_replicas, max_replicas=body.autoscaling.max_replicas,
                    state=body.state, display_name=body.display_name, inactive_timeout=body.inactive_timeout,
                    availability_zone=body.availability_zone)
    # The model's 404/400 now, not later; after the cheap checks, as it may build or convert weights.
    request.app.state.resolve_model_dir(session, caller.owner, body.model)
    request.app.state.supervisor_wake()
    return eps.endpoint_object(ep)


@router.get("/endpoints")
def list_endpoints(caller: CurrentCaller, session: SessionDep, type: str | None = None, mine: bool | None = None):
    items = [] if type == "serverless" else eps.list_owned(session, caller.owner)
    return {"object": "list", "data": [eps.endpoint_object(ep) for ep in items]}


@router.get("/endpoints/{ep_id}")
def get(ep_id: str, caller: CurrentCaller, session: SessionDep):
    return eps.endpoint_object(eps.get_owned(session, caller.owner, ep_id))


@router.patch("/endpoints/{ep_id}")
def update(ep_id: str, body: EndpointUpdate, caller: CurrentCaller, session: SessionDep, request: Request):
    ep = eps.update(session, eps.get_owned(session, caller.owner, ep_id), state=body.state,
                    min_replicas=body.autoscaling.min_replicas if body.autoscaling else None,
                    max_replicas=body.autoscaling.max_replicas if body.autoscaling else None,
                    display_name=body.display_name, inactive_timeout=body.inactive_timeout)
    request.app.state.supervisor_wake()
    return eps.endpoint_object(ep)


@router.delete("/endpoints/{ep_id}", status_code=204)
def delete(ep_id: str, caller: CurrentCaller, session: SessionDep, request: Request):
    session.delete(eps.get_owned(session, caller.owner, ep_id))
    request.app.state.supervisor_wake()
    return Response(status_code=204)  # v1 parses any body as JSON: 204 with none
