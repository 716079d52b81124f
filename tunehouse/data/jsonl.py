"""Streaming check of a JSONL file in fixed byte blocks, by one process or several.

A block owns the lines that *start* inside it, so blocks can be checked in any order and by any
process, and line numbers are made global afterwards by adding up the line counts of the blocks
before (`Merger`). Memory stays bounded: a block is read in 256 KiB chunks and only its first
`keep` issues are held. Each raw line goes to the fast acceptor (`acceptor.py`: msgspec, in C,
plain rows only); a line it refuses is parsed by orjson (the json module where orjson refuses, to
name the syntax error) and checked by the detailed `RowChecker`, which names every problem.

The one cross-block rule, "all rows share the first row's format", needs that format before the
blocks start: the parallel path finds it by a prescan of the file's first rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from tunehouse.data.messages import describe
from tunehouse.data.acceptor import plain_acceptor
from tunehouse.data.rules import RowChecker

BLOCK = 4 * 2**20  # small enough that the last blocks balance the workers' finish times
CHUNK = 2**18  # 256 KiB: the buffer stays in the CPU cache while its lines are decoded
MAX_LINE = 256 * 2**20  # ten 10 MB images as base64 fit; a line with no end does not eat memory
BOM = b"\xef\xbb\xbf"
_UNPARSED = object()  # orjson refused the line (None would clash with a `null` line)

Known = tuple[str, int]  # (dataset format, global line of the first row that has it)


@dataclass(frozen=True)
class Job:
    """What every block of one check needs; picklable for worker processes."""

    path: str
    size: int
    purpose: str
    keep: int  # issues kept per block: max_errors + 1, so truncation can be detected
    block: int = BLOCK


@dataclass
class BlockResult:
    index: int
    lines: int = 0
    samples: int = 0  # non-blank lines
    issues: list[tuple[int, str | None, str, str]] = field(default_factory=list)  # local line
    first: tuple[str, int] | None = None  # (format, local line) of the block's first detected row
    known: Known | None = None  # the file's format after this block (sequential mode)
    flags: set[str] = field(default_factory=set)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _load(line: bytes) -> Any:
    """orjson first; the stdlib json module decides what orjson refuses (lone surrogates...)."""
    try:
        return orjson.loads(line)
    except ValueError:
        pass
    try:
        return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _UNPARSED


class _Lines:
    """Per-line checks of one block; the slow path of each line that the fast path refused."""

    def __init__(self, job: Job, res: BlockResult, known: Known | None, line_offset: int | None):
        self.purpose = job.purpose
        self.keep = job.keep
        self.res = res
        self.known = known
        self.line_offset = line_offset  # None in parallel mode, where `known` comes from the prescan
        self.blanks = 0
        self.fast = plain_acceptor(known[0] if known else None, job.purpose)

    def add(self, n: int, field: str | None, rule: str, detail: str) -> None:
        if len(self.res.issues) < self.keep:
            self.res.issues.append((n, field, rule, detail))

    def slow(self, n: int, line: bytes, no_newline: bool) -> None:
        """The precise path: every problem of a line the fast acceptor refused."""
        try:
            row = orjson.loads(line)
        except ValueError:
            row = self.parse(n, line, no_newline)
            if row is _UNPARSED:
                return
        if type(row) is not dict:
            self.add(n, None, "not_object", f"expected a JSON object ({{...}}) per line, found "
                     f"{describe(row)}; put each sample in one object.")
            return
        if self.purpose == "batch-api":
            return
        issues: list = []
        fmt = RowChecker(self.purpose, issues, self.res.flags).check(row)
        if fmt is not None:
            if self.res.first is None:
                self.res.first = (fmt, n)
                if self.known is None:
                    self.fast = plain_acceptor(fmt, self.purpose)
            if self.purpose == "fine-tune":
                if self.known is None:
                    assert self.line_offset is not None, "parallel blocks need the prescanned format"
                    self.known = (fmt, self.line_offset + n)
                elif fmt != self.known[0]:
                    self.add(n, None, "mixed_formats", f"this row is {fmt} but line {self.known[1]} is "
                             f"{self.known[0]}; all rows of a file must share one format: convert "
                             "this row or move it to another file.")
        for issue in issues:
            self.add(n, *issue)

    def parse(self, n: int, line: bytes, no_newline: bool) -> Any:
        """Parses a line orjson refused, naming why it is not a JSON value."""
        if not line.strip():
            self.blanks += 1
            self.add(n, None, "blank_line", "the line is empty; remove blank lines (only one final "
                     "newline is allowed).")
            return _UNPARSED
        nul = line.find(b"\x00")
        if nul >= 0:
            self.add(n, None, "nul_byte", f"NUL byte at column {nul + 1}: the file looks binary or "
                     "UTF-16; save it as UTF-8 text.")
            return _UNPARSED
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            self.add(n, None, "not_utf8", f"byte 0x{line[e.start]:02x} at column {e.start + 1} is not "
                     "valid UTF-8; re-save the file with UTF-8 encoding.")
            return _UNPARSED
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            self.add(n, None, "too_deep", "the JSON is nested too deeply to read (over ~1000 levels); "
                     "flatten this row.")
        except json.JSONDecodeError as e:
            if e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip()):
                end = (" and the file has no final newline: it looks cut off; export it again"
                       if no_newline else "; complete or remove this line")
                self.add(n, None, "truncated_json", f"the JSON stops before it is complete ({e.msg}){end}.")
            else:
                self.add(n, None, "invalid_json", f"not valid JSON ({e.msg} at column {e.colno}); fix "
                         "the syntax of this line.")
        except ValueError as e:  # NaN / Infinity
            self.add(n, None, "invalid_json", f"not valid JSON ({e}); use null or a number instead.")
        return _UNPARSED


def _first_line_start(f, start: int) -> int:
    """Offset of the first line that starts at or after `start`."""
    if start == 0:
        return 0
    f.seek(start - 1)
    while True:
        piece = f.readline(CHUNK)
        if not piece or piece.endswith(b"\n"):
            return f.tell()


def scan_block(job: Job, index: int, known: Known | None, line_offset: int | None,
               on_bytes: Callable[[int], None]) -> BlockResult:
    """Checks the lines starting in block `index`; line numbers in the result are local.

    Chunks are read into one reused buffer and the fast acceptor gets the buffer and the span
    of the chunk's whole lines: it decodes memoryview slices of it, or, once rows settle, splits
    the span in C (a copy of the chunk, `acceptor._decode_lines`, cheaper than the slices' loop)."""
    start, stop = index * job.block, min((index + 1) * job.block, job.size)
    res = BlockResult(index)
    lines = _Lines(job, res, known, line_offset)
    slow = lines.slow
    n = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    find = buf.find
    with open(job.path, "rb") as f:
        at = _first_line_start(f, start)
        f.seek(at)
        if at == 0 and f.read(3) == BOM:
            lines.add(1, None, "bom", "the file starts with a UTF-8 byte order mark (BOM); save it as "
                      "UTF-8 without BOM.")
            at = 3
        f.seek(at)
        reported = at - start if at < stop else stop - start
        on_bytes(reported)
        parts: list[bytes] = []  # pieces of the line not yet ended by a newline
        held = 0
        skipping = False  # inside a line over MAX_LINE: drop bytes up to its newline
        while at < stop or parts or skipping:
            beyond = at >= stop  # only finishing the block's last line
            got = f.readinto(view[:CHUNK if beyond else min(CHUNK, stop - at)])
            if not beyond:
                on_bytes(got)
            at += got
            if not got:  # end of file: an unfinished line is the last one, without newline
                if parts:
                    n += 1
                    line = b"".join(parts)
                    if not lines.fast.one(line):
                        slow(n, line, True)
                break
            end = find(b"\n", 0, got)
            if end < 0:  # no line ends in this chunk
                if not skipping:
                    parts.append(bytes(view[:got]))
                    held += got
                    if held > MAX_LINE:
                        n += 1
                        lines.add(n, None, "line_too_long", f"the line is over {MAX_LINE >> 20} MiB; "
                                  "split it or shrink the images in it.")
                        parts, held, skipping = [], 0, True
                continue
            if skipping:  # the rest of an over-long line, already counted and reported
                skipping = False
            else:  # the line that started in an earlier chunk (or at this chunk's start)
                n += 1
                line = b"".join([*parts, view[:end]]) if parts else view[:end]
                if not lines.fast.one(line):
                    slow(n, bytes(line), False)
            parts, held = [], 0
            if beyond:  # lines after that first newline belong to the next block
                break
            pos = end + 1
            limit = buf.rfind(b"\n", pos, got) + 1  # just past the chunk's last newline
            while pos < limit:
                pos, accepted = lines.fast.run(buf, view, pos, limit)
                n += accepted
                if pos < limit:  # a line the fast path refused (it may pick the file's format)
                    end = find(b"\n", pos, limit)
                    n += 1
                    slow(n, bytes(view[pos:end]), False)
                    pos = end + 1
            if pos < got:
                parts, held = [bytes(view[pos:got])], got - pos
    res.lines = n
    res.samples = n - lines.blanks
    res.known = lines.known
    return res
