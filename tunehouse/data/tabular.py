"""Checks of tokenised Parquet files (fine-tuning) and CSV files (evaluation), both streamed:
Parquet in record batches through pyarrow, CSV row by row through the csv module."""

from __future__ import annotations

import csv
from typing import Callable

from tunehouse.data.report import Problem, make_problem

TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels", "position_ids")
PARQUET_BATCH_ROWS = 8192  # a batch of long sequences stays in the tens of MB
CSV_PROGRESS_ROWS = 50_000

Progress = Callable[[int, int], None] | None


def check_parquet(path: str, size: int, keep: int, progress: Progress) -> tuple[list[Problem], int]:
    """Returns (problems, rows). Columns ⊆ TOKEN_COLUMNS with input_ids, each a list of integers;
    per row: no nulls, equal lengths across columns, attention_mask in {0, 1}, token ids ≥ 0."""
    import pyarrow as pa  # optional weight for JSONL-only callers
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        return [make_problem(None, None, "not_parquet", f"the file does not read as Parquet ({e}); "
                             "write it with pyarrow or pandas to_parquet().")], 0
    problems = []
    schema = pf.schema_arrow
    for name in schema.names:
        if name not in TOKEN_COLUMNS:
            problems.append(make_problem(None, name, "extra_column", f"unexpected column; remove it "
                                         f"(allowed: {', '.join(TOKEN_COLUMNS)})."))
    if "input_ids" not in schema.names:
        problems.append(make_problem(None, "input_ids", "missing_column", "the file has no input_ids "
                                     "column; add the token ids of each sample."))
    columns = [n for n in schema.names if n in TOKEN_COLUMNS]
    for name in columns:
        kind = schema.field(name).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
            problems.append(make_problem(None, name, "wrong_type", f"expected a list of integers per "
                                         f"row, found the type {kind}."))
    if problems:
        return problems, 0

    total = max(pf.metadata.num_rows, 1)
    rows = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            problems += _check_batch(batch, rows, pc)
            rows += batch.num_rows
            if progress:
                progress(size * rows // total, size)
            if len(problems) >= keep:
                break  # later rows can only add problems past the cap
    except (pa.ArrowException, OSError) as e:
        problems.append(make_problem(rows + 1, None, "not_parquet", f"the data stops reading as "
                                     f"Parquet here ({e}); write the file again."))
    if rows == 0 and not problems:
        problems.append(make_problem(None, None, "min_samples", "the file has no rows; add at least "
                                     "one tokenised sample."))
    return sorted(problems, key=lambda p: (p.line or 0))[:keep], rows


def _check_batch(batch, offset: int, pc) -> list[Problem]:
    problems: list[Problem] = []

    def report(mask, name: str, rule: str, detail: str, parents=None) -> None:
        hits = pc.indices_nonzero(pc.fill_null(mask, False))
        if parents is not None:  # mask over the flattened values: map hits back to their rows
            hits = pc.unique(pc.take(parents, hits))
        problems.extend(make_problem(offset + i + 1, name, rule, detail) for i in hits.to_pylist())

    ids_len = pc.list_value_length(batch.column("input_ids"))
    for name in batch.schema.names:
        col = batch.column(name)
        values, parents = pc.list_flatten(col), pc.list_parent_indices(col)
        report(pc.is_null(col), name, "null_value", "null instead of a list of integers; fill it or "
               "drop the row.")
        report(pc.is_null(values), name, "null_value", "a null inside the list; use integers only.",
               parents)
        if name == "input_ids":
            report(pc.equal(ids_len, 0), name, "invalid_value", "an empty token list; drop the row.")
            report(pc.less(values, 0), name, "invalid_value", "token ids must be 0 or more.", parents)
        else:
            report(pc.not_equal(pc.list_value_length(col), ids_len), name, "length_mismatch",
                   "the list length differs from input_ids in this row; make them equal.")
        if name == "position_ids":
            report(_bad_positions(values, parents, pc), name, "invalid_position_ids",
                   "position_ids must count 0, 1, 2, … within each packed sequence and restart at 0 "
                   "where the next one begins (the row is split there and each sequence trained on "
                   "its own); fix the ids or drop the column.", parents)
        if name == "attention_mask":
            zero_one = pc.is_in(values, value_set=_zero_one(values.type))
            report(pc.invert(zero_one), name, "invalid_mask", "attention_mask values must be 0 or 1.",
                   parents)
    problems.sort(key=lambda p: p.line)
    return problems


def _bad_positions(values, parents, pc):
    """Mask over the flattened position_ids: True where a value is neither 0 (a sequence starts)
    nor the previous value + 1 within the same row."""
    import numpy as np
    import pyarrow as pa

    v = pc.fill_null(values, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = parents.to_numpy(zero_copy_only=False)
    first = np.ones(len(v), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    prev = np.concatenate([[-2], v[:-1]])
    return pa.array(~((v == 0) | (~first & (v == prev + 1))))


def _zero_one(kind):
    import pyarrow as pa

    return pa.array([0, 1], type=kind)


def check_csv(path: str, size: int, keep: int, progress: Progress) -> tuple[list[Problem], int, int]:
    """Returns (problems, data rows, lines). A header, then rows of the header's column count."""
    problems: list[Problem] = []
    rows = 0
    with open(path, "rb") as raw:
        if raw.read(3) == b"\xef\xbb\xbf":
            problems.append(make_problem(1, None, "bom", "the file starts with a UTF-8 byte order mark "
                                         "(BOM); save it as UTF-8 without BOM (\"CSV UTF-8\" adds one)."))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header or not any(cell.strip() for cell in header):
                problems.append(make_problem(1, None, "missing_header", "the first line must name the "
                                             "columns; add a header row."))
                return problems, 0, reader.line_num
            for row in reader:
                if not row:
                    continue  # blank lines carry no row, as in csv.DictReader
                rows += 1
                if len(row) != len(header) and len(problems) < keep:
                    problems.append(make_problem(reader.line_num, None, "ragged_row", f"{len(row)} "
                                                 f"columns but the header has {len(header)}; quote "
                                                 "fields that hold commas or fix the row."))
                if progress and rows % CSV_PROGRESS_ROWS == 0:
                    progress(min(f.buffer.tell(), size), size)
        except UnicodeDecodeError as e:
            problems.append(make_problem(reader.line_num + 1, None, "not_utf8", f"byte 0x"
                                         f"{e.object[e.start]:02x} is not valid UTF-8; re-save the "
                                         "file with UTF-8 encoding."))
        except csv.Error as e:
            problems.append(make_problem(reader.line_num, None, "invalid_csv", f"the csv reader "
                                         f"stopped here ({e}); fix the quoting of this row."))
    if rows == 0 and not problems:
        problems.append(make_problem(None, None, "min_samples", "the file has a header but no rows; "
                                     "add at least one row."))
    return problems, rows, reader.line_num
