"""Debian's headless chromium driven by Playwright, for the dashboard's browser tests, its
screenshots (docs/screenshots.py) and its bench (bench/dashboard.py). Playwright's own browser
download cannot work on a machine without internet; `make test` installs `chromium` with apt."""

from __future__ import annotations

import os
import shutil

# No sandbox (root in CI), and none of the background traffic a closed network refuses.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """$TUNEHOUSE_CHROMIUM, else chromium on the PATH, else Debian's /usr/bin/chromium; None if absent."""
    path = os.environ.get("TUNEHOUSE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return path if os.path.exists(path) else None


def launch(playwright, executable_path: str | None = None):
    path = executable_path or chromium_path()
    if path is None:
        raise SystemExit("chromium missing: install it (apt-get install -y chromium) or set TUNEHOUSE_CHROMIUM")
    return playwright.chromium.launch(executable_path=path, args=ARGS)
