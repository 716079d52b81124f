"""A bench's scratch folder: a fresh temporary directory removed when the process exits, so that
repeated `make bench` runs do not fill /tmp (a serving or training side writes GBs of weights)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path
