"""Mint and recognise ids: files `file-<uuid4>`, jobs `ft-<uuid4>`, evaluations `eval-<uuid4>`."""

from __future__ import annotations

import re
import uuid

FILE_ID_RE = re.compile(r"^file-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")
JOB_ID_RE = re.compile(r"^ft-[0-9a-f-]+$")


def new_file_id() -> str:
    return f"file-{uuid.uuid4()}"


def new_job_id() -> str:
    return f"ft-{uuid.uuid4()}"


def new_eval_id() -> str:
    return f"eval-{uuid.uuid4()}"
