"""Folders that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; when the block ends normally it takes the
    place of `dest` (an older `dest` is removed), and when it raises it is removed. A killed
    process leaves only a `.name.*` temporary folder, never a half-written one under the real
    name that a later run would mistake for a finished one."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sweep_temp_dirs(parent: Path) -> None:
    """Remove the temporary folders (`.name.*`) that a killed `atomic_dir` left in `parent`."""
    if Path(parent).is_dir():
        for p in Path(parent).iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
