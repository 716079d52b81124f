"""The dashboard in headless Chromium against a live server: sign-in, files, a job's live curves,
cancel, compare, checkpoint download, the playground, owners kept apart. One server with its
embedded worker serves the whole module: a few tiny jobs, shared."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from browser_support import launch, playwright_sync_api, sign_in
from conftest import _serve
from jobs_support import write_chat
from tunehouse.settings import Settings

sync_api = playwright_sync_api()
TINY = "tunehouse/tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    live, bg = _serve(Settings(home=tmp / "home", model_cache=tmp / "models", embedded_worker=True))
    yield live
    bg.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1300, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, errors  # no uncaught script error on any page


def api(server, key=None) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key or server.key}"}, timeout=60)


def upload(server, path, key=None) -> str:
    with api(server, key) as c:
        r = c.post("/v1/files/upload", files={"file": (path.name, path.read_bytes())}, data={"purpose": "fine-tune"})
        r.raise_for_status()
        return r.json()["id"]


def wait_status(server, job_id, statuses, timeout=240):
    deadline = time.time() + timeout
    with api(server) as c:
        while time.time() < deadline:
            job = c.get(f"/v1/fine-tunes/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(0.3)
    raise AssertionError(f"{job_id} still {job['status']}")


@pytest.fixture(scope="module")
def done_job(server, tmp_path_factory):
    """A small completed LoRA job (with an intermediate checkpoint), started through the API."""
    path = write_chat(tmp_path_factory.mktemp("d") / "small.jsonl", 16)
    with api(server) as c:
        body = {"model": TINY, "training_file": upload(server, path), "n_epochs": 2, "n_checkpoints": 2,
                "batch_size": 4, "learning_rate": 3e-3, "suffix": "done", "training_type": {"type": "Lora", "lora_r": 8}}
        job = c.post("/v1/fine-tunes", json=body).json()
    return wait_status(server, job["id"], {"completed"})


def test_sign_in_wrong_key_then_right_then_out(page, server):
    page.goto(server.url + "/")
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Sign in").click()
    sync_api.expect(page.locator("#signin-error")).to_contain_text("Invalid API key")
    page.get_by_label("API key").fill(server.key)
    page.get_by_role("button", name="Sign in").click()
    sync_api.expect(page.locator("#who")).to_have_text("signed in as alice")
    sync_api.expect(page.get_by_role("heading", name="Fine-tuning jobs")).to_be_visible()
    page.reload()  # the cookie keeps the session
    sync_api.expect(page.locator("#who")).to_have_text("signed in as alice")
    page.get_by_role("button", name="Sign out").click()
    sync_api.expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.reload()
    sync_api.expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_session_cookie_rules(server):
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/ui/session", json={"api_key": "wrong"}).status_code == 401
        r = c.post("/ui/session", json={"api_key": server.other_key})
        assert r.status_code == 200 and r.json()["owner"] == "bob"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert c.get("/v3/whoami").json()["organization"]["name"] == "bob"
        # A state change on the cookie alone (what a cross-site form could send) is refused.
        refused = c.post("/v1/evaluations", json={"file": "x", "max_tokens": 1, "models": []})
        assert refused.status_code == 403 and "X-Tunehouse-Web" in refused.json()["error"]["message"]
        assert c.delete("/ui/session").status_code == 204
        assert c.get("/v3/whoami").status_code == 401
    with httpx.Client(base_url=server.url) as c:  # assets and the page need no key
        assert c.get("/").status_code == 200 and "text/html" in c.get("/").headers["content-type"]
        assert c.get("/static/js/app.js").status_code == 200
        assert c.get("/static/../api/auth.py").status_code == 404


def test_upload_bad_file_shows_errors_by_line(page, server, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good_line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad.write_text("\n".join([good_line, json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), good_line,
                              json.dumps({"messages": [{"role": "user", "content": 7}]})]) + "\n")
    sign_in(page, server.url, server.key)
    page.goto(server.url + "/#/files")
    page.get_by_label("Dataset (.jsonl, .parquet, .csv)").set_input_files(str(bad))
    page.get_by_role("button", name="Upload").click()
    sync_api.expect(page.locator("#upload-status")).to_contain_text("invalid")
    problems = page.locator("#report tr.problem")
    sync_api.expect(problems.first).to_be_visible()
    lines = [problems.nth(i).locator("td").first.inner_text() for i in range(problems.count())]
    assert "2" in lines and "4" in lines, lines
    sync_api.expect(page.locator("#report")).to_contain_text("messages[0].role")
    assert page.locator("#upload-progress").evaluate("p => p.value") == 1


def test_upload_good_file_start_job_watch_curves_cancel(page, server, tmp_path):
    """Upload through the page, start a job on the tiny model from the form, count the loss
    curve's points twice while it runs, then cancel it from its page and delete it."""
    good = write_chat(tmp_path / "good.jsonl", 200)
    sign_in(page, server.url, server.key)
    page.goto(server.url + "/#/files")
    page.get_by_label("Dataset (.jsonl, .parquet, .csv)").set_input_files(str(good))
    page.get_by_role("button", name="Upload").click()
    sync_api.expect(page.locator("#upload-status")).to_contain_text("valid")
    page.get_by_role("link", name="Fine-tune on this file").click()
    page.get_by_label("Base model").select_option(TINY)
    page.get_by_label("Method").select_option("sft")
    page.get_by_label("Epochs").fill("20")
    page.get_by_label("Batch size").fill("1")
    page.get_by_label("Suffix").fill("live")
    page.get_by_role("button", name="Start job").click()
    page.wait_for_function("() => location.hash.startsWith('#/jobs/ft-')", timeout=120_000)  # builds the tiny model
    loss = page.locator("figure.chart[data-metric=loss]")
    loss.wait_for(timeout=120_000)
    page.wait_for_function("() => Number(document.querySelector('figure[data-metric=loss]').dataset.points) >= 2",
                           timeout=60_000)
    first = int(loss.get_attribute("data-points"))
    page.wait_for_function(f"() => Number(document.querySelector('figure[data-metric=loss]').dataset.points) > {first}",
                           timeout=60_000)
    second = int(loss.get_attribute("data-points"))
    assert second > first  # the curve grew without a reload
    assert page.locator("#events li").count() >= 3
    sync_api.expect(page.locator("figure.chart[data-metric=lr]")).to_be_visible()
    page.get_by_role("button", name="Cancel").click()
    sync_api.expect(page.locator("#status")).to_contain_text(re.compile("cancel"), timeout=60_000)
    job_id = page.url.rsplit("/", 1)[1]
    assert wait_status(server, job_id, {"cancelled"}, timeout=120)["status"] == "cancelled"
    sync_api.expect(page.locator("#status")).to_have_text("cancelled", timeout=30_000)
    page.once("dialog", lambda dialog: dialog.accept())  # "Delete … and its weights?"
    page.get_by_role("button", name="Delete").click()
    sync_api.expect(page.get_by_role("heading", name="Fine-tuning jobs")).to_be_visible()
    sync_api.expect(page.locator(f"#rows tr[data-id='{job_id}']")).to_have_count(0)
    with api(server) as c:
        assert c.get(f"/v1/fine-tunes/{job_id}").status_code == 404


def test_compare_two_runs(page, server, done_job, tmp_path):
    second = write_chat(tmp_path / "second.jsonl", 12, seed=3)
    with api(server) as c:
        body = {"model": TINY, "training_file": upload(server, second), "n_epochs": 2, "batch_size": 4,
                "learning_rate": 1e-3, "suffix": "other", "training_type": {"type": "Lora", "lora_r": 8}}
        other = c.post("/v1/fine-tunes", json=body).json()
    wait_status(server, other["id"], {"completed"})
    sign_in(page, server.url, server.key)
    for job_id in (done_job["id"], other["id"]):
        page.get_by_label(f"select {job_id}").check()
    page.get_by_role("button", name="Compare selected").click()
    chart = page.locator("#compare-charts figure[data-metric=train_loss]")
    chart.wait_for()
    legend = chart.locator(".u-legend .u-series")
    sync_api.expect(legend).to_have_count(3)  # the step axis plus one series per run
    sync_api.expect(chart).to_contain_text(done_job["model_output_name"])
    sync_api.expect(chart).to_contain_text(other["model_output_name"])


def test_download_checkpoint(page, server, done_job):
    sign_in(page, server.url, server.key)
    page.goto(f"{server.url}/#/jobs/{done_job['id']}")
    rows = page.locator("#checkpoints tr")
    sync_api.expect(rows.filter(has_text="Intermediate").first).to_be_visible()
    with page.expect_download() as info:
        rows.filter(has_text="Intermediate").first.get_by_role("link", name="Download").click()
    path = info.value.path()
    assert info.value.suggested_filename.endswith(".tar.zst")
    assert open(path, "rb").read(4) == b"\x28\xb5\x2f\xfd"  # zstd magic


def test_playground_streams_two_models(page, server, done_job):
    sign_in(page, server.url, server.key)
    page.goto(f"{server.url}/#/jobs/{done_job['id']}")
    page.get_by_role("link", name="Open in playground").click()
    sync_api.expect(page.get_by_label("Two models side by side")).to_be_checked()
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Temperature").fill("1")
    # Record every text the answers show, to see them arrive in pieces rather than at once.
    page.evaluate("""() => { window.seen = [];
      new MutationObserver(() => document.querySelectorAll('.msg.assistant').forEach((m, i) =>
        window.seen.push(i + ':' + m.textContent.length))).observe(document.getElementById('panes'),
        {subtree: true, childList: true, characterData: true}); }""")
    page.get_by_label("Message").fill("Say red then blue.")
    page.get_by_role("button", name="Send").click()
    answers = page.locator(".msg.assistant")
    sync_api.expect(answers).to_have_count(2)
    page.wait_for_function("() => [...document.querySelectorAll('.msg.assistant')].every(m => m.dataset.done)",
                           timeout=120_000)
    models = page.locator(".pane .model")
    assert models.nth(0).input_value() == done_job["model_output_name"]
    assert models.nth(1).input_value() == TINY
    for i in range(2):
        assert int(answers.nth(i).get_attribute("data-pieces")) >= 2
        lengths = {s for s in page.evaluate("window.seen") if s.startswith(f"{i}:")}
        assert len(lengths) >= 3, lengths  # empty, partial, ..., whole: streamed


def test_other_owner_sees_nothing(page, server, done_job):
    sign_in(page, server.url, server.other_key)
    sync_api.expect(page.get_by_role("heading", name="Fine-tuning jobs")).to_be_visible()
    sync_api.expect(page.locator("#rows")).to_contain_text("No jobs yet")
    page.goto(f"{server.url}/#/jobs/{done_job['id']}")
    sync_api.expect(page.get_by_role("heading", name="Job not found")).to_be_visible()
    page.goto(f"{server.url}/#/files")
    sync_api.expect(page.locator("#file-rows")).to_contain_text("No files yet")


def test_eval_result_stored_listed_and_shown(page, server, done_job, tmp_path):
    """`tunehouse eval` against the server posts its summary; the API lists it for its owner only;
    the Evaluations page shows its table and a chart per metric."""
    from typer.testing import CliRunner

    from tunehouse.cli import app

    held = write_chat(tmp_path / "held_out.jsonl", 3, seed=7)
    result = CliRunner().invoke(app, ["eval", "--model", TINY, "--model", done_job["model_output_name"], "--file",
                                      str(held), "--out", str(tmp_path / "out"), "--base-url", server.url,
                                      "--api-key", server.key, "--max-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    eval_id = json.loads(result.stdout[result.stdout.index("{"):])["evaluation_id"]
    with api(server) as c:
        listed = c.get("/v1/evaluations").json()["data"]
        assert [e["id"] for e in listed] == [eval_id]
        assert listed[0]["file"] == "held_out.jsonl"  # the name only, not the client's folders
        assert [m["model"] for m in listed[0]["models"]] == [TINY, done_job["model_output_name"]]
        assert c.post("/v1/evaluations", json={"file": "x", "max_tokens": 1, "models": []}).status_code == 400
    with api(server, server.other_key) as c:
        assert c.get("/v1/evaluations").json()["data"] == []
        assert c.get(f"/v1/evaluations/{eval_id}").status_code == 404
        assert c.delete(f"/v1/evaluations/{eval_id}").status_code == 404
    sign_in(page, server.url, server.key)
    page.goto(f"{server.url}/#/evaluations")
    section = page.locator(f"section[data-eval='{eval_id}']")
    sync_api.expect(section.locator("tbody tr")).to_have_count(2)
    for metric in ("exact_match", "f1", "valid_loss", "perplexity"):
        sync_api.expect(section.locator(f"figure[data-metric={metric}] .bar")).to_have_count(2)


def test_continue_from_checkpoint_with_dpo(page, server, done_job, tmp_path):
    """From a checkpoint row to a DPO job on a preference file, with its DPO fields; its page then
    charts the DPO metrics, chosen and rejected on one chart."""
    pairs = tmp_path / "pairs.jsonl"
    words = ["red", "blue", "green", "cat", "dog", "sun"]
    pairs.write_text("".join(json.dumps({"input": {"messages": [{"role": "user", "content": f"Say {w}."}]},
                                         "preferred_output": [{"role": "assistant", "content": w}],
                                         "non_preferred_output": [{"role": "assistant", "content": words[i - 1]}]}) + "\n"
                             for i, w in enumerate(words)))
    upload(server, pairs)
    sign_in(page, server.url, server.key)
    page.goto(f"{server.url}/#/jobs/{done_job['id']}")
    page.locator("#checkpoints tr").filter(has_text="Intermediate").first.get_by_role("link", name="Continue").click()
    sync_api.expect(page.get_by_role("heading", name=re.compile(f"Continue from {done_job['id']}:\\d+"))).to_be_visible()
    sync_api.expect(page.get_by_label("Method")).to_have_value("dpo")
    training = page.get_by_label("Training file")
    training.select_option(training.locator("option", has_text="pairs.jsonl").get_attribute("value"))
    page.get_by_label("dpo_beta").fill("0.2")
    page.get_by_label("Batch size").fill("2")
    page.get_by_role("button", name="Start job").click()
    page.wait_for_function("() => location.hash.startsWith('#/jobs/ft-')", timeout=120_000)
    job_id = page.evaluate("location.hash").rsplit("/", 1)[1]
    job = wait_status(server, job_id, {"completed"})
    assert job["training_method"]["method"] == "dpo" and job["training_method"]["dpo_beta"] == 0.2
    assert job["from_checkpoint"].startswith(done_job["id"] + ":")
    sync_api.expect(page.locator("#status")).to_have_text("completed", timeout=30_000)
    sync_api.expect(page.locator("figure[data-metric='logps (chosen, rejected)'] .u-legend .u-series")).to_have_count(3)


def test_models_and_endpoint_lifecycle(page, server, done_job):
    sign_in(page, server.url, server.key)
    page.goto(f"{server.url}/#/models")
    models = page.get_by_role("table", name="Models")
    sync_api.expect(models).to_contain_text(TINY)
    sync_api.expect(models.get_by_role("row").filter(has_text=done_job["model_output_name"])).to_contain_text("fine-tuned")
    form = page.locator("#ep-form")
    form.get_by_label("Model").select_option(done_job["model_output_name"])
    sync_api.expect(form.get_by_label("Hardware").locator("option")).to_contain_text(["1x_cpu"])
    form.get_by_label("Name").fill("web-ep")
    form.get_by_role("button", name="Create endpoint").click()
    row = page.locator("#ep-rows tr").filter(has_text="web-ep")
    sync_api.expect(row).to_contain_text("STARTED", timeout=120_000)
    row.get_by_role("button", name="Stop").click()
    sync_api.expect(row).to_contain_text("STOPPED", timeout=60_000)
    row.get_by_role("button", name="Delete").click()
    sync_api.expect(row).to_have_count(0)
    with api(server) as c:
        assert c.get("/v1/endpoints").json()["data"] == []


def test_jobs_list_filters(page, server, done_job):
    sign_in(page, server.url, server.key)
    rows = page.locator("#rows tr[data-id]")
    rows.first.wait_for()
    page.get_by_label("Search").fill(done_job["model_output_name"])
    sync_api.expect(rows).to_have_count(1)
    page.get_by_label("Search").fill("")
    page.get_by_label("Status").select_option("error")
    sync_api.expect(rows).to_have_count(0)
    page.get_by_label("Status").select_option("completed")
    sync_api.expect(rows.first).to_contain_text("completed")
