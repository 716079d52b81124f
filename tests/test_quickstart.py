"""The README's quick-start, run as a user runs it: `tunehouse quickstart` in a subprocess.

The `--small` walk (tiny model) runs every stage in well under 90 s; the slow test runs the real
one with SmolLM2-135M and asserts at least the Together guide's CoQA uplift (EM +0.31, F1 +0.23)
on the held-out stories, read from the JSON the quick-start writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

RULES = ("1. Build", "2. Check", "3. Upload", "4. Fine-tune", "5. Evaluate", "6. Continue with DPO", "7. Chat")


def run_quickstart(home, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, COLUMNS="160", NO_COLOR="1", TERM="dumb")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tunehouse", "quickstart", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.monotonic() - t0


def test_small_quickstart_end_to_end(tmp_path):
    proc, _ = run_quickstart(tmp_path / "home", "--small", timeout=90)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for rule in RULES:
        assert rule in out, rule
    assert "two user messages in a row" in out  # the checker on the broken copy
    for column in ("model", "EM", "F1", "valid loss", "perplexity", "n turns"):
        assert column in out
    table_rows = [line for line in out.splitlines() if line.startswith(("│ base", "│ fine-tuned"))]
    assert len(table_rows) == 2, out
    assert "rewards/accuracies" in out and "kl" in out
    assert "tunehouse chat admin/tiny-llama-coqa-dpo-" in out and "from openai import OpenAI" in out

    work = tmp_path / "home" / "quickstart"
    result = json.loads((work / "eval" / "eval.json").read_text())
    assert [m["label"] for m in result["models"]] == ["base", "fine-tuned"]
    assert all(m["n_turns"] == 6 for m in result["models"])
    assert all(m["valid_loss"] > 0 and m["perplexity"] > 1 for m in result["models"])  # from echo log-probs
    assert ET.parse(work / "eval" / "eval.svg").getroot().tag.endswith("svg")
    summary = json.loads((work / "summary.json").read_text())
    assert summary["dpo_metrics"]["rewards/accuracies"] is not None
    assert summary["dpo_model"].startswith("admin/tiny-llama-coqa-dpo-")


def test_small_quickstart_on_a_coqa_file(tmp_path):
    """`--coqa FILE`: the stories of a CoQA JSON file instead of the generated ones (the last
    tenth, here one story of three, held out)."""
    story = "{who} keeps a {colour} boat in the harbour of {town}. Every morning {who} sails to the lighthouse."
    data = {"data": [{"story": story.format(who=w, colour=c, town=t),
                      "questions": [{"input_text": "Who keeps a boat?", "turn_id": 1},
                                    {"input_text": "What colour is it?", "turn_id": 2},
                                    {"input_text": "Where is the harbour?", "turn_id": 3}],
                      "answers": [{"input_text": w, "turn_id": 1}, {"input_text": c, "turn_id": 2},
                                  {"input_text": t, "turn_id": 3}]}
                     for w, c, t in [("Ana", "red", "Vigo"), ("Ben", "blue", "Cork"), ("Eva", "green", "Bari")]]}
    path = tmp_path / "coqa.json"
    path.write_text(json.dumps(data))
    proc, _ = run_quickstart(tmp_path / "home", "--small", "--coqa", str(path), timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"From {path} (3 stories): 2 training and 1 held-out stories" in proc.stdout.replace("\n", " ")
    result = json.loads((tmp_path / "home" / "quickstart" / "eval" / "eval.json").read_text())
    assert [t["gold"] for t in result["turns"]] == ["Eva", "green"]  # held_out_turns = 2


@pytest.mark.slow
def test_real_quickstart_beats_the_together_guide_uplift(tmp_path):
    proc, seconds = run_quickstart(tmp_path / "home", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base, tuned = json.loads((tmp_path / "home" / "quickstart" / "eval" / "eval.json").read_text())["models"]
    print(f"quick-start {seconds:.0f} s; base EM {base['exact_match']:.3f} F1 {base['f1']:.3f}; "
          f"fine-tuned EM {tuned['exact_match']:.3f} F1 {tuned['f1']:.3f}; valid loss "
          f"{base['valid_loss']:.3f} -> {tuned['valid_loss']:.3f}")
    assert tuned["exact_match"] - base["exact_match"] >= 0.31
    assert tuned["f1"] - base["f1"] >= 0.23
    assert tuned["valid_loss"] < base["valid_loss"]
