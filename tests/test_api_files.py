"""The Files API over a live loopback server, driven by the official together 3.x SDK and raw
httpx for the wire details (error shape, 302, signed PUT, multipart, ownership)."""

from __future__ import annotations

import hashlib
import os
import time

import httpx
import pytest
import together
from together import Together
from together.lib.resources.files import FileAlreadyExistsError

from conftest import BACKENDS, DATA

pytestmark = pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
CHAT = DATA / "api" / "chat.jsonl"
USER_USER = DATA / "api" / "user_user.jsonl"


def sdk(live, key=None, v1_base=False) -> Together:
    return Together(base_url=live.url + ("/v1" if v1_base else ""), api_key=key or live.key, max_retries=0)


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_v3_sdk_upload_list_retrieve_content_delete(live):
    client = sdk(live)
    f = client.files.upload(CHAT, purpose="fine-tune")
    assert f.id.startswith("file-") and f.object == "file"
    assert f.bytes == CHAT.stat().st_size and f.file_type == "jsonl" and f.purpose == "fine-tune"
    assert f.processing_status == "COMPLETED"

    assert f.id in [x.id for x in client.files.list().data]
    got = client.files.retrieve(f.id)
    assert (got.filename, got.bytes) == ("chat.jsonl", CHAT.stat().st_size)
    assert got.to_dict()["LineCount"] == 5
    assert client.files.content(f.id).read() == CHAT.read_bytes()

    client.files.delete(f.id)
    assert f.id not in [x.id for x in client.files.list().data]
    with pytest.raises(together.NotFoundError) as exc:
        client.files.retrieve(f.id)
    assert f.id in exc.value.body["error"]["message"]


def test_both_base_url_styles_work(live):
    f = sdk(live, v1_base=True).files.upload(CHAT)  # v3 misconfigured with /v1: /v1/v1/files
    assert sdk(live).files.retrieve(f.id).id == f.id
    r = httpx.get(f"{live.url}/files/{f.id}", headers=auth(live.key))  # unversioned, v1-style
    assert r.status_code == 200 and r.json()["id"] == f.id


def test_another_owner_gets_404_never_the_object(live):
    f = sdk(live).files.upload(CHAT)
    bob = sdk(live, live.other_key)
    assert f.id not in [x.id for x in bob.files.list().data]
    for call in (lambda: bob.files.retrieve(f.id), lambda: bob.files.content(f.id).read(),
                 lambda: bob.files.delete(f.id)):
        with pytest.raises(together.NotFoundError):
            call()
    assert sdk(live).files.retrieve(f.id).id == f.id  # bob's delete did nothing


def test_duplicate_checksum_is_409_without_retries(live):
    client = sdk(live)
    first = client.files.upload(CHAT)
    sent = []
    counting = httpx.Client(event_hooks={"request": [lambda r: sent.append((r.method, r.url.path))]})
    again = Together(base_url=live.url, api_key=live.key, http_client=counting).files.upload(CHAT)  # retries on
    assert again.id == first.id
    # x-should-retry: false stops the v3 retry loop: the refused create is sent once
    assert sent.count(("POST", "/v1/files")) == 1, sent
    with pytest.raises(FileAlreadyExistsError):
        client.files.upload(CHAT, raise_if_already_exists=True)

    checksum = hashlib.sha256(CHAT.read_bytes()).hexdigest()
    r = httpx.post(f"{live.url}/v1/files", headers=auth(live.key),
                   data={"purpose": "fine-tune", "file_name": "chat.jsonl", "file_type": "jsonl", "checksum": checksum})
    assert r.status_code == 409 and r.headers["x-should-retry"] == "false"
    assert r.json()["file_id"] == first.id and "already uploaded" in r.json()["error"]["message"]


def test_semantic_errors_reported_in_validation_report(live):
    f = sdk(live).files.upload(USER_USER, check=False)  # v3 no longer checks semantics locally
    assert f.processing_status == "FAILED"
    report = sdk(live).files.retrieve(f.id).validation_report  # upload() drops the report
    assert report.valid is False
    errors = report.to_dict()["errors"]
    assert any(e["line"] == 2 and e["rule"] == "role_alternation" for e in errors), errors
    assert "line 2" in report.error


def test_error_shape_everywhere(live):
    r = httpx.get(f"{live.url}/v1/files")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    r = httpx.get(f"{live.url}/v1/files", headers=auth("th-wrong"))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{live.url}/v1/nothing-here", headers=auth(live.key))
    assert r.status_code == 404 and "No route" in r.json()["error"]["message"]
    r = httpx.post(f"{live.url}/v1/files", headers=auth(live.key), data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file_name"
    r = httpx.post(f"{live.url}/v1/files", headers=auth(live.key),
                   data={"purpose": "training", "file_name": "a.jsonl"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    assert "fine-tune" in r.json()["error"]["message"]
    r = httpx.post(f"{live.url}/v1/files", headers=auth(live.key),
                   data={"purpose": "fine-tune", "file_name": "notes.txt"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file_type"
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{live.url}/v3/whoami", headers=auth(live.key)).json()["project"]["id"] == "alice"


def _begin(live, name="chat.jsonl", checksum=None):
    data = {"purpose": "fine-tune", "file_name": name, "file_type": "jsonl"}
    if checksum:
        data["checksum"] = checksum
    r = httpx.post(f"{live.url}/v1/files", headers=auth(live.key), data=data)
    assert r.status_code == 302
    # The local store takes the bytes itself; S3 gets them straight, through a presigned URL.
    assert r.headers["Location"].startswith(os.environ["AWS_ENDPOINT_URL"] + "/" if _s3(live) else live.url + "/v1/files/")
    return r.headers["X-Together-File-Id"], r.headers["Location"]


def _s3(live) -> bool:
    return bool(live.settings.blob_url)


def _preprocess(live, file_id):
    return httpx.post(f"{live.url}/v1/files/{file_id}/preprocess", headers=auth(live.key))


def _listed(live) -> list[str]:
    return [f["id"] for f in httpx.get(f"{live.url}/v1/files", headers=auth(live.key)).json()["data"]]


def _blobs(live, file_id) -> list[str]:
    """Every object of the file (and, on S3, open multipart upload), listed through the store."""
    blobs = live.app.state.home.blobs
    keys = [b.key for top in ("files", "uploads") for b in blobs.list(top) if file_id in b.key]
    if _s3(live):
        keys += [u["Key"] for u in blobs.client.list_multipart_uploads(Bucket=blobs.bucket).get("Uploads", ())
                 if file_id in u["Key"]]
    return keys


def test_signed_put_is_single_use_and_tamper_proof(live):
    file_id, location = _begin(live)
    assert file_id not in _listed(live), "nothing is listed before the bytes arrive"
    forged = location[:-3] + ("AAA" if not location.endswith("AAA") else "BBB")
    assert httpx.put(forged, content=CHAT.read_bytes()).status_code == (403 if _s3(live) else 401)
    assert httpx.put(location, content=CHAT.read_bytes()).status_code == 200
    if _s3(live):
        # The store cannot count PUTs: the claim (preprocess) is what is single-use, and bytes
        # PUT after it never reach the file.
        assert _preprocess(live, file_id).json()["processing_status"] == "COMPLETED"
        assert httpx.put(location, content=b"{}\n").status_code == 200
        assert _preprocess(live, file_id).status_code == 200
        assert sdk(live).files.content(file_id).read() == CHAT.read_bytes()
    else:
        again = httpx.put(location, content=CHAT.read_bytes())
        assert again.status_code == 401 and "already used" in again.json()["error"]["message"]
    other_id, _ = _begin(live, "b.jsonl")
    stolen = location.replace(file_id, other_id)
    assert httpx.put(stolen, content=b"{}\n").status_code == (403 if _s3(live) else 401)
    assert file_id in _listed(live)


def test_expired_upload_url_is_refused(live):
    live.settings.upload_token_ttl_s = 1 if _s3(live) else -1  # S3 signs 1 s at least
    _, location = _begin(live)
    if _s3(live):
        time.sleep(2)
    r = httpx.put(location, content=CHAT.read_bytes())
    if _s3(live):
        assert r.status_code == 403 and "expired" in r.text
    else:
        assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_checksum_mismatch_leaves_nothing_listed(live):
    file_id, location = _begin(live, checksum="0" * 64)
    r = httpx.put(location, content=CHAT.read_bytes())
    if _s3(live):  # the store takes any bytes; the claim compares them
        assert r.status_code == 200
        r = _preprocess(live, file_id)
    assert r.status_code == 400 and "checksum" in r.json()["error"]["message"]
    assert file_id not in _listed(live)
    assert _blobs(live, file_id) == []
    if not _s3(live):
        assert not list((live.settings.blobs_path / ".tmp").iterdir()), "no temp file left behind"


def test_claim_and_check_read_the_bytes_from_s3_once(live, tmp_path):
    """Preprocess on S3 hashes a presigned PUT's bytes for the checksum and validates them: one
    read from the store for both (into the cache the validator reads), not one each."""
    if not _s3(live):
        pytest.skip("the local store takes the bytes itself: there is nothing to claim")
    from services.s3 import bytes_read

    data = _big_chat(tmp_path)
    file_id, location = _begin(live, checksum=hashlib.sha256(data).hexdigest())
    assert httpx.put(location, content=data).status_code == 200
    with bytes_read(live.app.state.home.blobs.client) as got:
        r = _preprocess(live, file_id)
    assert r.status_code == 200 and r.json()["processing_status"] == "COMPLETED", r.text
    assert r.json()["bytes"] == len(data)
    assert sum(got.values()) == len(data), got
    assert sdk(live).files.content(file_id).read() == data


def test_too_large_upload_is_refused_and_dropped(live):
    live.settings.max_file_bytes = 100
    file_id, location = _begin(live)
    r = httpx.put(location, content=CHAT.read_bytes())
    if _s3(live):  # a presigned PUT cannot cap the size: the claim refuses it
        assert r.status_code == 200
        r = _preprocess(live, file_id)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert file_id not in _listed(live) and _blobs(live, file_id) == []


def test_interrupted_put_leaves_nothing(live):
    file_id, location = _begin(live)

    def body():
        yield CHAT.read_bytes()[:50]
        raise ConnectionAbortedError("client died")

    with pytest.raises(Exception):
        httpx.put(location, content=body(), headers={"Content-Length": str(CHAT.stat().st_size)})
    time.sleep(0.3)
    assert file_id not in _listed(live)
    assert _blobs(live, file_id) == []
    if _s3(live):
        r = _preprocess(live, file_id)
        assert r.status_code == 400 and "have not arrived" in r.json()["error"]["message"]
    assert httpx.put(location, content=CHAT.read_bytes()).status_code == 200, "the same URL can retry"


def test_interrupted_uploads_are_swept_from_the_store(live, tmp_path):
    """A PUT that never completes and a multipart upload with half its parts: neither is listed,
    and once their URLs expire the sweep (run by the next upload) leaves no object and no open
    multipart upload in the store (on S3: the bucket itself is listed)."""
    data = _big_chat(tmp_path)
    single, location = _begin(live)
    with pytest.raises(Exception):
        httpx.put(location, content=_dies_after(data[:1000]), headers={"Content-Length": str(len(data))})
    init = _initiate(live, data, 2)
    part = init["parts"][0]
    assert httpx.put(part["URL"], content=data[:6 << 20], headers=part["Headers"]).status_code == 200
    for file_id in (single, init["file_id"]):
        assert file_id not in _listed(live)
    assert _blobs(live, init["file_id"]), "the half-sent upload is in the store before the sweep"
    live.settings.upload_token_ttl_s = -61  # every upload URL (and its 60 s grace) expired
    _begin(live, "next.jsonl")
    for file_id in (single, init["file_id"]):
        assert _blobs(live, file_id) == []
    if _s3(live):
        from services.s3 import list_bucket

        assert list_bucket(live.app.state.home.blobs.bucket) == ([], [])


def _dies_after(chunk: bytes):
    yield chunk
    raise ConnectionAbortedError("client died")


def _big_chat(tmp_path) -> bytes:
    """A valid chat dataset just over 6 MiB: S3 wants every part but the last at 5 MiB or more."""
    line = CHAT.read_bytes().splitlines(keepends=True)[0]
    return line * ((6 << 20) // len(line) + 1)


def _initiate(live, data: bytes, num_parts: int) -> dict:
    r = httpx.post(f"{live.url}/v1/files/multipart/initiate", headers=auth(live.key),
                   json={"file_name": "chat.jsonl", "file_size": len(data), "num_parts": num_parts,
                         "purpose": "fine-tune", "file_type": "jsonl"})
    assert r.status_code == 200, r.text
    return r.json()


def test_one_shot_upload(live):
    with open(CHAT, "rb") as fh:
        r = httpx.post(f"{live.url}/v1/files/upload", headers=auth(live.key),
                       data={"purpose": "fine-tune", "file_name": "chat.jsonl"}, files={"file": fh})
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["bytes"] == CHAT.stat().st_size and f["processing_status"] == "COMPLETED"
    assert f["id"] in _listed(live)


def test_multipart_flow(live, tmp_path):
    data = _big_chat(tmp_path)
    cut = 5 << 20
    init = _initiate(live, data, 2)
    etags = []
    for part, chunk in zip(init["parts"], (data[:cut], data[cut:])):
        put = httpx.put(part["URL"], content=chunk, headers=part["Headers"])
        assert put.status_code == 200 and put.headers["ETag"]
        etags.append({"part_number": part["PartNumber"], "etag": put.headers["ETag"]})
    assert init["file_id"] not in _listed(live)
    bad = [etags[0], {"part_number": 2, "etag": '"' + "0" * 32 + '"'}]
    r = httpx.post(f"{live.url}/v1/files/multipart/complete", headers=auth(live.key),
                   json={"upload_id": init["upload_id"], "file_id": init["file_id"], "parts": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "parts"
    r = httpx.post(f"{live.url}/v1/files/multipart/complete", headers=auth(live.key),
                   json={"upload_id": init["upload_id"], "file_id": init["file_id"], "parts": etags})
    assert r.status_code == 200, r.text
    assert r.json()["processing_status"] == "COMPLETED"
    assert sdk(live).files.content(init["file_id"]).read() == data
    assert _blobs(live, init["file_id"]) == [f"files/{init['file_id']}.jsonl"], "no part left behind"

    r = httpx.post(f"{live.url}/v1/files/multipart/initiate", headers=auth(live.key),
                   json={"file_name": "x.jsonl", "file_size": 10, "num_parts": 1})
    abort = httpx.post(f"{live.url}/v1/files/multipart/abort", headers=auth(live.key),
                       json={"upload_id": r.json()["upload_id"], "file_id": r.json()["file_id"]})
    assert abort.status_code == 200 and r.json()["file_id"] not in _listed(live)
    assert _blobs(live, r.json()["file_id"]) == []


def test_v3_sdk_multipart_upload(live, tmp_path, monkeypatch):
    """The SDK's own multipart path (normally above 5 GB), made to run on 6 MiB in two parts: on
    S3 its parts go to presigned UploadPart URLs and the store checks their ETags."""
    import together.lib.resources.files as sdk_files

    monkeypatch.setattr(sdk_files, "MULTIPART_THRESHOLD_GB", 0.001)
    monkeypatch.setattr(sdk_files, "TARGET_PART_SIZE_MB", 5)
    path = tmp_path / "big.jsonl"
    path.write_bytes(_big_chat(tmp_path))
    seen = []
    http = httpx.Client(event_hooks={"request": [lambda r: seen.append((r.method, r.url.path))]})
    f = Together(base_url=live.url, api_key=live.key, max_retries=0, http_client=http).files.upload(path)
    assert ("POST", "/v1/files/multipart/initiate") in seen and ("POST", "/v1/files/multipart/complete") in seen
    assert len([m for m, _ in seen if m == "PUT"]) == 2
    assert f.processing_status == "COMPLETED" and f.bytes == path.stat().st_size
    assert sdk(live).files.content(f.id).read() == path.read_bytes()
    assert _blobs(live, f.id) == [f"files/{f.id}.jsonl"]


def test_dashboard_upload_goes_through_the_server(live):
    """The browser's PUT stays on the API's origin (no CORS needed on the bucket), also on S3."""
    from tunehouse.api.auth import WEB_HEADER

    r = httpx.post(f"{live.url}/v1/files", headers=auth(live.key) | {WEB_HEADER: "1"},
                   data={"purpose": "fine-tune", "file_name": "chat.jsonl", "file_type": "jsonl"})
    assert r.status_code == 200 and r.json()["upload_url"].startswith(live.url + "/v1/files/")
    assert httpx.put(r.json()["upload_url"], content=CHAT.read_bytes()).status_code == 200
    assert _preprocess(live, r.json()["id"]).json()["processing_status"] == "COMPLETED"
    assert _blobs(live, r.json()["id"]) == [f"files/{r.json()['id']}.jsonl"]


def test_content_range(live):
    f = sdk(live).files.upload(CHAT)
    r = httpx.get(f"{live.url}/v1/files/{f.id}/content", headers=auth(live.key) | {"Range": "bytes=10-"})
    assert r.status_code == 206 and r.content == CHAT.read_bytes()[10:]
    assert r.headers["content-range"] == f"bytes 10-{CHAT.stat().st_size - 1}/{CHAT.stat().st_size}"


def test_file_type_refused_on_the_client(live):
    with pytest.raises(together.FileTypeError):
        sdk(live).files.upload(DATA / "api" / "notes.txt")
