"""Hostile client input over a live loopback server: each request below gets its 4xx naming the
field at fault, never a 500, and the kept-alive connection it came on answers the next request.
Then ownership: another owner's key gets 404 on every owned-resource route, no key gets 401."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from conftest import DATA, _serve
from tunehouse.settings import Settings

TINY = "tunehouse/tiny-llama"
CHAT = (DATA / "api" / "chat.jsonl").read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_cache):
    """One server for the module, no worker: jobs stay queued, which is all ownership needs."""
    home = tmp_path_factory.mktemp("hostile") / "home"
    live, bg = _serve(Settings(home=home, embedded_worker=False, model_cache=model_cache))
    yield live
    bg.stop()


@pytest.fixture(scope="module")
def owned(server):
    """Alice's file, queued job, stopped endpoint and open multipart upload (ids by kind)."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"}, timeout=60) as c:
        f = c.post("/v1/files/upload", files={"file": ("chat.jsonl", CHAT)}, data={"purpose": "fine-tune"})
        assert f.status_code == 200, f.text
        job = c.post("/v1/fine-tunes", json={"training_file": f.json()["id"], "model": TINY, "n_epochs": 1})
        assert job.status_code == 200, job.text
        ep = c.post("/v1/endpoints", json={"model": TINY, "hardware": "1x_cpu", "state": "STOPPED"})
        assert ep.status_code == 200, ep.text
        mp = c.post("/v1/files/multipart/initiate", json={"file_name": "big.jsonl", "file_size": 12 << 20,
                                                          "num_parts": 2, "purpose": "fine-tune"})
        assert mp.status_code == 200, mp.text
    return {"file": f.json()["id"], "job": job.json()["id"], "endpoint": ep.json()["id"], "multipart": mp.json()}


def _token(raw: bytes, mac: str = "AAAA") -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=") + "." + mac


def _chat(**kw) -> dict:
    return {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | kw


def _msg(**kw) -> dict:
    return _chat(messages=[{"role": "user", "content": "hi"} | kw])


# (id, method, path, request kwargs, status, error.param or None when no one field is at fault)
CASES = [
    # -- chat: the reported shapes, then types, ranges, enums, sizes ---------------------------
    ("content-int", "POST", "/v1/chat/completions", {"json": _msg(content=5)}, 400, "messages.0.content"),
    ("content-list-of-str", "POST", "/v1/chat/completions", {"json": _msg(content=["a", "b"])}, 400,
     "messages.0.content.0"),
    ("message-without-role", "POST", "/v1/chat/completions", {"json": _chat(messages=[{"content": "x"}])}, 400,
     "messages.0.role"),
    ("role-int", "POST", "/v1/chat/completions", {"json": _msg(role=7)}, 400, "messages.0.role"),
    ("role-unknown", "POST", "/v1/chat/completions", {"json": _msg(role="wizard")}, 400, "messages.0.role"),
    ("part-type-unknown", "POST", "/v1/chat/completions", {"json": _msg(content=[{"type": "video"}])}, 400,
     "messages.0.content.0.type"),
    ("part-text-int", "POST", "/v1/chat/completions", {"json": _msg(content=[{"type": "text", "text": 5}])},
     400, "messages.0.content.0.text"),
    ("message-not-object", "POST", "/v1/chat/completions", {"json": _chat(messages=[5])}, 400, "messages.0"),
    ("messages-string", "POST", "/v1/chat/completions", {"json": _chat(messages="hi")}, 400, "messages"),
    ("messages-empty", "POST", "/v1/chat/completions", {"json": _chat(messages=[])}, 400, "messages"),
    ("logprobs-negative", "POST", "/v1/chat/completions", {"json": _chat(logprobs=-5)}, 400, "logprobs"),
    ("logprobs-21", "POST", "/v1/chat/completions", {"json": _chat(logprobs=21)}, 400, "logprobs"),
    ("top-logprobs-99", "POST", "/v1/chat/completions", {"json": _chat(top_logprobs=99)}, 400, "top_logprobs"),
    ("seed-2**80", "POST", "/v1/chat/completions", {"json": _chat(seed=2**80)}, 400, "seed"),
    ("seed-below-int64", "POST", "/v1/chat/completions", {"json": _chat(seed=-(2**63) - 1)}, 400, "seed"),
    ("seed-string", "POST", "/v1/chat/completions", {"json": _chat(seed="abc")}, 400, "seed"),
    ("temperature-nan", "POST", "/v1/chat/completions",
     {"content": '{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
      "headers": {"content-type": "application/json"}}, 400, "temperature"),
    ("top-p-infinity", "POST", "/v1/chat/completions",
     {"content": '{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
      "headers": {"content-type": "application/json"}}, 400, "top_p"),
    ("presence-penalty-huge", "POST", "/v1/chat/completions", {"json": _chat(presence_penalty=1e308)}, 400,
     "presence_penalty"),
    ("temperature-string", "POST", "/v1/chat/completions", {"json": _chat(temperature="hot")}, 400, "temperature"),
    ("top-k-2**80", "POST", "/v1/chat/completions", {"json": _chat(top_k=2**80)}, 400, "top_k"),
    ("repetition-penalty-1e-300", "POST", "/v1/chat/completions", {"json": _chat(repetition_penalty=1e-300)}, 400,
     "repetition_penalty"),
    ("n-zero", "POST", "/v1/chat/completions", {"json": _chat(n=0)}, 400, "n"),
    ("n-huge", "POST", "/v1/chat/completions", {"json": _chat(n=10**6)}, 400, "n"),
    ("max-tokens-negative", "POST", "/v1/chat/completions", {"json": _chat(max_tokens=-1)}, 400, "max_tokens"),
    ("max-tokens-2**80", "POST", "/v1/chat/completions", {"json": _chat(max_tokens=2**80)}, 400, "max_tokens"),
    ("stop-too-many", "POST", "/v1/chat/completions", {"json": _chat(stop=["x"] * 100)}, 400, "stop"),
    ("stream-object", "POST", "/v1/chat/completions", {"json": _chat(stream={"a": 1})}, 400, "stream"),
    ("model-missing", "POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}]}},
     400, "model"),
    ("model-overlong", "POST", "/v1/chat/completions", {"json": _chat(model="m" * 100_000)}, 400, "model"),
    ("model-unknown", "POST", "/v1/chat/completions", {"json": _chat(model="nobody/nothing")}, 404, None),
    ("image-part-text-model", "POST", "/v1/chat/completions",
     {"json": _msg(content=[{"type": "image_url", "image_url": {"url": "data:,"}}])}, 400, "messages"),
    ("body-nested-5000", "POST", "/v1/chat/completions",
     {"content": "[" * 5000 + "]" * 5000, "headers": {"content-type": "application/json"}}, 400, "body"),
    ("body-not-json", "POST", "/v1/chat/completions",
     {"content": "{not json", "headers": {"content-type": "application/json"}}, 400, "body"),
    ("body-json-array", "POST", "/v1/chat/completions", {"json": [1, 2]}, 400, "body"),
    ("completion-prompt-int", "POST", "/v1/completions", {"json": {"model": TINY, "prompt": 5}}, 400, "prompt"),
    ("completion-no-prompt", "POST", "/v1/completions", {"json": {"model": TINY}}, 400, "prompt"),
    # -- files -----------------------------------------------------------------------------------
    ("file-name-newline", "POST", "/v1/files", {"data": {"file_name": "a\nb.jsonl"}}, 400, "file_name"),
    ("file-name-nul", "POST", "/v1/files", {"data": {"file_name": "a\x00b.jsonl"}}, 400, "file_name"),
    ("file-name-rlo", "POST", "/v1/files", {"data": {"file_name": "a\u202egpj.jsonl"}}, 400, "file_name"),
    ("file-name-overlong", "POST", "/v1/files", {"data": {"file_name": "a" * 300 + ".jsonl"}}, 400, "file_name"),
    ("file-name-folder", "POST", "/v1/files", {"data": {"file_name": "../x.jsonl"}}, 400, "file_name"),
    ("file-purpose-unknown", "POST", "/v1/files", {"data": {"file_name": "a.jsonl", "purpose": "x"}}, 400,
     "purpose"),
    ("file-purpose-megabyte", "POST", "/v1/files", {"data": {"file_name": "a.jsonl", "purpose": "p" * 1_000_000}},
     400, "purpose"),
    ("file-type-exe", "POST", "/v1/files", {"data": {"file_name": "a.exe"}}, 400, "file_type"),
    ("file-checksum-bad", "POST", "/v1/files", {"data": {"file_name": "a.jsonl", "checksum": "zz"}}, 400,
     "checksum"),
    ("upload-part-name-rlo", "POST", "/v1/files/upload", {"files": {"file": ("x\u202egpj.jsonl", CHAT)}}, 400,
     "file_name"),
    ("upload-no-file-part", "POST", "/v1/files/upload", {"data": {"purpose": "fine-tune"}}, 400, "file"),
    ("multipart-no-boundary", "POST", "/v1/files/upload",
     {"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400, "body"),
    ("multipart-truncated", "POST", "/v1/files/upload",
     {"content": b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\nabc',
      "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "file"),
    ("multipart-huge-part-header", "POST", "/v1/files",
     {"content": b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="' + b"a" * 100_000
      + b'.jsonl"\r\n\r\nabc\r\n--xyz--\r\n', "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
     400, "body"),
    ("multipart-file-as-text", "POST", "/v1/files/upload", {"data": {"file": "not a file"}}, 400, "file"),
    ("multipart-2000-parts", "POST", "/v1/files", {"files": [(f"x{i}", ("a", b"b")) for i in range(2000)]}, 400,
     "body"),
    ("files-limit-negative", "GET", "/v1/files?limit=-1", {}, 400, "limit"),
    ("files-limit-text", "GET", "/v1/files?limit=ten", {}, 400, "limit"),
    ("files-order-unknown", "GET", "/v1/files?order=sideways", {}, 400, "order"),
    ("files-after-unknown", "GET", "/v1/files?after=file-nope", {}, 404, "after"),
    ("file-bad-id", "GET", "/v1/files/file-%00%E2%80%AE..", {}, 404, "id"),
    ("put-bytes-no-token", "PUT", "/v1/files/file-x/bytes", {"content": b"x"}, 400, "token"),
    ("put-bytes-nested-token", "PUT", f"/v1/files/file-x/bytes?token={_token(b'[' * 5000)}", {"content": b"x"},
     401, "token"),
    ("put-bytes-token-garbage", "PUT", "/v1/files/file-x/bytes?token=%%%.%%%", {"content": b"x"}, 401, "token"),
    ("put-bytes-token-unicode", "PUT", "/v1/files/file-x/bytes?token=%C3%A9%C3%A9.%C3%A9", {"content": b"x"},
     401, "token"),
    ("put-bytes-token-forged", "PUT",
     f"/v1/files/file-x/bytes?token={_token(json.dumps({'f': 'file-x', 'n': 'x', 'p': 0, 'e': 2**40}).encode())}",
     {"content": b"x"}, 401, "token"),
    ("put-part-zero", "PUT", "/v1/files/file-x/parts/0?token=a.b", {"content": b"x"}, 400, "part"),
    ("put-part-text", "PUT", "/v1/files/file-x/parts/one?token=a.b", {"content": b"x"}, 400, "part"),
    ("put-part-huge", "PUT", f"/v1/files/file-x/parts/{2**70}?token=a.b", {"content": b"x"}, 400, "part"),
    ("multipart-size-negative", "POST", "/v1/files/multipart/initiate",
     {"json": {"file_name": "a.jsonl", "file_size": -1, "num_parts": 1}}, 400, "file_size"),
    ("multipart-parts-huge", "POST", "/v1/files/multipart/initiate",
     {"json": {"file_name": "a.jsonl", "file_size": 10, "num_parts": 10**9}}, 400, "num_parts"),
    ("multipart-name-nul", "POST", "/v1/files/multipart/initiate",
     {"json": {"file_name": "a\x00.jsonl", "file_size": 10, "num_parts": 1}}, 400, "file_name"),
    ("multipart-complete-parts-type", "POST", "/v1/files/multipart/complete",
     {"json": {"upload_id": "u", "file_id": "f", "parts": "all"}}, 400, "parts"),
    ("multipart-complete-part-zero", "POST", "/v1/files/multipart/complete",
     {"json": {"upload_id": "u", "file_id": "f", "parts": [{"part_number": 0, "etag": "e"}]}}, 400,
     "parts.0.part_number"),
    # -- fine-tunes --------------------------------------------------------------------------------
    ("ft-body-array", "POST", "/v1/fine-tunes", {"json": [1]}, 400, "body"),
    ("ft-n-epochs-negative", "POST", "/v1/fine-tunes", {"json": {"training_file": "file-x", "model": TINY,
                                                                 "n_epochs": -1}}, 400, None),
    ("ft-lr-nan", "POST", "/v1/fine-tunes",
     {"content": f'{{"training_file": "file-x", "model": "{TINY}", "learning_rate": NaN}}',
      "headers": {"content-type": "application/json"}}, 400, None),
    ("ft-batch-2**80", "POST", "/v1/fine-tunes", {"json": {"training_file": "file-x", "model": TINY,
                                                           "batch_size": 2**80}}, 400, None),
    ("ft-method-unknown", "POST", "/v1/fine-tunes",
     {"json": {"training_file": "file-x", "model": TINY, "training_method": {"method": "rlhf"}}}, 400, None),
    ("ft-training-file-int", "POST", "/v1/fine-tunes", {"json": {"training_file": 5, "model": TINY}}, 400, None),
    ("ft-model-unknown", "POST", "/v1/fine-tunes", {"json": {"training_file": "file-x", "model": "x" * 600}}, 400,
     "model"),
    ("ft-retrieve-bad-id", "GET", "/v1/fine-tunes/ft-%00", {}, 404, None),
    ("ft-metrics-resolution-negative", "GET", "/v1/fine-tunes/ft-x/metrics?resolution=-1", {}, 400, "resolution"),
    ("ft-metrics-step-text", "GET", "/v1/fine-tunes/ft-x/metrics?global_step_from=abc", {}, 400,
     "global_step_from"),
    ("ft-metrics-time-bad", "GET", "/v1/fine-tunes/ft-x/metrics?logged_at_from=yesterday", {}, 400,
     "logged_at_from"),
    ("ft-download-no-id", "GET", "/v1/finetune/download", {}, 400, "ft_id"),
    ("ft-download-step-text", "GET", "/v1/finetune/download?ft_id=ft-x&checkpoint_step=last", {}, 400,
     "checkpoint_step"),
    ("ft-limits-no-model", "GET", "/v1/fine-tunes/models/limits", {}, 400, "model_name"),
    ("ft-estimate-epochs-text", "POST", "/v1/fine-tunes/estimate-price", {"json": {"n_epochs": "many"}}, 400,
     "n_epochs"),
    ("ft-delete-force-text", "DELETE", "/v1/fine-tunes/ft-x?force=maybe", {}, 400, "force"),
    # -- endpoints, keys, models, auth -------------------------------------------------------------
    ("endpoint-hardware-int", "POST", "/v1/endpoints", {"json": {"model": TINY, "hardware": 5}}, 400, "hardware"),
    ("endpoint-replicas-zero", "POST", "/v1/endpoints",
     {"json": {"model": TINY, "hardware": "1x_cpu", "autoscaling": {"max_replicas": 0}}}, 400,
     "autoscaling.max_replicas"),
    ("endpoint-timeout-negative", "POST", "/v1/endpoints",
     {"json": {"model": TINY, "hardware": "1x_cpu", "inactive_timeout": -1}}, 400, "inactive_timeout"),
    ("endpoint-state-unknown", "POST", "/v1/endpoints", {"json": {"model": TINY, "hardware": "1x_cpu",
                                                                 "state": "FLYING"}}, 400, "state"),
    ("endpoint-model-overlong", "POST", "/v1/endpoints", {"json": {"model": "m" * 600, "hardware": "1x_cpu"}}, 400,
     "model"),
    ("endpoint-display-name-overlong", "POST", "/v1/endpoints",
     {"json": {"model": TINY, "hardware": "1x_cpu", "display_name": "d" * 300}}, 400, "display_name"),
    ("endpoints-mine-text", "GET", "/v1/endpoints?mine=maybe", {}, 400, "mine"),
    ("endpoint-patch-body-text", "PATCH", "/v1/endpoints/endpoint-x", {"json": "STOPPED"}, 400, "body"),
    ("admin-key-owner-slash", "POST", "/v1/admin/keys", {"json": {"owner": "a/b"}}, 400, "owner"),
    ("admin-key-owner-newline", "POST", "/v1/admin/keys", {"json": {"owner": "a\nb"}}, 400, "owner"),
    ("admin-key-revoke-unknown", "DELETE", "/v1/admin/keys/99999", {}, 404, "key"),
    ("model-retrieve-unknown", "GET", "/v1/models/%2e%2e/%2e%2e/etc/passwd", {}, 404, None),
    ("auth-overlong-key", "GET", "/v1/files", {"headers": {"Authorization": "Bearer " + "x" * 20_000}}, 401, None),
    ("auth-basic-scheme", "GET", "/v1/files", {"headers": {"Authorization": "Basic YTpi"}}, 401, None),
    ("docs-off", "GET", "/docs", {}, 404, None),
    ("openapi-off", "GET", "/openapi.json", {}, 404, None),
    ("no-route", "POST", "/v1/nothing-here", {"json": {}}, 404, None),
    ("eval-no-models", "POST", "/v1/evaluations", {"json": {"file": "f", "max_tokens": 1, "models": []}}, 400, "models"),
    ("eval-em-above-one", "POST", "/v1/evaluations", {"json": {"file": "f", "max_tokens": 1, "models": [
        {"label": "a", "model": "a", "exact_match": 2, "f1": 0, "n_turns": 1}]}}, 400, "models.0.exact_match"),
    ("eval-max-tokens-past-int32", "POST", "/v1/evaluations", {"json": {"file": "f", "max_tokens": 10**20, "models": [
        {"label": "a", "model": "a", "exact_match": 1, "f1": 1, "n_turns": 1}]}}, 400, "max_tokens"),
    ("eval-unknown", "GET", "/v1/evaluations/eval-x", {}, 404, "eval_id"),
    ("session-key-overlong", "POST", "/ui/session", {"json": {"api_key": "x" * 1000}}, 400, "api_key"),
    ("session-body-text", "POST", "/ui/session", {"json": "key"}, 400, None),
    ("static-outside", "GET", "/static/%2e%2e/router.py", {}, 404, None),
]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"}, timeout=60) as c:
        yield c


def _local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_gets_its_4xx_and_keeps_the_connection(client, case):
    _, method, path, kwargs, status, param = case
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    assert "Traceback" not in r.text and "site-packages" not in r.text and "SELECT" not in r.text
    health = client.get("/health")
    assert health.status_code == 200
    assert _local_port(health) == _local_port(r), "the server closed the kept-alive connection"


BIG = 10**20
DEEP_CASES = [  # on alice's real job and endpoint, so the request gets past the ownership check
    ("metrics-step-past-int64", "GET", "/v1/fine-tunes/{job}/metrics?global_step_from=-1&global_step_to=" + str(BIG),
     {}, 400, "global_step_from"),
    ("metrics-step-to-past-int64", "GET", "/v1/fine-tunes/{job}/metrics?global_step_to=" + str(BIG), {}, 400,
     "global_step_to"),
    ("download-step-past-int64", "GET", "/v1/finetune/download?ft_id={job}&checkpoint_step=" + str(BIG), {}, 400,
     "checkpoint_step"),
    ("download-ref-step-past-int64", "GET", "/v1/finetune/download?ft_id={job}:" + str(BIG), {}, 404, None),
    ("download-checkpoint-nul", "GET", "/v1/finetune/download?ft_id={job}&checkpoint=%00", {}, 400, "checkpoint"),
    ("endpoint-timeout-past-int32", "PATCH", "/v1/endpoints/{endpoint}", {"json": {"inactive_timeout": BIG}}, 400,
     "inactive_timeout"),
    ("endpoint-min-replicas-huge", "PATCH", "/v1/endpoints/{endpoint}",
     {"json": {"autoscaling": {"min_replicas": BIG, "max_replicas": 1}}}, 400, "autoscaling.min_replicas"),
    ("estimate-epochs-huge", "POST", "/v1/fine-tunes/estimate-price",
     {"json": {"training_file": "{file}", "model": TINY, "n_epochs": BIG}}, 400, "n_epochs"),
    ("from-checkpoint-step-huge", "POST", "/v1/fine-tunes",
     {"json": {"training_file": "{file}", "from_checkpoint": "{job}:" + str(BIG)}}, 400, "from_checkpoint"),
]


@pytest.mark.parametrize("case", DEEP_CASES, ids=[c[0] for c in DEEP_CASES])
def test_hostile_values_on_real_objects(client, owned, case):
    _, method, path, kwargs, status, param = case
    ids = {k: v for k, v in owned.items() if isinstance(v, str)}
    kwargs = json.loads(json.dumps(kwargs).replace("{file}", ids["file"]).replace("{job}", ids["job"]))
    r = client.request(method, path.format(**ids), **kwargs)
    assert r.status_code == status, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param
    assert _local_port(client.get("/health")) == _local_port(r)


def test_schema_bounds_keep_what_clients_send():
    """The bounds refuse the hostile values only: the SDKs' own shapes still pass."""
    from tunehouse.api.inference_schemas import ChatRequest

    ok = ChatRequest.model_validate({
        "model": TINY, "stop": "a long stop sequence, longer than sixteen", "seed": -(2**63), "logprobs": True,
        "top_logprobs": 20, "messages": [{"role": "system", "content": "s"},
                                         {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "u"},
                                         {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
                                         {"role": "tool", "content": "r", "tool_call_id": "c"}]})
    assert ok.messages[1] == {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "u"}
    assert ok.messages[2] == {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}
    assert ChatRequest.model_validate(_chat(logprobs=5)).top_k_logprobs() == 5


def test_tiny_temperature_is_greedy_not_nan(client):
    """1e-300 is within 0..2 but divides logits to inf in float32: it samples as temperature 0."""
    body = _chat(max_tokens=4, seed=1)
    tiny = client.post("/v1/chat/completions", json=body | {"temperature": 1e-300})
    greedy = client.post("/v1/chat/completions", json=body | {"temperature": 0})
    assert tiny.status_code == greedy.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


def test_refused_part_upload_leaves_no_part_file(server, client):
    """A single-part upload's token (signed for part 0) sent to /parts/N is refused before a byte
    is written."""
    begin = client.post("/v1/files", data={"file_name": "one.jsonl"}, follow_redirects=False)
    location = begin.headers["location"]
    file_id, token = location.split("/files/")[1].split("/")[0], location.split("token=")[1]
    for part, status, param in ((0, 400, "part"), (1, 401, "token")):
        r = client.put(f"/v1/files/{file_id}/parts/{part}?token={token}", content=b"abc")
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text
    assert not (server.settings.blobs_path / "uploads" / file_id).exists()
    assert client.put(location, content=CHAT).status_code == 200  # the real PUT still works after


def test_upload_url_ignores_host_header(server, client):
    r = client.post("/v1/files", data={"file_name": "h.jsonl"}, headers={"Host": "evil.example:1"},
                    follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"].startswith(server.url + "/v1/files/")
    mp = client.post("/v1/files/multipart/initiate", headers={"Host": "evil.example:1"},
                     json={"file_name": "big2.jsonl", "file_size": 12 << 20, "num_parts": 2})
    assert all(p["URL"].startswith(server.url) for p in mp.json()["parts"])


def test_unexpected_error_is_generic_with_an_id(server, client, caplog):
    """An exception no handler expects: 500 with an id, the detail only in the server log, and the
    connection kept."""
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/v1/boom-for-test")
    def boom():
        raise RuntimeError("SELECT secret FROM api_keys WHERE path='/root/site-packages/x.py'")

    server.app.include_router(router)
    with caplog.at_level("ERROR", logger="tunehouse.api"):
        r = client.get("/v1/boom-for-test")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "api_error" and err["message"].startswith("Internal error (id ")
    assert "SELECT" not in r.text and "/root" not in r.text
    eid = err["message"].split("(id ")[1].split(")")[0]
    assert any(eid in rec.getMessage() and rec.exc_info for rec in caplog.records)
    health = client.get("/health")
    assert _local_port(health) == _local_port(r)


# -- ownership: every owned-resource route, with bob's key and with none --------------------------
def _owned_routes(o: dict) -> list[tuple[str, str, str, dict]]:
    job, fid, ep, mp = o["job"], o["file"], o["endpoint"], o["multipart"]
    ref = {"upload_id": mp["upload_id"], "file_id": mp["file_id"]}
    return [
        ("ft-retrieve", "GET", f"/v1/fine-tunes/{job}", {}),
        ("ft-cancel", "POST", f"/v1/fine-tunes/{job}/cancel", {}),
        ("ft-events", "GET", f"/v1/fine-tunes/{job}/events", {}),
        ("ft-checkpoints", "GET", f"/v1/fine-tunes/{job}/checkpoints", {}),
        ("ft-metrics", "GET", f"/v1/fine-tunes/{job}/metrics", {}),
        ("ft-download", "GET", f"/v1/finetune/download?ft_id={job}", {}),
        ("ft-from-checkpoint", "POST", "/v1/fine-tunes", {"json": {"training_file": "BOBS_FILE", "from_checkpoint": job}}),
        ("ft-limits-of-job", "GET", f"/v1/fine-tunes/models/limits?model_name={job}", {}),
        ("ft-delete", "DELETE", f"/v1/fine-tunes/{job}", {}),
        ("file-retrieve", "GET", f"/v1/files/{fid}", {}),
        ("file-content", "GET", f"/v1/files/{fid}/content", {}),
        ("file-preprocess", "POST", f"/v1/files/{fid}/preprocess", {}),
        ("file-delete", "DELETE", f"/v1/files/{fid}", {}),
        ("endpoint-get", "GET", f"/v1/endpoints/{ep}", {}),
        ("endpoint-patch", "PATCH", f"/v1/endpoints/{ep}", {"json": {"state": "STARTED"}}),
        ("endpoint-delete", "DELETE", f"/v1/endpoints/{ep}", {}),
        ("multipart-complete", "POST", "/v1/files/multipart/complete", {"json": ref | {"parts": []}}),
        ("multipart-abort", "POST", "/v1/files/multipart/abort", {"json": ref}),
    ]


ROUTE_IDS = [r[0] for r in _owned_routes({"job": "", "file": "", "endpoint": "", "multipart": {"upload_id": "",
                                                                                                "file_id": ""}})]


@pytest.fixture(scope="module")
def bobs_file(server):
    r = httpx.post(f"{server.url}/v1/files/upload", files={"file": ("bob.jsonl", CHAT)},
                   headers={"Authorization": f"Bearer {server.other_key}"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.mark.parametrize("route", ROUTE_IDS)
def test_another_owner_gets_404_and_no_key_gets_401(server, owned, bobs_file, route):
    _, method, path, kwargs = next(r for r in _owned_routes(owned) if r[0] == route)
    if "json" in kwargs:
        kwargs = {"json": json.loads(json.dumps(kwargs["json"]).replace("BOBS_FILE", bobs_file))}
    bob = {"Authorization": f"Bearer {server.other_key}"}
    as_bob = httpx.request(method, server.url + path, headers=bob, **kwargs)
    if route == "ft-from-checkpoint":
        # Create reports every bad field at once as one 400 (an unknown training_file too): what
        # matters is that alice's job reads exactly as a job that does not exist.
        ghost = "ft-00000000-0000-4000-8000-000000000000"
        missing = httpx.request(method, server.url + path, headers=bob,
                                json=kwargs["json"] | {"from_checkpoint": ghost})
        assert as_bob.status_code == missing.status_code == 400
        assert as_bob.json()["error"]["message"].replace(owned["job"], ghost) == missing.json()["error"]["message"]
    else:
        assert as_bob.status_code == 404, as_bob.text
        assert as_bob.json()["error"]["type"] == "not_found_error"
    anonymous = httpx.request(method, server.url + path, **kwargs)
    assert anonymous.status_code == 401, anonymous.text
    # Alice still sees hers: the 404 was about the owner, not a missing object.
    mine = httpx.get(server.url + f"/v1/fine-tunes/{owned['job']}", headers={"Authorization": f"Bearer {server.key}"})
    assert mine.status_code == 200


def test_engine_failure_text_stays_in_the_log(client, monkeypatch):
    """A generation failure (a 5xx domain error) carries engine text (model paths, CUDA messages):
    JSON and streamed answers give only an error id."""
    from tunehouse.serve import completions

    async def fail(*_a, **_k):
        raise completions.GenerationFailed("Generation failed: cannot load /root/.tunehouse/models/x")
        yield  # an async generator, as `stream` is

    async def fail_complete(*_a, **_k):
        raise completions.GenerationFailed("Generation failed: cannot load /root/.tunehouse/models/x")

    monkeypatch.setattr(completions, "stream", fail)
    monkeypatch.setattr(completions, "complete", fail_complete)
    r = client.post("/v1/chat/completions", json=_chat())
    assert r.status_code == 500 and "/root" not in r.text and "Internal error (id " in r.text
    streamed = client.post("/v1/chat/completions", json=_chat(stream=True))
    assert streamed.status_code == 200 and "/root" not in streamed.text
    assert "Internal error (id " in streamed.text and streamed.text.rstrip().endswith("[DONE]")
    assert _local_port(client.get("/health")) == _local_port(streamed)


def test_unexpected_error_mid_stream_ends_the_stream_with_an_id(client, monkeypatch):
    from tunehouse.serve import completions

    async def crash(*_a, **_k):
        raise KeyError("/root/.tunehouse/blobs/jobs/x")
        yield

    monkeypatch.setattr(completions, "stream", crash)
    r = client.post("/v1/chat/completions", json=_chat(stream=True))
    assert r.status_code == 200 and "/root" not in r.text and "Internal error (id " in r.text
    assert r.text.rstrip().endswith("data: [DONE]")
    assert _local_port(client.get("/health")) == _local_port(r)


def test_lists_hold_only_the_callers_objects(server, owned):
    bob = {"Authorization": f"Bearer {server.other_key}"}
    seen = " ".join(httpx.get(server.url + path, headers=bob).text
                    for path in ("/v1/fine-tunes", "/v1/files", "/v1/endpoints", "/v1/models"))
    assert owned["job"] not in seen and owned["file"] not in seen and owned["endpoint"] not in seen
    alice = {"Authorization": f"Bearer {server.key}"}
    assert owned["job"] in httpx.get(server.url + "/v1/fine-tunes", headers=alice).text
