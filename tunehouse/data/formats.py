"""Detect and validate dataset formats while streaming; every problem names line, field and rule.

One validator serves `tunehouse files check PATH` and the server's upload preprocess step:

    report = check_file("train.jsonl", "fine-tune", progress=lambda done, total: ...)
    report.passed, report.problems[0].message     # "line 7, messages[1].content: expected ..."
    report.to_sdk_dict()                          # together `check_file` keys (api-reference §6.1)
    report.to_validation_report(file_id)          # the file object's validation_report (§4.3)

The rules are listed in `RULES`; the row rules live in `rules.py` and `messages.py` (the fast path
of plain rows in `acceptor.py`), the JSONL scan in `jsonl.py` and `workers.py`, Parquet and CSV in
`tabular.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tunehouse.data import jsonl
from tunehouse.data.report import FLAGS, RULES, CheckReport, Problem, make_problem
from tunehouse.data.rules import (
    CONVERSATION, CSV, DATASET_FORMATS, GENERAL, INSTRUCTION, PREFERENCE, TOKENIZED, detect_format,
)
from tunehouse.data.tabular import check_csv, check_parquet
from tunehouse.data.workers import check_blocks

__all__ = [
    "CONVERSATION", "CSV", "DATASET_FORMATS", "FLAGS", "GENERAL", "INSTRUCTION", "PREFERENCE",
    "PURPOSES", "RULES", "TOKENIZED", "CheckReport", "Problem", "check_file", "detect_format",
]

PURPOSES = ("fine-tune", "eval", "batch-api")
MAX_FILE_BYTES = int(50.1 * 2**30)  # the SDKs' limit (api-reference §6.1)
FILETYPES = {".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def check_file(path: str | Path, purpose: str = "fine-tune", *,
               progress: Callable[[int, int], None] | None = None, max_errors: int = 100,
               workers: int | None = None) -> CheckReport:
    """Checks a dataset file for `purpose`, reporting up to `max_errors` problems in file order.

    progress(bytes_done, bytes_total) is called every few MB. `workers` is the number of
    processes for a large JSONL file (default: up to 4 of the available CPUs; 1 = this process).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    if max_errors < 1:
        raise ValueError(f"max_errors must be at least 1, got {max_errors}")
    report = CheckReport(path=str(path), purpose=purpose)
    problems = _check_file(Path(path), report, max_errors + 1, progress, workers)
    report.problems = problems[:max_errors]
    report.errors_truncated = len(problems) > max_errors
    return report


def _check_file(path: Path, report: CheckReport, keep: int, progress, workers) -> list[Problem]:
    def whole(rule: str, detail: str) -> list[Problem]:
        return [make_problem(None, None, rule, detail)]

    if not path.is_file():
        return whole("not_found", f"{path} is not an existing file; check the path.")
    report.found = True
    size = report.file_size = path.stat().st_size
    if size == 0:
        return whole("empty_file", "the file is empty; add at least one sample.")
    if size > MAX_FILE_BYTES:
        return whole("file_too_large", f"the file is {size / 2**30:.1f} GiB; the limit is 50.1 GiB. "
                     "Split it into several files.")
    report.filetype = FILETYPES.get(path.suffix.lower())
    purpose = report.purpose
    if report.filetype is None:
        return whole("bad_extension", f"the extension {path.suffix or '(none)'!r} is not supported; "
                     "use .jsonl (or .parquet for tokenised data, .csv for evaluation).")
    if report.filetype == "csv" and purpose != "eval":
        return whole("unsupported_purpose", f"CSV files are accepted only for purpose eval, not "
                     f"{purpose}; convert the file to JSONL.")
    if report.filetype == "parquet" and purpose == "eval":
        return whole("unsupported_purpose", "Parquet files are not accepted for purpose eval; use "
                     "JSONL or CSV.")

    if report.filetype == "parquet":
        problems, report.num_samples = check_parquet(str(path), size, keep, progress)
        report.num_lines = report.num_samples
        report.dataset_format = TOKENIZED if report.num_samples else None
        return problems
    if report.filetype == "csv":
        problems, report.num_samples, report.num_lines = check_csv(str(path), size, keep, progress)
        report.dataset_format = CSV
        return problems

    merged = check_blocks(jsonl.Job(str(path), size, purpose, keep, jsonl.BLOCK), progress, workers)
    report.num_lines, report.num_samples = merged.lines, merged.samples
    report.dataset_format = merged.first[0] if merged.first else None
    report.flags = merged.flags
    if merged.samples == 0:  # nothing but blank lines: one problem, not one per line
        return whole("empty_file", "the file holds only blank lines; add at least one sample.")
    return merged.problems
