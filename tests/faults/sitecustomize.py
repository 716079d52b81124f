"""Fault injection for the training child, which is a separate process: a test puts this folder on
PYTHONPATH and names the faults in TUNEHOUSE_TEST_FAULTS; Python imports this module at start-up.
Each fault fires in one process only (a marker file records that it fired), so the retried or
restarted work runs clean.

    metric_db_error:N:MARKER   the first N metric writes raise OperationalError("database is locked")
    checkpoint_crash:K:MARKER  SIGKILL inside the K-th checkpoint save, after the weights are written
"""

import os

_SPEC = os.environ.get("TUNEHOUSE_TEST_FAULTS", "")


def _install(kind: str, count: int, marker: str) -> None:
    if os.path.exists(marker):
        return
    calls = [0]

    def fire() -> bool:
        calls[0] += 1
        if calls[0] > count or (kind == "checkpoint_crash" and calls[0] < count):
            return False
        with open(marker, "a") as fh:
            fh.write(f"{kind} {calls[0]}\n")
        return True

    if kind == "metric_db_error":
        import sqlite3

        from sqlalchemy.exc import OperationalError

        from tunehouse import jobs

        real = jobs.record_metric

        def record_metric(*args, **kwargs):
            if fire():
                raise OperationalError("INSERT INTO metrics", {}, sqlite3.OperationalError("database is locked"))
            return real(*args, **kwargs)

        jobs.record_metric = record_metric
    elif kind == "checkpoint_crash":
        import signal

        from tunehouse.train import checkpoint

        real_write = checkpoint._write_json

        def write_json(path, value):
            if path.name == checkpoint.STATE_FILE and fire():
                os.kill(os.getpid(), signal.SIGKILL)  # the folder holds weights but no state yet
            return real_write(path, value)

        checkpoint._write_json = write_json


if _SPEC:
    for item in _SPEC.split(","):
        kind, count, marker = item.split(":", 2)
        _install(kind, int(count), marker)
