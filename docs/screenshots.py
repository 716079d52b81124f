"""Screenshots of the dashboard for the README: the jobs list, a job page with its curves, a run
comparison and the playground, taken in headless Chromium against a throwaway server (temporary
home, embedded worker, the tiny test model). Run: `make screenshots` (or python docs/screenshots.py);
it writes docs/jobs.png, docs/job.png, docs/compare.png, docs/files.png and docs/playground.png."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from tunehouse.api.app import create_app
from tunehouse.api.server import serve_in_thread
from tunehouse.settings import Settings
from tunehouse.store import keys
from tunehouse.web import headless

DOCS = Path(__file__).resolve().parent
TINY = "tunehouse/tiny-llama"
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def chat_file(path: Path, n: int, seed: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            a, b = WORDS[(i + seed) % 10], WORDS[(3 * i + 1 + seed) % 10]
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Say {a} then {b}."},
                                              {"role": "assistant", "content": f"{a} {b}"}]}) + "\n")
    return path


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tunehouse-shots-"))
    app = create_app(Settings(home=tmp / "home", embedded_worker=True))
    with app.state.home.db.session() as s:
        key = keys.create_key(s, "alice", admin=True)
    bg = serve_in_thread(app)
    api = httpx.Client(base_url=bg.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)

    def upload(path: Path) -> str:
        r = api.post("/v1/files/upload", files={"file": (path.name, path.read_bytes())}, data={"purpose": "fine-tune"})
        return r.raise_for_status().json()["id"]

    train, val = upload(chat_file(tmp / "train.jsonl", 160, 0)), upload(chat_file(tmp / "val.jsonl", 20, 5))
    bad = tmp / "broken.jsonl"  # for the files page: a report with errors on lines 2 and 4
    bad.write_text(chat_file(tmp / "one.jsonl", 1, 0).read_text()
                   + json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n"
                   + chat_file(tmp / "one.jsonl", 1, 1).read_text()
                   + json.dumps({"messages": [{"role": "user", "content": 7}, {"role": "assistant"}]}) + "\n")
    upload(bad)
    jobs = []
    for suffix, lr in (("lr3e-3", 3e-3), ("lr1e-3", 1e-3)):
        body = {"model": TINY, "training_file": train, "validation_file": val, "n_epochs": 6, "n_evals": 6,
                "n_checkpoints": 2, "batch_size": 2, "learning_rate": lr, "suffix": suffix,
                "training_type": {"type": "Lora", "lora_r": 8}}
        jobs.append(api.post("/v1/fine-tunes", json=body).raise_for_status().json())
    for job in jobs:
        while api.get(f"/v1/fine-tunes/{job['id']}").json()["status"] not in ("completed", "error", "cancelled"):
            time.sleep(1)
    done = api.get(f"/v1/fine-tunes/{jobs[0]['id']}").json()

    with sync_playwright() as p:
        browser = headless.launch(p)
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.goto(bg.url + "/")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.locator("#rows tr[data-id]").first.wait_for()
        page.screenshot(path=DOCS / "jobs.png")

        page.goto(f"{bg.url}/#/jobs/{done['id']}")
        page.locator("figure[data-metric=loss] canvas").wait_for()
        page.screenshot(path=DOCS / "job.png", full_page=True)

        page.goto(f"{bg.url}/#/compare?ids={jobs[0]['id']},{jobs[1]['id']}")
        page.locator("#compare-charts figure canvas").first.wait_for()
        page.screenshot(path=DOCS / "compare.png", full_page=True)

        page.goto(f"{bg.url}/#/files")
        page.locator("#file-rows tr").filter(has_text="broken.jsonl").get_by_role("button", name="Report").click()
        page.locator("#report tr.problem").first.wait_for()
        page.screenshot(path=DOCS / "files.png", full_page=True)

        page.goto(f"{bg.url}/#/playground?model={done['model_output_name']}&base={TINY}")
        page.get_by_label("Max tokens").fill("16")
        page.get_by_label("System prompt").fill("You answer with two words.")
        page.get_by_label("Message").fill("Say red then blue.")
        page.get_by_role("button", name="Send").click()
        page.wait_for_function("() => [...document.querySelectorAll('.msg.assistant')].every(m => m.dataset.done)"
                               " && document.querySelectorAll('.msg.assistant').length === 2", timeout=120_000)
        page.screenshot(path=DOCS / "playground.png")
        browser.close()
    bg.stop()
    print("wrote", *(str(DOCS / n) for n in ("jobs.png", "job.png", "compare.png", "files.png", "playground.png")),
          file=sys.stderr)


if __name__ == "__main__":
    main()
