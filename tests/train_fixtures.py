"""Shared fixtures for the data/train tests: the tiny model and small datasets, built in-process.

Import the fixtures you use into the test module (`from train_fixtures import tiny_model_dir`).
The tiny model is built once per session under pytest's base temp dir (build_tiny_model reuses
an existing build), so modules importing the fixture share it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunehouse.models.tiny import build_tiny_model

QA = [
    ("What is the capital of France?", "Paris."),
    ("What is two plus two?", "Four."),
    ("Say hello.", "Hello!"),
    ("What colour is the sky?", "Blue."),
    ("Name a bird.", "An owl."),
    ("How many days are in a week?", "Seven."),
    ("Where does the sun rise?", "In the east."),
    ("What do cats sit on?", "The mat."),
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def chat_rows(n: int) -> list[dict]:
    """n conversations cycling through QA; every other one has a second user/assistant turn."""
    rows = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 2:
            q2, a2 = QA[(i + 3) % len(QA)]
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    """16 short chat examples (the memorisable training set)."""
    return write_jsonl(tmp_path_factory.getbasetemp() / "chat16.jsonl", chat_rows(16))
