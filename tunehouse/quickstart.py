"""`tunehouse quickstart`: the README's main job, end to end, as a user of the HTTP API.

It starts an embedded server (SQLite + a local folder in the home, the built-in
SmolLM2-135M-Instruct), then, one function per stage:

    1 build the data      CoQA-shaped stories → chat JSONL (train, held-out) + DPO pairs
    2 check it            the validator on a broken copy, then on the real files
    3 upload              the three-step upload the together SDKs use
    4 SFT                 a LoRA job, followed live (steps, loss, ETA, events)
    5 evaluate            base vs fine-tuned on held-out stories (EM, F1, loss) → table, JSON, SVG
    6 DPO                 continue from the SFT job on the preference pairs; accuracy and KL
    7 chat                how to talk to the result (CLI, openai SDK)

`--small` runs the same walk with the tiny test model in well under a minute (the test uses it);
`--coqa FILE` uses a real CoQA JSON file instead of the generated stories.
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunehouse.client import Client
from tunehouse.data import coqa
from tunehouse.evaluate import compare
from tunehouse.settings import Settings
from tunehouse.train.wire import to_request

console = Console()
TERMINAL = ("completed", "cancelled", "error", "user_error")


@dataclass(frozen=True)
class Plan:
    """Sizes and hyperparameters of one quick-start run."""

    model: str
    train_stories: int
    train_turns: int  # questions per training story
    held_out_stories: int
    held_out_turns: int
    dpo_stories: int  # training stories turned into preference pairs (one pair per turn)
    dpo_valid_stories: int  # held-out stories for the DPO job's validation (accuracy, KL)
    sft: dict  # the SFT job's hyperparameters (config field names; train/wire.py nests them)
    dpo: dict  # the DPO job's hyperparameters (wire names)
    max_tokens: int  # answer length cap when evaluating
    bf16: bool  # TUNEHOUSE_BF16=1 (bf16 where the CPU has it, the default) or 0 (fp32) for the training child


# Sized for ≤ 10 minutes on a 2-core CPU, measured with other jobs sharing it: SFT 8.2k tokens in
# 9 steps (~220-330 tokens/s alone with bf16, 20-40 shared); 64 held-out turns per model; 20 DPO
# pairs. Held-out EM/F1 went from 0.03/0.26 to 0.91/0.91 (the Together guide: +0.31/+0.23).
FULL = Plan(
    model="HuggingFaceTB/SmolLM2-135M-Instruct",
    train_stories=48, train_turns=5, held_out_stories=16, held_out_turns=4,
    dpo_stories=4, dpo_valid_stories=2,
    sft=dict(n_epochs=1, learning_rate=2e-3, batch_size=2, max_seq_length=512, min_lr_ratio=0.1,
             lora_r=8, lora_alpha=16, n_checkpoints=1),
    dpo=dict(n_epochs=1, learning_rate=5e-4, batch_size=5, max_seq_length=256, n_checkpoints=1, n_evals=1),
    max_tokens=32, bf16=True,
)
SMALL = Plan(
    model="tunehouse/tiny-llama",
    train_stories=8, train_turns=3, held_out_stories=3, held_out_turns=2,
    dpo_stories=2, dpo_valid_stories=1,
    sft=dict(n_epochs=1, learning_rate=3e-3, batch_size=4, max_seq_length=512, n_checkpoints=1),
    dpo=dict(n_epochs=1, learning_rate=1e-3, batch_size=4, max_seq_length=512, n_checkpoints=1, n_evals=1),
    max_tokens=8, bf16=False,
)


@dataclass
class Files:
    train: Path
    held_out: Path
    prefs: Path
    prefs_valid: Path


def run(settings: Settings, *, small: bool = False, model: str | None = None, coqa_file: Path | None = None) -> dict:
    """The whole walk-through; returns what it measured (also written to quickstart/summary.json)."""
    from tunehouse.api.app import create_app
    from tunehouse.api.server import serve_in_thread
    from tunehouse.store.home import ensure_admin_key, open_home, read_key_file

    plan = replace(SMALL if small else FULL, **({"model": model} if model else {}))
    if coqa_file:  # real CoQA stories run to ~400 tokens
        plan = replace(plan, sft=plan.sft | {"max_seq_length": 1024}, dpo=plan.dpo | {"max_seq_length": 768})
    # read by the training child the worker starts (bf16 is the default where the CPU has it)
    os.environ.setdefault("TUNEHOUSE_BF16", "1" if plan.bf16 else "0")
    # The embedded server loads models in this process: keep its loading bars and notices off the page.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    ensure_admin_key(open_home(settings))
    key = read_key_file(settings.admin_key_path)
    work = settings.home / "quickstart"
    t0 = time.monotonic()
    bg = serve_in_thread(create_app(settings), port=0)
    console.rule("[bold]tunehouse quick-start")
    console.print(f"Server {bg.url}   home {settings.home}   base model {plan.model}")
    client = Client(bg.url, key)
    stages, clock = {}, time.monotonic()

    def lap(name: str) -> None:  # seconds per stage, for summary.json
        nonlocal clock
        stages[name], clock = round(time.monotonic() - clock, 1), time.monotonic()

    try:
        files = build_dataset(work, plan, coqa_file)
        check_dataset(files, work)
        ids = upload(client, files)
        lap("data")
        sft = fine_tune(client, ids, plan)
        lap("sft")
        result = evaluate(bg.url, key, plan, sft, files, work)
        lap("eval")
        dpo = preference_tune(client, ids, sft, plan)
        lap("dpo")
        chat_with_it(dpo, settings)
    finally:
        client.close()
        bg.stop()
    summary = {"plan": plan.__dict__, "seconds": round(time.monotonic() - t0, 1), "stages": stages,
               "sft_job": sft["id"], "sft_model": sft["model_output_name"],
               "dpo_job": dpo["id"], "dpo_model": dpo["model_output_name"],
               "eval": {r["label"]: {k: r[k] for k in ("exact_match", "f1", "valid_loss", "perplexity", "n_turns")}
                        for r in result["models"]},
               "dpo_metrics": dpo["metrics"]}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"\nDone in {summary['seconds']:.0f} s. Summary: {work / 'summary.json'}")
    return summary


def build_dataset(work: Path, plan: Plan, coqa_file: Path | None) -> Files:
    console.rule("1. Build a reading-comprehension dataset (CoQA-shaped)")
    if coqa_file:
        stories = coqa.read_coqa(coqa_file)
        cut = max(1, len(stories) // 10)  # the last tenth is held out
        # CoQA stories are ~5x longer than the generated ones: the same number of turns per story
        train = [coqa.Story(s.text, s.turns[:plan.train_turns]) for s in stories[:-cut][:plan.train_stories]]
        held = [coqa.Story(s.text, s.turns[:plan.held_out_turns]) for s in stories[-cut:][:plan.held_out_stories]]
        source = f"{coqa_file} ({len(stories)} stories)"
    else:
        train = coqa.generate(plan.train_stories, "train", turns=plan.train_turns)
        held = coqa.generate(plan.held_out_stories, "held_out", turns=plan.held_out_turns)
        source = "generated stories (held-out people, cities and pets never appear in training)"
    rng = random.Random(0)
    files = Files(coqa.write_jsonl(map(coqa.chat_row, train), work / "train.jsonl"),
                  coqa.write_jsonl(map(coqa.chat_row, held), work / "held_out.jsonl"),
                  coqa.write_jsonl((r for s in train[:plan.dpo_stories] for r in coqa.preference_rows(s, rng)),
                                   work / "preferences.jsonl"),
                  coqa.write_jsonl((r for s in held[:plan.dpo_valid_stories] for r in coqa.preference_rows(s, rng)),
                                   work / "preferences_valid.jsonl"))
    console.print(f"From {source}: {len(train)} training and {len(held)} held-out stories. One of them:\n")
    example = coqa.chat_row(held[0])["messages"]
    console.print(f"[dim]{example[1]['content']}[/dim]")
    for m in example[2:6]:
        console.print(f"  [bold]{m['role']}:[/bold] {m['content'].splitlines()[-1]}")
    return files


def check_dataset(files: Files, work: Path) -> None:
    from tunehouse.data.formats import check_file  # the validator `tunehouse files check` runs

    console.rule("2. Check the data (`tunehouse files check`)")
    lines = files.train.read_text().splitlines()
    broken_row = json.loads(lines[0])
    broken_row["messages"][2]["role"] = "user"  # two user turns in a row
    broken = work / "broken.jsonl"
    broken.write_text("\n".join([json.dumps(broken_row), lines[1][:-9]] + lines[2:4]) + "\n")  # + a cut line
    report = check_file(broken)
    table = Table("line", "field", "what to change", title=f"{broken.name}: a copy with two mistakes")
    for p in report.problems:
        table.add_row(str(p.line), p.field or "", p.message)
    console.print(table)
    for path in (files.train, files.held_out, files.prefs, files.prefs_valid):
        report = check_file(path)
        if not report.passed:
            raise SystemExit(f"{path} failed the check: {report.problems[0].message}")
        console.print(f"[green]OK[/green] {path.name}: {report.num_samples} samples, {report.dataset_format}")


def upload(client: Client, files: Files) -> dict[str, str]:
    console.rule("3. Upload (the together SDKs' three-step upload)")
    ids = {}
    for name in ("train", "prefs", "prefs_valid"):
        f = client.upload(getattr(files, name))
        ids[name] = f["id"]
        console.print(f"{f['filename']} → {f['id']} ({f['bytes']} bytes, {f['processing_status']})")
    return ids


def fine_tune(client: Client, ids: dict[str, str], plan: Plan) -> dict:
    console.rule("4. Fine-tune with LoRA (SFT)")
    job = client.create_job({"training_file": ids["train"], "model": plan.model, "suffix": "coqa",
                             **to_request({"lora": True, **plan.sft}, "sft")})
    console.print(f"Job {job['id']} → model {job['model_output_name']}")
    return follow(client, job["id"], "SFT")


def evaluate(url: str, key: str, plan: Plan, sft: dict, files: Files, work: Path) -> dict:
    console.rule("5. Evaluate base vs fine-tuned on the held-out stories (`tunehouse eval`)")
    console.print("Every answer is asked with the gold conversation before it, greedily, "
                  f"max_tokens {plan.max_tokens}; scored by exact match and token F1.")
    result = compare.compare([plan.model, sft["model_output_name"]], files.held_out, base_url=url, api_key=key,
                             max_tokens=plan.max_tokens, console=console, labels=["base", "fine-tuned"])
    console.print(compare.results_table(result))
    json_path, svg_path = compare.write_outputs(result, work / "eval")
    base, tuned = result["models"]
    console.print(f"Uplift: EM {tuned['exact_match'] - base['exact_match']:+.2f}, F1 {tuned['f1'] - base['f1']:+.2f}"
                  f"   (the Together guide's CoQA run: EM +0.31, F1 +0.23)\nWrote {json_path} and {svg_path}")
    for t in result["turns"][:4]:
        console.print(f"  {t['question'].splitlines()[-1]}  gold {t['gold']!r}  base "
                      f"{t['answers'][plan.model]!r}  fine-tuned {t['answers'][sft['model_output_name']]!r}",
                      highlight=False)
    return result


def preference_tune(client: Client, ids: dict[str, str], sft: dict, plan: Plan) -> dict:
    console.rule("6. Continue with DPO from the SFT job")
    job = client.create_job({"training_file": ids["prefs"], "validation_file": ids["prefs_valid"],
                             "from_checkpoint": sft["id"], "suffix": "coqa-dpo",
                             **to_request({"dpo_beta": 0.1, **plan.dpo}, "dpo")})
    console.print(f"Job {job['id']} from {sft['id']} → model {job['model_output_name']}")
    done = follow(client, job["id"], "DPO")
    rows = client.list_metrics(job["id"])
    wanted = ("rewards/accuracies", "valid/rewards/accuracies", "kl", "rewards/margins")
    last = {k: next((r[k] for r in reversed(rows) if k in r), None) for k in wanted}
    table = Table("metric", "value", title="DPO metrics: last training step, final validation")
    for k, v in last.items():
        if v is not None:
            table.add_row(k, f"{v:.3f}")
    console.print(table)
    return done | {"metrics": last}


def chat_with_it(job: dict, settings: Settings) -> None:
    console.rule("7. Chat with the result")
    name = job["model_output_name"]
    console.print(f"Start the server:  tunehouse serve --home {settings.home}\n"
                  f"Chat in the terminal:  tunehouse chat {name}\n"
                  "Or with the openai SDK:", soft_wrap=True)
    story = "Ana keeps a green parrot called Kiwi. Kiwi is 3 years old."
    console.print(f'''from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=open("{settings.admin_key_path}").read().strip())
reply = client.chat.completions.create(model="{name}", temperature=0, max_tokens=16, messages=[
    {{"role": "system", "content": "{coqa.SYSTEM_PROMPT}"}},
    {{"role": "user", "content": "{story}\\n\\nWhat is the parrot called?"}}])
print(reply.choices[0].message.content)''', style="cyan", markup=False, highlight=False, soft_wrap=True)


# -- helpers ------------------------------------------------------------------------------------
def follow(client: Client, job_id: str, label: str, poll_s: float = 1.0) -> dict:
    """Poll the job until it ends, drawing a progress bar (step/total, train loss, ETA) and
    printing each new event above it; returns the final job. A job that does not complete ends
    the quick-start with its last events."""
    seen, last_step, loss = 0, 0, ""
    columns = (TextColumn(f"[bold]{label}[/bold] {{task.fields[status]}}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[loss]}"), TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=None, status="queued", loss="", eta="–")
        while True:
            job = client.retrieve_job(job_id)
            for ev in job.get("events", [])[seen:]:
                progress.console.print(f"  [dim]{ev['created_at'][11:19]}[/dim] {ev['message']}")
            seen = len(job.get("events", []))
            step, total = job["steps_completed"], job["total_steps"] or None
            if step > last_step:
                rows = [r for r in client.list_metrics(job_id, global_step_from=last_step + 1) if "train_loss" in r]
                loss = f"loss {rows[-1]['train_loss']:.3f}" if rows else loss
                last_step = step
            eta = job["progress"]["seconds_remaining"] if job["progress"]["estimate_available"] else None
            progress.update(task, completed=step, total=total, status=job["status"], loss=loss,
                            eta=f"{eta:.0f} s" if eta is not None and job["status"] == "running" else "–")
            if job["status"] in TERMINAL:
                break
            time.sleep(poll_s)
    if job["status"] != "completed":
        raise SystemExit(f"{label} job {job_id} ended {job['status']}: "
                         + "; ".join(e["message"] for e in job.get("events", [])[-3:]))
    return job
