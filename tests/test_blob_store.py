"""The blob store contract, run against both backends: the local folder and S3 (a real SeaweedFS
that checks signatures). Backend-only features (presigned transfers, the cache, multipart sweeps)
have their own tests below, on S3."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import BACKENDS, backend_settings
from tunehouse.settings import Settings
from tunehouse.store.blob_cache import BlobCache
from tunehouse.store.blobs import open_blobs

# The contract runs on both backends; what only S3 has (presigned transfers, the cache, multipart
# sweeps, start-up checks) runs on `remote` alone.
both = pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
s3 = pytest.mark.parametrize("store_backend", ["remote"], indirect=True)

MIB = 1 << 20


@pytest.fixture
def store(tmp_path, store_backend, request):
    s = Settings(home=tmp_path / "home", **backend_settings(request, store_backend))
    return open_blobs(s)


def bucket_of(store) -> str:
    return store.bucket


@both
def test_write_commit_abort(store):
    with store.writer("files/a.jsonl") as w:
        w.write(b"hello ")
        w.write(b"world")
        assert not store.exists("files/a.jsonl")  # nothing visible before the commit
        w.commit()
    assert store.open("files/a.jsonl").read() == b"hello world"
    assert w.sha256 == hashlib.sha256(b"hello world").hexdigest() and w.size == 11
    with pytest.raises(RuntimeError):
        with store.writer("files/b.jsonl") as w:
            w.write(b"x" * (9 * MIB))  # past one part on S3: a multipart upload is open
            raise RuntimeError("client went away")
    assert not store.exists("files/b.jsonl")
    assert [b.key for b in store.list("files")] == ["files/a.jsonl"]
    with pytest.raises(FileNotFoundError):
        store.size("files/none")
    with pytest.raises(FileNotFoundError):
        store.open("files/none").read()


@both
def test_stream_multi_mib_and_ranges(store):
    data = os.urandom(3 * MIB) + bytes(range(256)) * 4096 * 2 + b"tail"  # ~5 MiB
    with store.writer("jobs/j/out.bin", md5=True) as w:
        for i in range(0, len(data), 300_001):
            w.write(data[i:i + 300_001])
        w.commit()
    assert w.md5 == hashlib.md5(data).hexdigest()
    assert store.size("jobs/j/out.bin") == len(data)
    n = len(data)
    for start, end in [(0, 0), (0, 1), (n - 1, n - 1), (MIB - 1, MIB), (5, n - 1), (0, n - 1)]:
        assert b"".join(store.read_range("jobs/j/out.bin", start, end)) == data[start:end + 1], (start, end)
    with store.open("jobs/j/out.bin") as fh:
        assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest()


@both
def test_big_blob_multipart_streams(store, store_backend):
    """40 MiB through the writer (five parts on S3) in bounded memory, read back identical."""
    import tracemalloc

    block = os.urandom(MIB)
    tracemalloc.start()
    with store.writer("jobs/j/big") as w:
        for i in range(40):
            w.write(block[i:] + block[:i])
        w.commit()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 24 * MIB, f"the writer held {peak / MIB:.0f} MiB"  # one 8 MiB part (and its copy), not 40
    h = hashlib.sha256()
    for i in range(40):
        h.update(block[i:] + block[:i])
    got = hashlib.sha256()
    for chunk in store.read_range("jobs/j/big", 0, 40 * MIB - 1):
        got.update(chunk)
    assert got.hexdigest() == h.hexdigest() == w.sha256


@both
def test_copy_only_while_unchanged(store):
    """Past 8 MiB S3 copies in UploadPartCopy parts; `if_etag` refuses a source that changed."""
    data = os.urandom(MIB) * 10
    store.put_bytes("uploads/file-c", data)
    info = store.head("uploads/file-c")
    assert info.size == len(data)
    store.copy("uploads/file-c", "files/file-c.jsonl", if_etag=info.etag)
    assert store.size("files/file-c.jsonl") == len(data)
    assert b"".join(store.read_range("files/file-c.jsonl", len(data) - 5, len(data) - 1)) == data[-5:]
    if info.etag:  # S3: a re-sent upload between the check and the copy is not copied
        store.put_bytes("uploads/file-c", b"replaced")
        with pytest.raises(ValueError):
            store.copy("uploads/file-c", "files/file-d.jsonl", if_etag=info.etag)
        assert not store.exists("files/file-d.jsonl")


@both
def test_list_put_dir_replace_and_delete(store, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "old.bin").write_bytes(b"old")
    (src / "sub" / "w.safetensors").write_bytes(b"w" * 1000)
    store.put_dir("jobs/j/step-1", src)
    store.put_bytes("jobs/j/step-10/x", b"not a sibling of step-1")
    assert [b.key for b in store.list("jobs/j/step-1")] == [
        "jobs/j/step-1/a.json", "jobs/j/step-1/old.bin", "jobs/j/step-1/sub/w.safetensors"]
    assert [b.size for b in store.list("jobs/j/step-1")] == [2, 3, 1000]
    (src / "old.bin").unlink()
    (src / "new.bin").write_bytes(b"new")
    store.put_dir("jobs/j/step-1", src)  # replaces: the stale file goes
    assert [b.key for b in store.list("jobs/j/step-1")] == [
        "jobs/j/step-1/a.json", "jobs/j/step-1/new.bin", "jobs/j/step-1/sub/w.safetensors"]
    local = store.local_dir("jobs/j/step-1")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "a.json", "new.bin", "sub/w.safetensors"]
    assert (local / "sub" / "w.safetensors").read_bytes() == b"w" * 1000
    store.delete("jobs/j/step-1")  # a prefix: step-10 is not under it
    assert store.list("jobs/j/step-1") == [] and store.exists("jobs/j/step-10/x")
    with pytest.raises(FileNotFoundError):
        store.local_dir("jobs/j/step-1")
    store.delete("jobs/j")  # the key and everything under it
    assert store.list("jobs") == []
    store.delete("jobs/never")  # no error


@both
def test_local_file_contents_and_mode(store):
    store.put_bytes("files/f.jsonl", b'{"text": "hi"}\n')
    p = store.local_file("files/f.jsonl")
    assert p.read_bytes() == b'{"text": "hi"}\n'
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    with pytest.raises(FileNotFoundError):
        store.local_file("files/none.jsonl")


@s3
def test_cache_refetches_a_replaced_blob(store, store_backend):
    store.put_bytes("files/f.jsonl", b"version one")
    p1 = store.local_file("files/f.jsonl")
    assert p1.read_bytes() == b"version one"
    assert store.local_file("files/f.jsonl") == p1  # a hit: same copy
    store.put_bytes("files/f.jsonl", b"version two!")
    assert store.local_file("files/f.jsonl").read_bytes() == b"version two!"
    entry = p1.parent.parent
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.cache.root.stat().st_mode) == 0o700


@s3
def test_cache_evicts_least_recently_used(store, store_backend, tmp_path):
    store.cache.max_bytes = 250
    for name in "abc":
        store.put_bytes(f"files/{name}", name.encode() * 100)
    a = store.local_file("files/a")
    time.sleep(0.02)
    store.local_file("files/b")
    time.sleep(0.02)
    store.local_file("files/a")  # a is now more recent than b
    time.sleep(0.02)
    store.local_file("files/c")  # 300 bytes > 250: the least recently used (b) goes
    cached = {e.name for e in store.cache.root.iterdir() if e.name != ".tmp"}
    assert cached == {store.cache.entry("files/a").name, store.cache.entry("files/c").name}
    assert a.read_bytes() == b"a" * 100 and store.cache.size() == 200
    assert store.local_file("files/b").read_bytes() == b"b" * 100  # refetched on demand


def test_cache_sweep_spares_a_fill_in_progress(tmp_path):
    """A crashed fill's temp folder goes; one whose file is still being written stays, however
    old its folder (a 50 GB download outlasts any grace period)."""
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    past = time.time() - 7200
    for name in ("crashed", "busy"):
        (cache.root / ".tmp" / name).mkdir()
        (cache.root / ".tmp" / name / "data").write_bytes(b"x")
        os.utime(cache.root / ".tmp" / name, (past, past))
    os.utime(cache.root / ".tmp" / "crashed" / "data", (past, past))
    cache.sweep_temp(3600)
    assert [p.name for p in (cache.root / ".tmp").iterdir()] == ["busy"]


FILL = """
import sys
from pathlib import Path
from tunehouse.store.s3_blobs import S3BlobStore
s = S3BlobStore(sys.argv[1], Path(sys.argv[2]), 1 << 30)
p = s.local_file("files/big")
print(len(p.read_bytes()))
"""


@s3
def test_concurrent_fills_of_one_entry(store, store_backend):
    """Three processes fill the same cache entry at once: each reads the whole blob, and one
    complete copy (no temp leftovers) stays."""
    data = os.urandom(12 * MIB)
    store.put_bytes("files/big", data)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", FILL, store.url, str(store.cache.root)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == [str(len(data))] * 3
    assert store.local_file("files/big").read_bytes() == data
    assert list((store.cache.root / ".tmp").iterdir()) == []


@s3
def test_presigned_put_get_and_tamper(store, store_backend):
    put = store.presigned_put("uploads/file-x", 60)
    r = httpx.put(put, content=b"straight to the store", headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    get = store.presigned_get("uploads/file-x", 60, filename="x.jsonl")
    r = httpx.get(get)
    assert r.content == b"straight to the store"
    assert 'filename="x.jsonl"' in r.headers["content-disposition"]
    r = httpx.get(get, headers={"Range": "bytes=9-"})
    assert r.status_code == 206 and r.content == b"to the store"
    store.put_bytes("files/secret", b"someone else's")
    assert httpx.get(get.replace("uploads/file-x", "files/secret")).status_code == 403
    assert httpx.put(put.replace("X-Amz-Expires=60", "X-Amz-Expires=6000"), content=b"x").status_code == 403
    assert httpx.get(get.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    assert store.open("uploads/file-x").read() == b"straight to the store"


@s3
def test_presigned_multipart(store, store_backend):
    upload_id = store.multipart_begin("uploads/file-m")
    parts = [os.urandom(5 * MIB), b"last part"]
    etags = []
    for n, data in enumerate(parts, 1):
        r = httpx.put(store.presigned_part("uploads/file-m", upload_id, n, 60), content=data)
        assert r.status_code == 200, r.text
        etags.append((n, r.headers["etag"].strip('"')))
    assert not store.exists("uploads/file-m")
    store.multipart_complete("uploads/file-m", upload_id, etags)
    assert store.size("uploads/file-m") == 5 * MIB + 9


@s3
def test_sweep_orphans_and_stale_multipart(store, store_backend):
    from services.s3 import list_bucket

    store.put_bytes("files/file-kept.jsonl", b"1")
    store.put_bytes("files/file-gone.jsonl", b"2")
    store.put_bytes("uploads/file-gone2", b"3")
    store.put_bytes("jobs/j/x", b"4")
    stale = store.multipart_begin("uploads/file-gone3")
    httpx.put(store.presigned_part("uploads/file-gone3", stale, 1, 60), content=b"half")
    kept_up = store.multipart_begin("uploads/file-kept")
    assert store.sweep_orphans({"file-kept"}, older_than_s=3600) == []  # all too young
    gone = store.sweep_orphans({"file-kept"}, older_than_s=0)
    assert sorted(g.split(" ")[0] for g in gone) == ["files/file-gone.jsonl", "uploads/file-gone2", "uploads/file-gone3"]
    keys, uploads = list_bucket(bucket_of(store))
    assert sorted(keys) == ["th/files/file-kept.jsonl", "th/jobs/j/x"]
    assert uploads == ["th/uploads/file-kept"]
    store.delete("uploads/file-kept")  # deleting a row's key aborts its open multipart upload too
    assert list_bucket(bucket_of(store))[1] == [] and kept_up


@s3
def test_crashed_writer_multipart_swept(store, store_backend):
    from services.s3 import list_bucket

    w = store.writer("jobs/j/weights").__enter__()
    w.write(b"x" * (9 * MIB))  # a part sent, then the process "dies" (no abort)
    assert list_bucket(bucket_of(store))[1] == ["th/jobs/j/weights"]
    store.sweep_temp(older_than_s=3600)
    assert list_bucket(bucket_of(store))[1] == ["th/jobs/j/weights"]  # young: maybe still writing
    store.sweep_temp(older_than_s=0)
    assert list_bucket(bucket_of(store)) == ([], [])


@s3
def test_clear_errors_at_start(store_backend, tmp_path, request):
    from services.s3 import s3_server
    from tunehouse.store.s3_blobs import BlobStoreError, S3BlobStore

    s3_server(request)
    with pytest.raises(BlobStoreError, match="bucket 'no-such-bucket' does not exist.*TUNEHOUSE_BLOB_URL"):
        S3BlobStore("s3://no-such-bucket/x", tmp_path / "c", 1 << 20)
    bucket = backend_settings(request, "remote")["blob_url"]
    os.environ["AWS_SECRET_ACCESS_KEY"], saved = "wrong", os.environ["AWS_SECRET_ACCESS_KEY"]
    try:
        with pytest.raises(BlobStoreError, match="refused the credentials.*AWS_SECRET_ACCESS_KEY"):
            S3BlobStore(bucket, tmp_path / "c", 1 << 20)
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = saved
