"""Access control: wrong keys are rate-limited per client address, keys are listed and revoked
(admin route and `tunehouse keys`), /docs follows its setting, and what the owner reads of a
failed job names no server path and carries no log text."""

from __future__ import annotations

import time

import httpx
import pytest
from typer.testing import CliRunner

from conftest import _serve
from tunehouse.api.ratelimit import FailureLimiter
from tunehouse.settings import Settings


def _h(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def limited(tmp_path):
    """Five wrong keys at once, then one more every 2 s (slow enough that a busy machine's own
    request times do not refill the bucket mid-test)."""
    live, bg = _serve(Settings(home=tmp_path / "home", embedded_worker=False, auth_failure_burst=5,
                               auth_failures_per_minute=30))
    yield live
    bg.stop()


def test_wrong_keys_get_429_then_the_right_key_works_after_the_window(limited):
    with httpx.Client(base_url=limited.url) as c:
        for _ in range(30):  # only failures count: a right key is never limited by its own traffic
            assert c.get("/v1/files", headers=_h(limited.key)).status_code == 200
        codes = [c.get("/v1/files", headers=_h(f"th-wrong-{i}")).status_code for i in range(5)]
        assert codes == [401] * 5
        r = c.get("/v1/files", headers=_h("th-wrong-6"))
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        wait = int(r.headers["Retry-After"])
        assert 1 <= wait <= 2
        # While blocked, the right key is refused too: a 200 would tell a guesser which guess was right.
        assert c.get("/v1/files", headers=_h(limited.key)).status_code == 429
        # Another address (127.0.0.2 is loopback too on Linux) has its own bucket.
        with httpx.Client(base_url=limited.url, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
            assert other.get("/v1/files", headers=_h(limited.key)).status_code == 200
        time.sleep(wait)
        assert c.get("/v1/files", headers=_h(limited.key)).status_code == 200


def test_300_wrong_keys_are_mostly_refused_with_429(live):
    """The reported burst, with the default settings (10 failures, then 6 a minute)."""
    with httpx.Client(base_url=live.url) as c:
        codes = [c.get("/v3/whoami", headers=_h("th-nope")).status_code for _ in range(300)]
    # One refilled token (every 10 s) may let a slow run's later guess through; none more.
    assert codes[:11] == [401] * 10 + [429] and codes[10:].count(429) >= len(codes[10:]) - 2


def test_limiter_bucket_refills_and_forgets_full_buckets():
    now = [0.0]
    lim = FailureLimiter(burst=2, per_minute=60, clock=lambda: now[0], max_addresses=2)
    lim.failed("a")
    lim.failed("a")
    assert lim.retry_after("a") == 1 and lim.retry_after("b") is None
    now[0] = 1.0
    assert lim.retry_after("a") is None
    lim.failed("b")
    now[0] = 10.0  # both full again: the next new address prunes them
    lim.failed("c")
    assert set(lim._buckets) == {"c"}


def test_revoked_key_is_refused_at_once(live):
    with httpx.Client(base_url=live.url) as c:
        made = c.post("/v1/admin/keys", headers=_h(live.key), json={"owner": "carol"})
        assert made.status_code == 200, made.text
        carol = made.json()["key"]
        assert c.get("/v3/whoami", headers=_h(carol)).json()["project"]["id"] == "carol"
        listed = c.get("/v1/admin/keys", headers=_h(live.key)).json()["data"]
        assert {k["owner"] for k in listed} == {"alice", "bob", "carol"} and all("key" not in k for k in listed)
        assert c.get("/v1/admin/keys", headers=_h(live.other_key)).status_code == 403  # bob is no admin
        gone = c.delete(f"/v1/admin/keys/{made.json()['id']}", headers=_h(live.key))
        assert gone.status_code == 200 and gone.json()["revoked"] is True
        r = c.get("/v3/whoami", headers=_h(carol))
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_cli_lists_and_revokes_keys(live):
    from tunehouse.cli import app

    runner = CliRunner()
    home = ["--home", str(live.settings.home)]
    listed = runner.invoke(app, ["keys", "list", *home])
    assert listed.exit_code == 0 and "bob" in listed.output
    bob_prefix = live.other_key[:10]
    assert bob_prefix in listed.output
    assert httpx.get(f"{live.url}/v3/whoami", headers=_h(live.other_key)).status_code == 200
    out = runner.invoke(app, ["keys", "revoke", bob_prefix, *home])
    assert out.exit_code == 0 and "owner bob" in out.output, out.output
    assert httpx.get(f"{live.url}/v3/whoami", headers=_h(live.other_key)).status_code == 401
    unknown = runner.invoke(app, ["keys", "revoke", "th-nothing", *home])
    assert unknown.exit_code == 1


@pytest.mark.parametrize("mode, anonymous, keyed", [("off", 404, 404), ("key", 401, 200), ("public", 200, 200)])
def test_docs_follow_the_setting(tmp_path, mode, anonymous, keyed):
    live, bg = _serve(Settings(home=tmp_path / "home", embedded_worker=False, docs=mode))
    try:
        for path in ("/docs", "/openapi.json"):
            assert httpx.get(live.url + path).status_code == anonymous
            assert httpx.get(live.url + path, headers=_h(live.key)).status_code == keyed
        if keyed == 200:
            assert "/v1/chat/completions" in httpx.get(live.url + "/openapi.json", headers=_h(live.key)).json()["paths"]
    finally:
        bg.stop()


def test_job_failure_events_hold_no_paths_or_log_text(live, tmp_path):
    """A training child that dies, and one that raises: the owner's events say what happened and
    give an id or log name, never the server's paths or the log's stack text."""
    from tunehouse import jobs
    from tunehouse.store.tables import Job
    from tunehouse.worker.loop import Worker

    home = live.app.state.home
    with home.db.session() as s:
        s.add(Job(id="ft-dies", owner="alice", status="running", model="m", training_file="file-x", config={},
                  attempts=1))
    log_path = home.settings.run_path / "jobs" / "ft-dies" / "attempt-1.log"
    log_path.parent.mkdir(parents=True)
    log_path.write_text('Traceback (most recent call last):\n  File "/usr/lib/python3/site-packages/torch/x.py"\n')
    Worker(home)._record_exit("ft-dies", -9, log_path)
    with home.db.session() as s:
        messages = [e.message for e in jobs.events(s, "ft-dies")]
    assert messages and "signal 9" in messages[-1] and "attempt-1.log" in messages[-1]
    assert not any("site-packages" in m or "Traceback" in m or str(home.settings.home) in m for m in messages)


@pytest.mark.parametrize("exc, kind", [
    (RuntimeError("CUDA error in /usr/lib/python3/site-packages/torch/cuda.py"), "JOB_ERROR"),
    (FileNotFoundError(2, "No such file or directory", "/srv/th/blobs/files/file-1.jsonl"), "JOB_USER_ERROR"),
])
def test_training_failure_event_names_no_server_path(live, monkeypatch, capsys, exc, kind):
    from tunehouse import jobs
    from tunehouse.store.tables import Job
    from tunehouse.train import run

    home = live.app.state.home
    with home.db.session() as s:
        s.add(Job(id="ft-raises", owner="alice", status="running", model="m", training_file="file-x", config={}))
    monkeypatch.setenv("TUNEHOUSE_HOME", str(home.settings.home))

    def boom(*_args):
        raise exc

    monkeypatch.setattr(run.JobSpec, "of", staticmethod(boom))
    assert run.main("ft-raises") == 0
    with home.db.session() as s:
        last = jobs.events(s, "ft-raises")[-1]
    assert last.type == kind and "/srv" not in last.message and "site-packages" not in last.message
    if kind == "JOB_ERROR":  # the id in the event finds the trace in the child's log (its stderr)
        eid = last.message.split("(id ")[1].split(")")[0]
        assert f"JOB_ERROR id {eid}" in capsys.readouterr().err
    else:
        assert "file-1.jsonl" in last.message


def test_event_paths_are_blob_keys(live):
    """CHECKPOINT_SAVE / TRAINING_COMPLETE name their folder by blob key, not the server path."""
    from tunehouse import jobs
    from tunehouse.store.tables import Job
    from tunehouse.train.run import StoreReporter

    home = live.app.state.home
    with home.db.session() as s:
        s.add(Job(id="ft-paths", owner="alice", status="running", model="m", training_file="file-x", config={}))
    reporter = StoreReporter(home, "ft-paths")
    reporter.event("CHECKPOINT_SAVE", "Checkpoint saved", step=3,
                   checkpoint_path=str(home.blobs.root / "jobs/ft-paths/out/checkpoint-3"))
    reporter.event("TRAINING_COMPLETE", "done", model_path="/opt/elsewhere/final")
    reporter.event("CHECKPOINT_SAVE", f"Saved {reporter.out_dir}/checkpoints/step-000004", step=4,
                   checkpoint_path=str(reporter.out_dir / "checkpoints" / "step-000004"))  # this machine's scratch
    events = httpx.get(f"{live.url}/v1/fine-tunes/ft-paths/events", headers=_h(live.key)).json()["data"]
    assert [e["checkpoint_path"] for e in events] == ["jobs/ft-paths/out/checkpoint-3", None,
                                                     "jobs/ft-paths/out/checkpoints/step-000004"]
    assert events[1]["model_path"] == "…/final"
    assert events[2]["message"] == "Saved jobs/ft-paths/out/checkpoints/step-000004"
    with home.db.session() as s:
        assert str(home.settings.home) not in str([e.fields for e in jobs.events(s, "ft-paths")])


def test_endpoint_error_names_no_server_path():
    from tunehouse.serve.endpoints import endpoint_object
    from tunehouse.store.tables import Endpoint

    ep = Endpoint(id="endpoint-1", owner="alice", name="alice/m-1", model="m", hardware="1x_cpu", state="FAILED",
                  error="cannot load m: no config.json in /root/.tunehouse/models/m/merged")
    assert endpoint_object(ep)["error"] == "cannot load m: no config.json in …/merged"


def test_upload_url_uses_the_public_url_setting(tmp_path):
    live, bg = _serve(Settings(home=tmp_path / "home", embedded_worker=False,
                               public_url="https://th.example.com/base/"))
    try:
        r = httpx.post(f"{live.url}/v1/files", headers=_h(live.key) | {"Host": "evil.example"},
                       data={"file_name": "a.jsonl"}, follow_redirects=False)
        assert r.status_code == 302 and r.headers["location"].startswith("https://th.example.com/base/v1/files/file-")
    finally:
        bg.stop()
    with pytest.raises(ValueError):
        Settings(home=tmp_path / "h2", public_url="javascript:alert(1)")
