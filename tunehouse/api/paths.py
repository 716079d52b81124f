"""Path normalisation so both SDK base-URL styles work (api-reference §2.3): `http://host` with
absolute `/v1/...` paths (v3) and `http://host/v1` with relative paths (v1, and v3 misconfigured
as `/v1/v1/...`)."""

from __future__ import annotations

_VERSIONS = ("/v1/", "/v2/", "/v3/")
_UNVERSIONED = ("/health", "/docs", "/openapi.json", "/redoc", "/ui", "/static")


def normalise(path: str) -> str:
    for v in _VERSIONS:
        if path.startswith("/v1" + v):
            return path[3:]
    if path.startswith(_VERSIONS) or path in ("/v1", "/v2", "/v3") or path == "/":
        return path
    if path.startswith(_UNVERSIONED):
        return path
    return "/v1" + path


class NormalisePaths:
    """ASGI middleware rewriting the request path before routing."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            new = normalise(scope["path"])
            if new != scope["path"]:
                scope = dict(scope, path=new, raw_path=new.encode())
        await self.app(scope, receive, send)
