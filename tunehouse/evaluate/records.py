"""Stored evaluation results (`/v1/evaluations`): what `tunehouse eval` posts, listed per owner."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse.errors import NotFound
from tunehouse.ids import new_eval_id
from tunehouse.store.tables import Evaluation


def create(session: Session, owner: str, *, file: str, max_tokens: int, models: list[dict]) -> Evaluation:
    row = Evaluation(id=new_eval_id(), owner=owner, file=file, max_tokens=max_tokens, models=models)
    session.add(row)
    session.flush()
    return row


def list_owned(session: Session, owner: str) -> list[Evaluation]:
    q = select(Evaluation).where(Evaluation.owner == owner).order_by(Evaluation.created_at.desc())
    return list(session.scalars(q))


def get_owned(session: Session, owner: str, eval_id: str) -> Evaluation:
    row = session.get(Evaluation, eval_id)
    if row is None or row.owner != owner:
        raise NotFound(f"No evaluation {eval_id!r} of yours.", param="eval_id")
    return row
