"""Domain errors. Services raise these; the API renders them as
`{"error": {"message", "type", "param", "code"}}` with the status they carry."""

from __future__ import annotations


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
