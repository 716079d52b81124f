"""`tunehouse quickstart`: the README's main job. Starts an embedded server on a free loopback
port over the home, then walks a dataset through check → upload → list, the way a user would.
(Training, evaluation and chat join this walk-through as those features land.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunehouse.settings import Settings

console = Console()

NAMES = ["Ada", "Bruno", "Chen", "Dalia", "Emeka", "Freya", "Goran", "Hana"]
PLACES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quebec", "Tbilisi", "Perth"]
THINGS = ["a red kite", "a brass key", "an old map", "a blue bicycle", "a violin", "a sailboat"]


def make_dataset(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A small deterministic chat dataset: a short story, then questions with short answers."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            who, where, what = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
            story = f"{who} lives in {where}. Last summer {who} found {what} near the river."
            msgs = [{"role": "system", "content": "Answer with a few words taken from the story."},
                    {"role": "user", "content": f"{story}\n\nWhere does {who} live?"},
                    {"role": "assistant", "content": where},
                    {"role": "user", "content": f"What did {who} find?"},
                    {"role": "assistant", "content": what}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


def make_broken_copy(src: Path, dest: Path) -> Path:
    """The same data with two typical mistakes, to show what the checker reports."""
    lines = src.read_text().splitlines()
    row = json.loads(lines[2])
    row["messages"][2]["role"] = "user"  # two user turns in a row
    lines[2] = json.dumps(row)
    lines[5] = lines[5][:-7]  # a truncated line
    dest.write_text("\n".join(lines) + "\n")
    return dest


def run(settings: Settings) -> None:
    from tunehouse.api.app import create_app
    from tunehouse.api.server import serve_in_thread
    from tunehouse.client import Client
    from tunehouse.data.formats import check_file
    from tunehouse.store.home import ensure_admin_key, open_home, read_key_file

    ensure_admin_key(open_home(settings))
    work = settings.home / "quickstart"
    work.mkdir(parents=True, exist_ok=True)
    bg = serve_in_thread(create_app(settings), port=0)
    console.rule("[bold]tunehouse quick-start")
    console.print(f"Server: {bg.url}   home: {settings.home}")
    try:
        train = make_dataset(work / "train.jsonl")
        broken = make_broken_copy(train, work / "broken.jsonl")

        console.rule("1. check a dataset with mistakes (no server needed)")
        report = check_file(broken)
        table = Table("line", "field", "rule", "what to change")
        for p in report.problems:
            table.add_row(str(p.line), p.field or "", p.rule, p.message)
        console.print(table)

        console.rule("2. check the clean dataset")
        report = check_file(train)
        console.print(f"OK: {report.num_samples} samples, format {report.dataset_format}")

        console.rule("3. upload it (the same three-step flow as the together SDKs)")
        client = Client(bg.url, read_key_file(settings.admin_key_path))
        f = client.upload(train)
        console.print(f"Uploaded as {f['id']}: {f['bytes']} bytes, processing status {f['processing_status']}")

        console.rule("4. list files")
        table = Table("id", "filename", "bytes", "lines", "status")
        for x in client.list_files():
            table.add_row(x["id"], x["filename"], str(x["bytes"]), str(x["LineCount"]), x["processing_status"])
        console.print(table)
        console.print("\nNext: `tunehouse serve`, then point the together SDK at it:\n"
                      "  export TOGETHER_BASE_URL=http://127.0.0.1:8000 "
                      f"TOGETHER_API_KEY=$(cat {settings.admin_key_path})")
    finally:
        bg.stop()
