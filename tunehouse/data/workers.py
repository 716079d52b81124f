"""Runs the blocks of a JSONL check in this process or across worker processes, and merges them.

Blocks are claimed from a shared counter, so a worker that starts late (a 'spawn' start costs
~0.1 s) simply takes fewer; this process works too and merges results as they arrive. The merged
report is identical to the single-process one: problems are renumbered in block order and capped
at the same place, and the one cross-block input, the file's format, is prescanned.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import threading
from typing import Callable

from tunehouse.data.jsonl import BOM, MAX_LINE, BlockResult, Job, Known, _load, scan_block
from tunehouse.data.report import Problem, make_problem
from tunehouse.data.rules import detect_format

# Below these sizes a worker costs more than it saves: one process checks ~950 MB/s of plain rows,
# a forked worker starts in a few ms, a spawned one in ~0.1 s of CPU (a fresh interpreter).
PARALLEL_MIN_BYTES = 32 * 2**20
SPAWN_MIN_BYTES = 256 * 2**20
PROGRESS_EVERY = 4 * 2**20


class Merger:
    """Adds block results in block order: global line numbers, capped problems, totals."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.lines = 0
        self.samples = 0
        self.problems: list[Problem] = []
        self.flags: set[str] = set()
        self.first: tuple[str, int] | None = None  # (format, global line) of the first detected row
        self._pending: dict[int, BlockResult] = {}
        self._next = 0

    def add(self, res: BlockResult) -> None:
        self._pending[res.index] = res
        while self._next in self._pending:
            r = self._pending.pop(self._next)
            self._next += 1
            for line, field, rule, detail in r.issues[: self.keep - len(self.problems)]:
                self.problems.append(make_problem(self.lines + line, field, rule, detail))
            if self.first is None and r.first is not None:
                self.first = (r.first[0], self.lines + r.first[1])
            self.lines += r.lines
            self.samples += r.samples
            self.flags |= r.flags


def prescan(path: str, limit: int) -> Known | None:
    """(format, line) of the file's first row with a format, if one is in the first block."""
    with open(path, "rb") as f:
        n = 0
        while f.tell() < limit:
            line = f.readline(MAX_LINE)
            if not line:
                return None
            n += 1
            fmt = detect_format(_load(line[3:] if n == 1 and line.startswith(BOM) else line))
            if fmt is not None:
                return fmt, n
    return None


def default_workers() -> int:
    """Up to 4 processes: this one plus one per idle CPU. On a saturated machine a worker only
    competes for a core: Linux's autogroup shares CPU time between sessions, not processes (2
    shared cores, 1 GB, load ~5: 1.63 s with 2 processes, 1.52 s with 1)."""
    if os.environ.get("TUNEHOUSE_CHECK_WORKERS", "").isdigit():  # an explicit choice wins
        return max(1, int(os.environ["TUNEHOUSE_CHECK_WORKERS"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(4, cpus, int(cpus - busy) + 1))


def check_blocks(job: Job, progress: Callable[[int, int], None] | None, workers: int | None) -> Merger:
    """Checks every block of `job.path`, with worker processes for files of PARALLEL_MIN_BYTES
    (SPAWN_MIN_BYTES where workers must be spawned) and more."""
    merger = Merger(job.keep)
    nblocks = -(-job.size // job.block)
    workers = min(workers or default_workers(), nblocks)
    start = _start_method()
    if job.size < (PARALLEL_MIN_BYTES if start == "fork" else SPAWN_MIN_BYTES):
        workers = 1
    known = None
    if workers > 1 and job.purpose == "fine-tune":
        known = prescan(job.path, job.block)
        if known is None:  # no format in the first block: a broken file, check it in order
            workers = 1
        merger.first = known
    if workers <= 1:
        meter = _Meter(job.size, progress, [0])
        for i in range(nblocks):
            res = scan_block(job, i, known, merger.lines, meter.slot(0))
            known = res.known
            merger.add(res)
    else:
        _run_parallel(job, known, workers, nblocks, merger, progress, start)
    if progress:
        progress(job.size, job.size)
    return merger


class _Meter:
    """Bytes done per process (one slot each, so no lock), reported every few MiB."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None, slots) -> None:
        self.total, self.progress, self.slots = total, progress, slots
        self.last = 0

    def slot(self, k: int) -> Callable[[int], None]:
        slots = self.slots

        def on_bytes(nbytes: int) -> None:
            slots[k] += nbytes
            if k == 0 and self.progress and slots[0] - self.last >= PROGRESS_EVERY:
                self.last = slots[0]
                self.report()

        return on_bytes

    def report(self) -> None:
        if self.progress:
            self.progress(min(sum(self.slots), self.total), self.total)


def _claim(job: Job, known: Known | None, counter, nblocks: int, on_bytes):
    while True:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        if i >= nblocks:
            return
        yield scan_block(job, i, known, None, on_bytes)


def _worker(job: Job, known: Known | None, counter, nblocks: int, slots, k: int, conn) -> None:
    """Worker process entry: checks claimed blocks and sends each result, then None."""
    meter = _Meter(job.size, None, slots)
    for res in _claim(job, known, counter, nblocks, meter.slot(k)):
        conn.send(res)
    conn.send(None)
    conn.close()


def _start_method() -> str:
    """'fork' when this process runs no other Python thread (a script calling check_file): a
    worker is ready in a few ms and needs no `if __name__ == "__main__"` guard in the caller's
    script. 'spawn' otherwise (a server's thread pool, the CLI's progress-bar thread: forking
    there can copy a lock another thread holds), at ~0.1 s of CPU and ~15 MB a worker."""
    if threading.active_count() == 1 and "fork" in mp.get_all_start_methods():
        return "fork"
    return "spawn"


def _run_parallel(job: Job, known: Known | None, workers: int, nblocks: int, merger: Merger,
                  progress: Callable[[int, int], None] | None, start: str) -> None:
    ctx = mp.get_context(start)
    counter = ctx.Value("l", 0)
    slots = ctx.Array("q", workers, lock=False)
    meter = _Meter(job.size, progress, slots)
    procs, conns = [], []
    for k in range(1, workers):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(job, known, counter, nblocks, slots, k, send),
                        daemon=True)
        p.start()
        send.close()  # keep only the child's end open, so its death reads as EOF
        procs.append(p)
        conns.append(recv)
    try:
        for res in _claim(job, known, counter, nblocks, meter.slot(0)):
            merger.add(res)
            _drain(conns, merger, wait=False)
        while conns:
            _drain(conns, merger, wait=True)
            meter.report()
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def _drain(conns: list, merger: Merger, wait: bool) -> None:
    """Merges every result waiting on the pipes; drops a pipe at its end marker."""
    ready = mp.connection.wait(conns, timeout=0.2 if wait else 0)
    for conn in ready:
        while conn.poll():
            try:
                res = conn.recv()
            except EOFError:
                raise RuntimeError("a dataset check worker died; run again with workers=1") from None
            if res is None:
                conns.remove(conn)
                break
            merger.add(res)
