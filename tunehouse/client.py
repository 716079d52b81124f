"""A small HTTP client for the tunehouse (Together-compatible) API, used by the CLI.
It speaks the same wire protocol as the official SDKs, so it also works against any server
that implements it."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tunehouse.settings import Settings
from tunehouse.store.blobs import sha256_file
from tunehouse.store.home import read_key_file

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DOWNLOAD_TRIES = 5  # resumes after a broken connection, as the v3 CLI's downloader


class ApiError(Exception):
    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.body = status, message, body or {}


def resolve_api_key(explicit: str | None, settings: Settings | None = None) -> str | None:
    """--api-key, then TUNEHOUSE_API_KEY / TOGETHER_API_KEY, then TUNEHOUSE_ADMIN_KEY, then the
    admin key the first `tunehouse serve` stored in the home."""
    key = explicit or os.environ.get("TUNEHOUSE_API_KEY") or os.environ.get("TOGETHER_API_KEY")
    if key:
        return key
    settings = settings or Settings()
    return settings.admin_key.get_secret_value() if settings.admin_key else read_key_file(settings.admin_key_path)


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0):
        self.base_url = (base_url or os.environ.get("TUNEHOUSE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.api_key = resolve_api_key(api_key)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _json(self, resp: httpx.Response):
        if resp.status_code >= 400:
            try:
                body = resp.json()
                message = body.get("error", {}).get("message") or resp.text
            except ValueError:
                body, message = {}, resp.text
            raise ApiError(resp.status_code, message, body)
        return resp.json()

    @staticmethod
    def _raise_text(resp: httpx.Response):
        raise ApiError(resp.status_code, f"The upload was refused: {resp.text[:500]}", {})

    def request(self, method: str, path: str, **kw):
        try:
            return self._json(self.http.request(method, path, **kw))
        except httpx.ConnectError as exc:
            raise ApiError(0, f"Cannot reach the tunehouse server at {self.base_url} ({exc}). "
                              "Start it with `tunehouse serve` or pass --base-url.") from None

    # -- files -----------------------------------------------------------------------------
    def upload(self, path: Path, purpose: str = "fine-tune",
               progress: Callable[[int, int], None] | None = None) -> dict:
        """The SDKs' three-step upload: announce (302 + signed URL), PUT the bytes, preprocess."""
        path = Path(path)
        size = path.stat().st_size
        data = {"purpose": purpose, "file_name": path.name, "file_type": path.suffix.lstrip(".").lower(),
                "checksum": sha256_file(path)}
        try:
            resp = self.http.post("/v1/files", data=data, follow_redirects=False)
        except httpx.ConnectError as exc:
            raise ApiError(0, f"Cannot reach the tunehouse server at {self.base_url} ({exc}).") from None
        if resp.status_code == 409:
            existing = resp.json().get("file_id")
            return self.request("GET", f"/v1/files/{existing}") | {"already_existed": True}
        if resp.status_code != 302:
            self._json(resp)
            raise ApiError(resp.status_code, "expected a 302 redirect to the upload URL")
        file_id, location = resp.headers["X-Together-File-Id"], resp.headers["Location"]
        put = httpx.put(location, content=_chunks(path, size, progress), timeout=None,
                        headers={"Content-Length": str(size)})
        if put.status_code >= 400:  # S3 (a presigned URL) answers an empty 200 or an XML error
            self._json(put) if "json" in put.headers.get("content-type", "") else self._raise_text(put)
        return self.request("POST", f"/v1/files/{file_id}/preprocess")

    def list_files(self) -> list[dict]:
        return self.request("GET", "/v1/files")["data"]

    def retrieve_file(self, file_id: str) -> dict:
        return self.request("GET", f"/v1/files/{file_id}")

    def download_file(self, file_id: str, dest: Path) -> int:
        tmp = Path(f"{dest}.part")
        with self.http.stream("GET", f"/v1/files/{file_id}/content") as resp:
            if resp.status_code >= 400:
                resp.read()
                self._json(resp)
            with open(tmp, "wb") as fh:
                for chunk in resp.iter_bytes(1 << 20):
                    fh.write(chunk)
        os.replace(tmp, dest)
        return dest.stat().st_size

    def delete_file(self, file_id: str) -> dict:
        return self.request("DELETE", f"/v1/files/{file_id}")

    # -- fine-tuning (api-reference §5) -------------------------------------------------------
    def model_limits(self, model_name: str) -> dict:
        return self.request("GET", "/v1/fine-tunes/models/limits", params={"model_name": model_name})

    def supported_models(self) -> list[str]:
        return self.request("GET", "/v1/fine-tunes/models/supported")["models"]

    def estimate_price(self, body: dict) -> dict:
        return self.request("POST", "/v1/fine-tunes/estimate-price", json=body)

    def create_job(self, body: dict) -> dict:
        return self.request("POST", "/v1/fine-tunes", json=body)

    def list_jobs(self) -> list[dict]:
        return self.request("GET", "/v1/fine-tunes")["data"]

    def retrieve_job(self, job_id: str) -> dict:
        """The full job, `events` included."""
        return self.request("GET", f"/v1/fine-tunes/{job_id}")

    def cancel_job(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/fine-tunes/{job_id}/cancel")

    def delete_job(self, job_id: str) -> dict:
        return self.request("DELETE", f"/v1/fine-tunes/{job_id}")

    def list_events(self, job_id: str) -> list[dict]:
        return self.request("GET", f"/v1/fine-tunes/{job_id}/events")["data"]

    def list_checkpoints(self, job_id: str) -> list[dict]:
        return self.request("GET", f"/v1/fine-tunes/{job_id}/checkpoints")["data"]

    def list_metrics(self, job_id: str, global_step_from: int | None = None) -> list[dict]:
        params = {"global_step_from": global_step_from} if global_step_from is not None else None
        return self.request("GET", f"/v1/fine-tunes/{job_id}/metrics", params=params)["metrics"]

    def download(self, job_id: str, dest: Path | None = None, checkpoint: str | None = None, step: int | None = None,
                 progress: Callable[[int, int], None] | None = None, gguf_type: str | None = None) -> Path:
        """Download a job's weights (a zstd tar) the way the SDKs do (§5.8): probe the size with
        `Range: bytes=0-1`, stream into `<dest>.part`, resume with `Range: bytes=N-` after a broken
        connection, check the size, then rename. `dest` None or a folder: the server's file name."""
        params = {"ft_id": job_id, "checkpoint": checkpoint or "default"}
        if step:
            params["checkpoint_step"] = step
        if gguf_type:
            params["gguf_type"] = gguf_type
        probe = self._send("GET", "/v1/finetune/download", params=params, headers={"Range": "bytes=0-1"})
        total = int(probe.headers.get("content-range", "/0").rsplit("/", 1)[-1] or 0)
        if total <= 0:
            raise ApiError(probe.status_code, "The server did not report the download size (Content-Range).")
        dest = Path(dest) if dest is not None else Path.cwd()
        if dest.is_dir():
            dest = dest / _attachment_name(probe.headers.get("content-disposition"), job_id, step)
        tmp = Path(f"{dest}.part")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        done = 0
        with open(tmp, "wb") as fh:
            for attempt in range(DOWNLOAD_TRIES):
                headers = {"Range": f"bytes={done}-"} if done else {}
                try:
                    with self.http.stream("GET", "/v1/finetune/download", params=params, headers=headers) as resp:
                        if resp.status_code >= 400:
                            resp.read()
                            self._json(resp)
                        if done and resp.status_code != 206:  # the server ignored Range: start over
                            fh.seek(0)
                            fh.truncate()
                            done = 0
                        for chunk in resp.iter_bytes():  # as received: a break loses nothing written
                            fh.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress(done, total)
                    break
                except httpx.TransportError as exc:
                    if attempt == DOWNLOAD_TRIES - 1:
                        raise ApiError(0, f"Download of {job_id} failed after {DOWNLOAD_TRIES} tries "
                                          f"({done}/{total} bytes): {exc}") from None
        if done != total:
            raise ApiError(0, f"Download of {job_id} is incomplete: {done} of {total} bytes (kept {tmp}).")
        os.replace(tmp, dest)
        return dest

    def _send(self, method: str, path: str, **kw) -> httpx.Response:
        """One request whose headers the caller needs; errors raised as `ApiError`."""
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.ConnectError as exc:
            raise ApiError(0, f"Cannot reach the tunehouse server at {self.base_url} ({exc}).") from None
        if resp.status_code >= 400:
            self._json(resp)
        return resp


def _attachment_name(disposition: str | None, job_id: str, step: int | None) -> str:
    """The server's `Content-Disposition` file name, with `-step-N` added for intermediate steps
    (so two downloads of one job do not overwrite each other)."""
    m = re.search(r'filename="?([^";/]+)"?', disposition or "")
    name = m.group(1) if m else f"{job_id}.tar.zst"
    if step:
        stem = name.removesuffix(".tar.zst")
        name = f"{stem}-step-{step}.tar.zst"
    return name


def _chunks(path: Path, size: int, progress: Callable[[int, int], None] | None) -> Iterator[bytes]:
    done = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            done += len(chunk)
            if progress:
                progress(done, size)
            yield chunk
