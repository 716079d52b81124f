"""Answer metrics with hand-worked answers (the SQuAD/CoQA definitions)."""

from __future__ import annotations

import pytest

from tunehouse.evaluate.metrics import exact_match, normalize_answer, score, summarise, token_f1


@pytest.mark.parametrize("text, want", [
    ("The Red Kite.", "red kite"),         # lowercase, punctuation, leading article
    ("  an   apple,  a pear ", "apple pear"),  # articles anywhere, whitespace collapsed
    ("theatre", "theatre"),                # "the" inside a word stays
    ("the.", ""),                          # punctuation goes first, then the bare article
    ("7:30 p.m.", "730 pm"),               # ":" and "." are punctuation
    ("", ""),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_exact_match():
    assert exact_match("The red kite!", "red kite") == 1.0
    assert exact_match("a red kite", "the red  KITE") == 1.0
    assert exact_match("red kites", "red kite") == 0.0


def test_token_f1_hand_computed():
    """pred "a big red kite" → [big, red, kite]; gold → [red, kite]; common 2:
    P = 2/3, R = 1, F1 = 2·(2/3)/(5/3) = 0.8."""
    assert token_f1("a big red kite", "the red kite") == pytest.approx(0.8)


def test_token_f1_counts_a_multiset():
    """pred [red, red, red] vs gold [red, kite]: one red matched, not three.
    P = 1/3, R = 1/2, F1 = 2·(1/6)/(5/6) = 0.4."""
    assert token_f1("red red red", "red kite") == pytest.approx(0.4)


def test_token_f1_sentence_answer():
    """"She found the brass key near the river." → [she, found, brass, key, near, river]
    vs gold "brass key": common 2, P = 2/6, R = 1, F1 = 2·(1/3)/(4/3) = 0.5."""
    assert token_f1("She found the brass key near the river.", "a brass key") == pytest.approx(0.5)


def test_token_f1_empty_sides():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "") == 1.0  # both normalise to nothing
    assert token_f1("", "red") == 0.0
    assert token_f1("blue", "red") == 0.0


def test_score_and_summarise():
    """Turns (1, 1), (0, 0.5), (0, 0): EM = 1/3, F1 = 1.5/3 = 0.5."""
    turns = [score("Red.", "red"), score("red kite", "kite"), score("no", "yes")]
    assert turns[1] == (0.0, pytest.approx(2 * 0.5 * 1 / 1.5))
    assert summarise([(1.0, 1.0), (0.0, 0.5), (0.0, 0.0)]) == {
        "exact_match": pytest.approx(1 / 3), "f1": pytest.approx(0.5), "n": 3}
    assert summarise([]) == {"exact_match": 0.0, "f1": 0.0, "n": 0}
