"""/evaluations routes: post a `tunehouse eval` result, list, retrieve and delete them (owner-scoped)."""

from __future__ import annotations

from pathlib import PurePath

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from tunehouse.api.deps import CurrentCaller, SessionDep
from tunehouse.api.schemas import iso
from tunehouse.evaluate import records

router = APIRouter(prefix="/v1", tags=["evaluations"])
Score = Field(None, ge=0, le=1e12)


class ModelResult(BaseModel):
    """One model's row of `tunehouse eval` (evaluate/compare.py `_result`)."""

    model_config = ConfigDict(extra="ignore")
    label: str = Field(max_length=512)
    model: str = Field(max_length=512)
    exact_match: float = Field(ge=0, le=1)
    f1: float = Field(ge=0, le=1)
    n_turns: int = Field(ge=0, le=2**31 - 1)
    valid_loss: float | None = Score
    perplexity: float | None = Score
    seconds: float | None = Score


class EvaluationCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `turns` (every answer) stays with the client's eval.json
    file: str = Field(max_length=4096)
    max_tokens: int = Field(ge=0, le=2**31 - 1)
    models: list[ModelResult] = Field(min_length=1, max_length=64)


def evaluation_object(row) -> dict:
    return {"id": row.id, "object": "evaluation", "file": row.file, "max_tokens": row.max_tokens,
            "models": row.models, "created_at": iso(row.created_at)}


@router.post("/evaluations")
def create(body: EvaluationCreate, caller: CurrentCaller, session: SessionDep):
    # Only the file's name: the client's folders are none of the server's business.
    row = records.create(session, caller.owner, file=PurePath(body.file).name[:512], max_tokens=body.max_tokens,
                         models=[m.model_dump() for m in body.models])
    return evaluation_object(row)


@router.get("/evaluations")
def list_evaluations(caller: CurrentCaller, session: SessionDep):
    return {"object": "list", "data": [evaluation_object(r) for r in records.list_owned(session, caller.owner)]}


@router.get("/evaluations/{eval_id}")
def retrieve(eval_id: str, caller: CurrentCaller, session: SessionDep):
    return evaluation_object(records.get_owned(session, caller.owner, eval_id))


@router.delete("/evaluations/{eval_id}", status_code=204)
def delete(eval_id: str, caller: CurrentCaller, session: SessionDep):
    session.delete(records.get_owned(session, caller.owner, eval_id))
    return Response(status_code=204)
