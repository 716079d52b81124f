"""Real servers the store tests run against (PostgreSQL, an S3 server), started once per test
session and stopped after; each test gets its own database and bucket."""

import os

import pytest


def missing(message: str, *, module_level: bool = False):
    """A test set-up piece that `make test` installs is missing: skipped when run by hand, a
    failure under CI=true (there a missing piece is a broken set-up, not a reason to skip)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message, allow_module_level=module_level)
