"""Headless Chromium for the dashboard tests: Debian's chromium (or $TUNEHOUSE_CHROMIUM) driven
by Playwright (its own browser download cannot work here). Missing, the tests skip locally and
fail under CI=true, where `make test` installs it."""

from __future__ import annotations

from services import missing
from tunehouse.web import headless


def playwright_sync_api():
    """playwright.sync_api; missing, a skip locally and a failure under CI (`make test` installs it)."""
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        missing("playwright missing: `make test` installs the dev extra (pip install -e '.[dev]')", module_level=True)
    return sync_api


def chromium_path() -> str:
    path = headless.chromium_path()
    if path is None:
        missing("chromium missing: `make test` installs it (apt-get install -y chromium)")
    return path


def launch(playwright):
    return headless.launch(playwright, chromium_path())


def sign_in(page, url: str, key: str) -> None:
    page.goto(url + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#who").get_by_text("signed in as").wait_for()
