"""Downloads of a job's weights: a zstd-compressed tar, built once per (job, what) into the blob
store, then streamed from the store with HTTP Range support (the SDKs probe with `Range: bytes=0-1`
and resume interrupted downloads with `Range: bytes=N-`, api-reference §5.8).

Streamed through the API rather than answered with a redirect to a presigned GET: the store's
endpoint is often reachable only from the servers (a cluster-internal MinIO, a VPC endpoint), both
SDKs' download paths then keep working unchanged (the 1.x SDK's probe and resume go through its
API requestor, and requests drops Authorization on a cross-host hop anyway), and the API key stays
the one authority. The cost is the archive's bytes passing through the API process, in 1 MiB
chunks with constant memory (`BlobStore.read_range`)."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import zstandard
from urllib.parse import quote

from fastapi.responses import Response, StreamingResponse
from sqlalchemy.orm import Session

from tunehouse import jobs
from tunehouse.errors import InvalidInput, NotFound, TunehouseError
from tunehouse.job_spec import JobSpec
from tunehouse.store.blobs import BlobStore
from tunehouse.store.home import Home
from tunehouse.store.tables import Job

MERGED_DIR = "merged"
# Resume-only files: the weights, configs and tokenizer are what a user downloads.
EXCLUDE = {"optimizer.pt", "rng_state.pt"}
CHECKPOINT_KINDS = ("merged", "adapter", "model_output_path", "default")


class RangeNotSatisfiable(TunehouseError):
    status = 416


def pick_folder(s: Session, home: Home, job: Job, checkpoint: str | None, step: int | None) -> tuple[Path, str]:
    """The folder to ship and a short name for it (e.g. `merged`, `adapter`, `step-000010`)."""
    kind = (checkpoint or "default").lower()
    if kind not in CHECKPOINT_KINDS:
        raise InvalidInput(f"checkpoint must be one of {', '.join(CHECKPOINT_KINDS)} or gguf; got {checkpoint!r}.",
                           param="checkpoint")
    cps = jobs.checkpoints(s, job.id)
    if step:
        match = [c for c in cps if c.step == step]
        if not match:
            have = ", ".join(str(c.step) for c in cps) or "none yet"
            raise NotFound(f"Job {job.id} has no checkpoint at step {step} (steps: {have}).", param="checkpoint_step")
        return home.blobs.local_dir(match[0].blob_key), f"step-{step:06d}"
    final = [c for c in cps if c.checkpoint_type == "Final"]
    if job.status not in ("completed", "compressing", "uploading") or not final:
        raise InvalidInput(f"Job {job.id} is {job.status}; its model can be downloaded once it has completed.",
                           param="ft_id", code="job_not_completed")
    folder = home.blobs.local_dir(final[0].blob_key)
    lora = JobSpec.of(job).lora
    if lora and kind in ("merged", "default", "model_output_path"):
        return folder / MERGED_DIR, "merged"
    if not lora and kind == "adapter":
        raise InvalidInput(f"Job {job.id} trained all weights (Full); there is no adapter. Use checkpoint=merged.",
                           param="checkpoint")
    return folder, "adapter" if lora else "model"


def build_archive(s: Session, home: Home, job: Job, checkpoint: str | None, step: int | None
                  ) -> tuple[str, str | None]:
    """The archive's blob key, built into the store on first use, and its SHA-256 when this call
    built it (hashed by the writer as the bytes went in); None when it was there already."""
    folder, name = pick_folder(s, home, job, checkpoint, step)
    key = f"jobs/{job.id}/downloads/{name}.tar.zst"
    if home.blobs.exists(key):
        return key, None
    with home.blobs.writer(key) as w:
        cctx = zstandard.ZstdCompressor(level=3, threads=-1)
        with cctx.stream_writer(w, closefd=False) as zw, tarfile.open(fileobj=zw, mode="w|") as tar:
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder)
                if path.is_file() and rel.parts[0] != MERGED_DIR and path.name not in EXCLUDE:
                    tar.add(path, arcname=str(Path(name) / rel))
        w.commit()
    return key, w.sha256


_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def serve_range(blobs: BlobStore, key: str, range_header: str | None, filename: str) -> Response:
    """The blob at `key`, whole (200) or the one byte range asked for (206)."""
    size = blobs.size(key)
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": _disposition(filename)}
    if not range_header:
        return StreamingResponse(_chunks(blobs, key, 0, size - 1), media_type="application/octet-stream",
                                 headers=headers | {"Content-Length": str(size)})
    m = _RANGE_RE.match(range_header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable(f"Unsupported Range header {range_header!r}; use bytes=START-END.", param="range")
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:  # suffix range: the last N bytes
        start, end = max(size - int(m.group(2)), 0), size - 1
    if start >= size or start > end:
        raise RangeNotSatisfiable(f"Range {range_header!r} is outside the {size}-byte file.", param="range",
                                  headers={"Content-Range": f"bytes */{size}"})
    return StreamingResponse(_chunks(blobs, key, start, end), status_code=206, media_type="application/octet-stream",
                             headers=headers | {"Content-Range": f"bytes {start}-{end}/{size}",
                                                "Content-Length": str(end - start + 1)})


def _chunks(blobs: BlobStore, key: str, start: int, end: int):
    """Sync generator: Starlette iterates it in its thread pool, off the event loop."""
    if end >= start:
        yield from blobs.read_range(key, start, end)


def _disposition(filename: str) -> str:
    """As Starlette's FileResponse writes it: RFC 6266 `filename*` for a non-ASCII name."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'
