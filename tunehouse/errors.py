"""Domain errors. Services raise these; the API renders them as
`{"error": {"message", "type", "param", "code"}}` with the status they carry."""

from __future__ import annotations

import re

# An absolute path of two or more components (not part of a URL: no `:` or word character before it).
_ABS_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s/'\"`:,;()]+/)+([^\s/'\"`:,;()]*)")


def redact_paths(text: str) -> str:
    """`text` with each absolute server path cut to its last component (`…/train.jsonl`): messages
    the owner reads must not map the server's folders (home, site-packages)."""
    return _ABS_PATH.sub(lambda m: "…/" + m.group(1), text)


class TunehouseError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


class InvalidInput(TunehouseError):
    """The caller sent something we cannot accept; the message says what to change."""


class Unauthorized(TunehouseError):
    status = 401
    type = "authentication_error"


class NotFound(TunehouseError):
    """Also what another owner's object looks like: never 403, so ids do not leak."""

    status = 404
    type = "not_found_error"


class Conflict(TunehouseError):
    status = 409
    type = "conflict_error"

    def __init__(self, message: str, **kw):
        super().__init__(message, **kw)
        # Deliberate 409s must not be retried by the v3 SDK (api-reference §2.2).
        self.headers.setdefault("x-should-retry", "false")


class PayloadTooLarge(TunehouseError):
    status = 413


class Forbidden(TunehouseError):
    """An admin-only action by a non-admin key (owned objects answer NotFound instead)."""

    status = 403
    type = "permission_error"


class RateLimited(TunehouseError):
    status = 429
    type = "rate_limit_error"
