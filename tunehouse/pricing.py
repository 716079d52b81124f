"""`estimate-price`: a self-hosted run costs nothing, but the token counts are real — the
training and validation files are tokenized with the model's own tokenizer (once per file and
model; the count is cached on the file)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from tunehouse.api.schemas import PriceEstimate
from tunehouse.errors import TunehouseError
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
    s.flush()
    return total


def estimate(s: Session, owner: str, body: PriceEstimate, files: FileService, registry: Registry) -> dict:
    answer = {"estimation_available": True, "estimated_total_price": 0.0, "allowed_to_proceed": True,
              "user_limit": 0.0, "estimated_train_token_count": 0, "estimated_eval_token_count": 0}
    try:
        model = body.model or (resolve_parent(s, owner, body.from_checkpoint).job.model
                               if body.from_checkpoint else None)
        if not model or not body.training_file:
            return answer
        registry.get(model, s)
        train = files.get(s, owner, body.training_file)
        answer["estimated_train_token_count"] = count_tokens(s, files, registry, train, model) * max(body.n_epochs, 1)
        if body.validation_file:
            val = files.get(s, owner, body.validation_file)
            answer["estimated_eval_token_count"] = count_tokens(s, files, registry, val, model) * max(body.n_evals, 0)
    except TunehouseError:
        # The create call reports the precise problem; the estimate only says it cannot vouch.
        answer["allowed_to_proceed"] = False
    except (ValueError, KeyError, TypeError):
        answer["allowed_to_proceed"] = False  # a file the validator refused: create explains why
    return answer
