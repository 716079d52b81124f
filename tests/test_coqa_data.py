"""The quick-start's CoQA-shaped data: deterministic, held-out stories disjoint from training,
every row accepted by the dataset checker, and the real CoQA layout converted."""

from __future__ import annotations

import json
import random
import re

from tunehouse.data.coqa import (
    CITIES, NAMES, PET_NAMES, SYSTEM_PROMPT, TEMPLATES, Story, chat_row, generate, preference_rows, read_coqa,
    write_jsonl,
)
from tunehouse.data.formats import CONVERSATION, PREFERENCE, check_file


def test_generation_is_deterministic():
    assert generate(20, "train", seed=3) == generate(20, "train", seed=3)
    assert generate(20, "train", seed=3) != generate(20, "train", seed=4)
    rows = [preference_rows(s, random.Random(7)) for s in generate(5)]
    assert rows == [preference_rows(s, random.Random(7)) for s in generate(5)]


def test_answers_are_short_spans_of_the_story():
    for story in generate(60, "train") + generate(20, "held_out"):
        assert len(story.turns) == 4
        for question, answer in story.turns:
            assert question.endswith("?")
            assert 1 <= len(answer.split()) <= 4, answer
            assert answer.lower() in story.text.lower(), (answer, story.text)


def test_every_template_is_used_and_every_question_formats():
    stories = generate(len(TEMPLATES) * 20, "train", turns=99)  # all questions of each template
    assert all("{" not in s.text and all("{" not in q + a for q, a in s.turns) for s in stories)
    assert len({s.text.split()[1] for s in stories[:len(TEMPLATES)]}) == len(TEMPLATES)


def test_held_out_stories_share_no_person_city_or_pet_with_training():
    train, held = generate(300, "train"), generate(100, "held_out")
    words = lambda stories: {w for s in stories for w in re.findall(r"[A-Z][a-z]+", s.text)}  # noqa: E731
    proper = set(NAMES) | set(CITIES) | set(PET_NAMES)
    train_names, held_names = words(train) & proper, words(held) & proper
    assert held_names and train_names and not (train_names & held_names)
    assert not {s.text for s in train} & {s.text for s in held}


def test_chat_rows_pass_the_checker(tmp_path):
    stories = generate(3)
    row = chat_row(stories[0])
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["system"] + ["user", "assistant"] * 4
    assert row["messages"][0]["content"] == SYSTEM_PROMPT
    assert row["messages"][1]["content"] == f"{stories[0].text}\n\n{stories[0].turns[0][0]}"
    assert row["messages"][3]["content"] == stories[0].turns[1][0]
    assert [m["content"] for m in row["messages"][2::2]] == [a for _, a in stories[0].turns]
    report = check_file(write_jsonl(map(chat_row, stories), tmp_path / "train.jsonl"))
    assert report.passed, report.problems
    assert report.num_samples == 3 and report.dataset_format == CONVERSATION


def test_preference_rows_pass_the_checker_and_mix_both_kinds(tmp_path):
    rng = random.Random(0)
    rows = [r for s in generate(10) for r in preference_rows(s, rng)]
    assert len(rows) == 40
    kinds = {"span" if len(r["non_preferred_output"][0]["content"].split()) <= 4 else "rambling" for r in rows}
    assert kinds == {"span", "rambling"}
    for r in rows:
        good, bad = r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"]
        assert good != bad and r["input"]["messages"][-1]["role"] == "user"
    single = preference_rows(Story("Ann has a cat.", (("Who has a cat?", "Ann"),)), rng)
    assert single[0]["non_preferred_output"][0]["content"].count(" ") > 4  # rambling: no wrong span to use
    report = check_file(write_jsonl(rows, tmp_path / "prefs.jsonl"))
    assert report.passed, report.problems
    assert report.dataset_format == PREFERENCE


def test_read_coqa_layout(tmp_path):
    """Two stories in CoQA's own layout: turns paired by turn_id (given out of order in the
    second story), an empty answer dropped."""
    data = {"version": "1.0", "data": [
        {"id": "a", "source": "mctest", "story": "Tom has a red ball. He plays in the yard.",
         "questions": [{"input_text": "What does Tom have?", "turn_id": 1},
                       {"input_text": "What colour?", "turn_id": 2}],
         "answers": [{"input_text": "a red ball", "span_text": "a red ball", "turn_id": 1},
                     {"input_text": "red", "turn_id": 2}]},
        {"id": "b", "source": "cnn", "story": " Mia sailed to Crete in June. ",
         "questions": [{"input_text": "When?", "turn_id": 2}, {"input_text": "Who sailed?", "turn_id": 1},
                       {"input_text": "Why?", "turn_id": 3}],
         "answers": [{"input_text": "Mia", "turn_id": 1}, {"input_text": "in June", "turn_id": 2},
                     {"input_text": " ", "turn_id": 3}]},
    ]}
    path = tmp_path / "coqa.json"
    path.write_text(json.dumps(data))
    stories = read_coqa(path)
    assert stories == [
        Story("Tom has a red ball. He plays in the yard.", (("What does Tom have?", "a red ball"), ("What colour?", "red"))),
        Story("Mia sailed to Crete in June.", (("Who sailed?", "Mia"), ("When?", "in June"))),
    ]
    out = write_jsonl(map(chat_row, stories), tmp_path / "coqa.jsonl")
    assert check_file(out).passed
    assert json.loads(out.read_text().splitlines()[1])["messages"][1]["content"] == "Mia sailed to Crete in June.\n\nWho sailed?"
