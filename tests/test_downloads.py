"""Range handling of weight downloads: the SDKs probe with bytes=0-1 and resume with bytes=N-.
Streamed from the blob store, on both backends. And the archive's hash on MODEL_UPLOAD_COMPLETE."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from contextlib import nullcontext

import pytest

from conftest import BACKENDS
from services.s3 import bytes_read
from tunehouse import jobs
from tunehouse.downloads import RangeNotSatisfiable, build_archive, serve_range
from tunehouse.job_spec import JobSpec
from tunehouse.store.blobs import open_blobs
from tunehouse.store.home import open_home
from tunehouse.store.tables import Job
from tunehouse.train.config import SFTConfig
from tunehouse.train.run import _publish

pytestmark = pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)


def _body(resp) -> bytes:
    async def collect():
        return b"".join([chunk async for chunk in resp.body_iterator])

    return asyncio.run(collect())


def test_probe_resume_suffix_and_refusal(settings):
    blobs = open_blobs(settings)
    data = bytes(range(256)) * 4  # 1024 bytes
    blobs.put_bytes("jobs/j/downloads/m.tar.zst", data)
    key = "jobs/j/downloads/m.tar.zst"
    probe = serve_range(blobs, key, "bytes=0-1", "m.tar.zst")
    assert probe.status_code == 206 and probe.headers["content-range"] == "bytes 0-1/1024"
    assert _body(probe) == bytes([0, 1])
    resume = serve_range(blobs, key, "bytes=1000-", "m.tar.zst")
    assert resume.headers["content-range"] == "bytes 1000-1023/1024" and _body(resume) == data[1000:]
    assert resume.headers["content-length"] == "24"
    tail = serve_range(blobs, key, "bytes=-10", "m.tar.zst")
    assert _body(tail) == data[-10:]
    whole = serve_range(blobs, key, None, "m.tar.zst")
    assert whole.status_code == 200 and whole.headers["content-length"] == "1024" and _body(whole) == data
    assert whole.headers["content-disposition"] == 'attachment; filename="m.tar.zst"'
    assert serve_range(blobs, key, None, "modèle.tar.zst").headers["content-disposition"] == \
        "attachment; filename*=utf-8''mod%C3%A8le.tar.zst"
    with pytest.raises(RangeNotSatisfiable) as exc:
        serve_range(blobs, key, "bytes=2000-", "m.tar.zst")
    assert exc.value.headers["Content-Range"] == "bytes */1024"
    with pytest.raises(FileNotFoundError):
        serve_range(blobs, "jobs/j/downloads/none", None, "x")


def test_publish_hashes_the_archive_as_it_is_written(settings, tmp_path):
    """MODEL_UPLOAD_COMPLETE carries the SHA-256 of the default archive. The writer takes it as the
    archive goes into the store, so publishing reads none of it back; an archive that was there
    already (an earlier try, or a download while the job compressed) is read back once to hash it."""
    home = open_home(settings)
    spec = JobSpec("sft", SFTConfig(model="m", training_file="file-x", lora=False))
    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_bytes(os.urandom(3 << 20))
    (final / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with home.db.session() as s:
        for job_id in ("ft-fresh", "ft-built"):
            s.add(Job(id=job_id, owner="alice", status="running", model="m", training_file="file-x",
                      config=spec.to_json(home.secret), model_output_name=f"alice/m-{job_id}"))
            s.flush()
            home.blobs.put_dir(f"jobs/{job_id}/out/final", final)
            jobs.record_checkpoint(s, job_id, 4, "Final", f"jobs/{job_id}/out/final")
    with home.db.session() as s:  # an earlier try built the archive and died; the job runs again
        job = s.get(Job, "ft-built")
        job.status = "compressing"
        build_archive(s, home, job, None, None)
        job.status = "running"
    s3 = getattr(home.blobs, "client", None)
    for job_id, reads in (("ft-fresh", 0), ("ft-built", 1)):
        archive = f"jobs/{job_id}/downloads/model.tar.zst"
        with bytes_read(s3) if s3 else nullcontext({}) as got:
            assert _publish(home, job_id, spec) == 0
        with home.db.session() as s:
            job, upload = s.get(Job, job_id), jobs.events(s, job_id)[-2]
            assert job.status == "completed" and upload.type == "MODEL_UPLOAD_COMPLETE"
            with home.blobs.open(archive) as fh:
                assert upload.fields["hash"] == hashlib.sha256(fh.read()).hexdigest()
        if s3:
            assert sum(n for key, n in got.items() if key.endswith(archive)) == reads * home.blobs.size(archive)
