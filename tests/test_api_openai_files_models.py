"""The openai SDK's file and model calls against a live loopback server: a multipart upload with no
`file_name` field, paging, content, delete; `models.retrieve` by a name with slashes, and the 404s.
The same files stay readable through the together 3.x SDK (the 1.x line is covered in
test_api_files_v1_and_clis.py)."""

from __future__ import annotations

import httpx
import openai
import pytest
from together import Together

from conftest import BACKENDS, DATA

CHAT = DATA / "api" / "chat.jsonl"
USER_USER = DATA / "api" / "user_user.jsonl"
TINY = "tunehouse/tiny-llama"


# On S3 the openai SDK's one-shot upload streams through the API into the store.
pytestmark = pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)


def oa(live, key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key or live.key, max_retries=0)


def test_openai_sdk_file_calls(live):
    client = oa(live)
    with open(CHAT, "rb") as fh:
        f = client.files.create(file=fh, purpose="fine-tune")
    assert isinstance(f, openai.types.FileObject)
    assert f.id.startswith("file-") and f.object == "file" and f.purpose == "fine-tune"
    assert (f.filename, f.bytes, f.status) == ("chat.jsonl", CHAT.stat().st_size, "processed")
    assert isinstance(f.created_at, int)

    assert client.files.retrieve(f.id).model_dump() == f.model_dump()
    assert client.files.content(f.id).read() == CHAT.read_bytes()
    assert f.id in [x.id for x in client.files.list()]

    # The same file through the together 3.x SDK, which reads FileType and processing_status.
    tg = Together(base_url=live.url, api_key=live.key, max_retries=0).files.retrieve(f.id)
    assert (tg.file_type, tg.processing_status, tg.bytes) == ("jsonl", "COMPLETED", CHAT.stat().st_size)

    # A file the server's checks refuse is stored with status "error" and says why.
    with open(USER_USER, "rb") as fh:
        bad = client.files.create(file=fh, purpose="fine-tune")
    assert bad.status == "error" and "alternate" in bad.status_details

    deleted = client.files.delete(f.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (f.id, True, "file")
    assert f.id not in [x.id for x in client.files.list()]
    with pytest.raises(openai.NotFoundError) as exc:
        client.files.retrieve(f.id)
    assert exc.value.body["message"] == f"No file with id {f.id!r}. List your files with `tunehouse files list`."


def test_openai_sdk_file_list_pages_and_filters(live):
    client = oa(live)
    ids = []
    for _ in range(3):
        with open(CHAT, "rb") as fh:
            ids.append(client.files.create(file=fh, purpose="fine-tune").id)
    with open(CHAT, "rb") as fh:
        eval_id = client.files.create(file=fh, purpose="eval").id

    first = client.files.list(limit=2, purpose="fine-tune")
    assert [x.id for x in first.data] == ids[:2] and first.has_more is True
    # Auto-paging follows `after` until has_more is false: every file once, in order.
    assert [x.id for x in client.files.list(limit=2, purpose="fine-tune")] == ids
    assert [x.id for x in client.files.list(order="desc")] == [eval_id, *reversed(ids)]
    assert [x.id for x in client.files.list(purpose="eval")] == [eval_id]
    assert oa(live, live.other_key).files.list().data == []

    r = httpx.get(f"{live.url}/v1/files", params={"limit": 0}, headers={"Authorization": f"Bearer {live.key}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_openai_upload_refusals_name_the_field(live):
    h = {"Authorization": f"Bearer {live.key}"}
    r = httpx.post(f"{live.url}/v1/files", headers=h, files={"file": ("notes.txt", b"hello")},
                   data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file_type"
    r = httpx.post(f"{live.url}/v1/files", headers=h, data={"purpose": "fine-tune"})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "Send either `file_name` (the together SDKs' three-step upload) or the bytes as a multipart "
                   "`file` part.", "type": "invalid_request_error", "param": "file_name", "code": None}


def test_models_list_and_retrieve_base(live):
    client = oa(live)
    assert TINY in [m.id for m in client.models.list()]
    m = client.models.retrieve(TINY)  # GET /v1/models/tunehouse/tiny-llama: the slash is part of the id
    assert (m.id, m.object, m.owned_by) == (TINY, "model", "tunehouse")
    for name in ("tunehouse/nope", "alice/tiny-llama-x-12345678", "nope"):
        with pytest.raises(openai.NotFoundError) as exc:
            client.models.retrieve(name)
        assert exc.value.body["code"] == "model_not_found" and repr(name) in exc.value.body["message"]


def test_models_shape_by_client(live):
    """One body cannot serve both lines: the openai SDK builds its page from an object's `data` (a
    bare array makes it raise AttributeError), the together 1.x SDK asserts a bare array."""
    h = {"Authorization": f"Bearer {live.key}"}
    v1 = httpx.get(f"{live.url}/v1/models", headers=h | {"User-Agent": "Together/v1 PythonBindings/1.6.0"}).json()
    other = httpx.get(f"{live.url}/v1/models", headers=h).json()
    assert isinstance(v1, list) and other["object"] == "list" and other["data"] == v1
