"""`estimate-price`: a self-hosted run costs nothing, but the token counts are real — the
training and validation files are tokenized with the model's own tokenizer (once per file and
model; the count is cached on the file)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from tunehouse.api.schemas import PriceEstimate
from tunehouse.errors import TunehouseError, redact_paths
from tunehouse.files import FileService
from tunehouse.job_requests import resolve_parent
from tunehouse.models.registry import Registry
from tunehouse.store.tables import File


def count_tokens(s: Session, files: FileService, registry: Registry, f: File, model: str) -> int:
    cached = (f.token_counts or {}).get(model)
    if cached is not None:
        return cached
    from transformers import AutoTokenizer

    from tunehouse.data.tokenize import tokenize_row
    from tunehouse.train.sft import read_rows

    tokenizer = AutoTokenizer.from_pretrained(registry.path(model, s))
    total = 0
    for row in read_rows(files.content_path(f)):
        if "input" in row and "preferred_output" in row:  # preference pair: prompt + both answers
            for side in ("preferred_output", "non_preferred_output"):
                msgs = row["input"]["messages"] + row[side]
                total += len(tokenize_row({"messages": msgs, "tools": row["input"].get("tools")}, tokenizer,
                                          train_on_inputs=True,
                                          max_seq_length=1 << 30).input_ids)
        else:
            total += len(tokenize_row(row, tokenizer, train_on_inputs=True, max_seq_length=1 << 30).input_ids)
    f.token_counts = {**(f.token_counts or {}), model: total}
    s.commit()  # now: the next file's tokenizing (seconds) must not run inside this write transaction
    return total


class Unavailable(Exception):
    """Why no estimate can be given: `reason` is one of the v3 `unavailable_reason` values, or None
    when none fits (the v3 CLI then prints its generic line); `message` says what to change."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.message, self.reason = message, reason


def estimate(s: Session, owner: str, body: PriceEstimate, files: FileService, registry: Registry) -> dict:
    """The estimate-price answer (api-reference §5.4). Running here costs nothing and there are no
    credits, so `allowed_to_proceed` is always true: false makes both SDK lines print an
    "insufficient funds" warning. A failed estimate is `estimation_available: false` with v3's
    `unavailable_reason` where one fits and a `message` saying why; it keeps the five numeric fields
    the 1.x SDK requires (zeros), so both lines parse it."""
    answer = {"estimation_available": True, "estimated_total_price": 0.0, "allowed_to_proceed": True,
              "user_limit": 0.0, "estimated_train_token_count": 0, "estimated_eval_token_count": 0}
    try:
        train, val = _count(s, owner, body, files, registry)
    except Unavailable as why:
        return answer | {"estimation_available": False, "unavailable_reason": why.reason, "message": why.message}
    return answer | {"estimated_train_token_count": train, "estimated_eval_token_count": val}


def _count(s: Session, owner: str, body: PriceEstimate, files: FileService, registry: Registry) -> tuple[int, int]:
    """(training tokens over all epochs, validation tokens over all evaluations)."""
    try:
        model = body.model or (resolve_parent(s, owner, body.from_checkpoint).job.model
                               if body.from_checkpoint else None)
        if not model:
            raise Unavailable("Give `model` (or `from_checkpoint`) to estimate the job's token count.")
        if not body.training_file:
            raise Unavailable("Give `training_file` to estimate the job's token count.")
        registry.get(model, s)
        train = _validated(s, owner, files, body.training_file, "train")
        val = _validated(s, owner, files, body.validation_file, "eval") if body.validation_file else None
    except TunehouseError as exc:  # unknown model, file or checkpoint: the create call refuses it the same way
        raise Unavailable(exc.message) from None
    try:
        n_train = count_tokens(s, files, registry, train, model) * max(body.n_epochs, 1)
        n_val = count_tokens(s, files, registry, val, model) * max(body.n_evals, 0) if val is not None else 0
    except (ValueError, KeyError, TypeError) as exc:  # rows the validator passed but the tokenizer cannot take
        raise Unavailable(f"The files could not be tokenized for {model}: {redact_paths(str(exc))}") from None
    return n_train, n_val


def _validated(s: Session, owner: str, files: FileService, file_id: str, role: str) -> File:
    f = files.get(s, owner, file_id)
    if f.processing_status == "FAILED":
        error = (f.validation_report or {}).get("error") or "it failed validation"
        raise Unavailable(f"File {f.id} is invalid: {error}", f"{role}_file_invalid")
    if f.processing_status != "COMPLETED":
        raise Unavailable(f"File {f.id} has not been validated yet (POST /v1/files/{f.id}/preprocess).",
                          f"{role}_file_not_validated")
    return f
