"""The outcome of a dataset check: `Problem`s, the rule catalogue, and `CheckReport` with its two
wire shapes (the SDK's `check_file` dictionary, api-reference §6.1, and the server's
`validation_report`, §4.3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# rule id -> (SDK report key it turns False, what it means). The ids are stable: clients and
# tests match on them.
RULES: dict[str, tuple[str, str]] = {
    # whole file
    "not_found": ("found", "the path is not an existing regular file"),
    "empty_file": ("file_size", "the file is empty or holds only whitespace"),
    "file_too_large": ("file_size", "the file is over 50.1 GiB"),
    "bad_extension": ("filetype", "the extension is not .jsonl, .parquet or .csv"),
    "unsupported_purpose": ("filetype", "CSV outside purpose eval, or Parquet for eval"),
    "min_samples": ("has_min_samples", "fewer samples than the minimum (1)"),
    # bytes and lines
    "not_utf8": ("utf8", "bytes that are not UTF-8"),
    "bom": ("utf8", "a UTF-8 byte order mark at the start of the file"),
    "nul_byte": ("load_json", "a NUL byte in a line (binary or UTF-16 data)"),
    "blank_line": ("load_json", "an empty or whitespace-only line"),
    "invalid_json": ("load_json", "a line that is not valid JSON"),
    "truncated_json": ("load_json", "a line whose JSON stops before it is complete"),
    "too_deep": ("load_json", "JSON nested too deeply to read"),
    "line_too_long": ("load_json", "a line over the 256 MiB limit"),
    "not_object": ("line_type", "a line that is JSON but not an object"),
    # formats
    "unknown_format": ("format", "a row whose keys match no dataset format"),
    "ambiguous_format": ("format", "a row whose keys match two formats"),
    "mixed_formats": ("format", "a row of another format than the file's first row"),
    "extra_column": ("format", "a top-level key (or Parquet column) the format does not allow"),
    # fields inside rows
    "wrong_type": ("key_value", "a field of the wrong JSON type"),
    "missing_field": ("key_value", "a required field is absent"),
    "extra_field": ("key_value", "an unknown key inside a message or input"),
    "invalid_value": ("key_value", "a field with a value outside its allowed set"),
    "invalid_role": ("key_value", "a role outside system/user/assistant/tool"),
    "empty_messages": ("key_value", "an empty messages list"),
    "empty_text": ("key_value", "an empty text"),
    "system_not_first": ("key_value", "a system message after the first position"),
    "first_not_user": ("key_value", "the first turn (after system) is not from the user"),
    "role_alternation": ("key_value", "user and assistant turns do not alternate"),
    "tool_without_call": ("key_value", "a tool message not answering an assistant tool call"),
    "missing_tool_result": ("key_value", "an assistant tool call not followed by tool messages"),
    "extra_tool_result": ("key_value", "more tool messages than the calls they answer"),
    "unknown_tool_call_id": ("key_value", "a tool message whose tool_call_id names no pending call"),
    "unknown_tool": ("key_value", "a call to a function the row's tools do not declare"),
    "invalid_arguments": ("key_value", "tool-call arguments that are not a JSON object string"),
    "missing_assistant": ("key_value", "no assistant message to learn from"),
    "missing_content": ("key_value", "a message without content (or tool_calls)"),
    "invalid_weight": ("key_value", "a weight other than the integers 0 and 1"),
    "misplaced_field": ("key_value", "reasoning or tool_calls on a non-assistant message"),
    "mixed_content_kinds": ("key_value", "string and list-of-parts contents in one sample"),
    "image_not_user": ("key_value", "an image outside a user message or prompt"),
    "invalid_image_url": ("key_value", "an image that is not a base64 JPEG/PNG/WEBP data URL"),
    "image_too_large": ("key_value", "an image over 10 MB"),
    "too_many_images": ("key_value", "more than 10 images in a message or sample"),
    "image_weight": ("key_value", "a message with images that has weight 1"),
    "input_ends_with_assistant": ("key_value", "a preference input ending with an assistant turn"),
    "output_count": ("key_value", "a preference output that is not exactly one message"),
    # tabular files
    "not_parquet": ("load_parquet", "the file does not read as Parquet"),
    "missing_column": ("load_parquet", "the Parquet file has no input_ids column"),
    "null_value": ("load_parquet", "a null in a Parquet column"),
    "length_mismatch": ("load_parquet", "token columns of one row with different lengths"),
    "invalid_mask": ("load_parquet", "an attention_mask value other than 0 and 1"),
    "invalid_position_ids": ("load_parquet", "position_ids that do not count 0, 1, … (restarting at 0)"),
    "missing_header": ("load_csv", "a CSV file without a header row"),
    "ragged_row": ("load_csv", "a CSV row whose column count differs from the header's"),
    "invalid_csv": ("load_csv", "a CSV row the csv module cannot read"),
}

FLAGS = (
    "dataset_has_message_weights",
    "dataset_has_parallel_tool_calls",
    "dataset_has_reasoning",
    "dataset_has_sample_weights",  # no row rule sets it: per-sample weights are not a format here
    "dataset_has_tools",
    "dataset_is_multimodal",
)


@dataclass(frozen=True)
class Problem:
    """One error found in a dataset."""

    line: int | None  # 1-based line (JSONL/CSV) or row (Parquet); None for whole-file problems
    field: str | None  # JSON path like "messages[2].role", or a column name
    rule: str  # a key of RULES
    message: str  # names line and field, says what is wrong and what to change


def make_problem(line: int | None, field: str | None, rule: str, detail: str) -> Problem:
    """Builds the message as 'line 7, messages[1].content: <detail>'."""
    where = ", ".join(x for x in (f"line {line}" if line is not None else None, field) if x)
    message = f"{where}: {detail}" if where else detail[:1].upper() + detail[1:]
    return Problem(line, field, rule, message)


@dataclass
class CheckReport:
    """Everything `check_file` found; `passed` when `problems` is empty."""

    path: str
    purpose: str
    found: bool = False
    file_size: int | None = None
    filetype: str | None = None  # jsonl, parquet, csv; None for an unknown extension
    dataset_format: str | None = None
    num_lines: int = 0  # lines (JSONL, CSV with header) or rows (Parquet) read
    num_samples: int = 0  # non-blank lines / data rows
    flags: set[str] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    errors_truncated: bool = False  # more problems existed than max_errors

    @property
    def passed(self) -> bool:
        return not self.problems

    def _broken(self) -> set[str]:
        return {RULES[p.rule][0] for p in self.problems}

    def to_sdk_dict(self) -> dict:
        """The together SDK's check_file dictionary (§6.1), plus the full error list. Unlike the
        SDK, `message` always holds the first error, Parquet failures included."""
        broken = self._broken()
        first = self.problems[0] if self.problems else None
        read = self.found and bool(self.file_size) and self.filetype is not None
        d = {
            "is_check_passed": self.passed,
            "message": first.message if first else "Checks passed",
            "found": self.found,
            "file_size": self.file_size,
            "utf8": ("utf8" not in broken) if read and self.filetype != "parquet" else None,
            "line_type": ("line_type" not in broken) if read and self.filetype == "jsonl" else None,
            "text_field": True if read else None,
            "key_value": ("key_value" not in broken) if read and self.filetype == "jsonl" else None,
            "has_min_samples": self.num_samples >= 1 if read else None,
            "num_samples": self.num_samples if read else None,
            "load_json": None,
            "load_csv": None,
            "filetype": self.filetype or (f"Unknown extension of file {self.path}. Only .jsonl, "
                                          ".parquet and .csv files are supported."),
            "line_number": first.line if first else None,
            "format": ("format" not in broken) if read and self.filetype == "jsonl" else None,
            "load_parquet": None,
            "errors": [asdict(p) for p in self.problems],
            "errors_truncated": self.errors_truncated,
            "dataset_format": self.dataset_format,
            "num_lines": self.num_lines,
        }
        if read and self.filetype == "jsonl":
            d["load_json"] = not broken & {"load_json", "utf8"}
        elif read and self.filetype == "csv":
            d["load_csv"] = not broken & {"load_csv", "utf8"}
        elif read and self.filetype == "parquet" and first:
            d["load_parquet"] = first.message
        return d

    def to_validation_report(self, file_id: str | None = None) -> dict:
        """The server's `validation_report` of the file object (§4.3), plus the error list."""
        first = self.problems[0] if self.problems else None
        return {
            "valid": self.passed,
            "dataset_format": self.dataset_format,
            **{flag: flag in self.flags for flag in FLAGS},
            "error": first.message if first else None,
            "error_type": "INVALID_FORMAT" if first else None,
            "file_id": file_id,
            "nlines": self.num_lines,
            "errors": [asdict(p) for p in self.problems],
        }
