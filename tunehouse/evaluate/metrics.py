"""Pure answer metrics: SQuAD-style normalisation, exact match, token F1, and their means.

The same definitions as the SQuAD/CoQA official scripts (`normalize_answer`, `compute_exact`,
`compute_f1`), which the Together fine-tuning guide's CoQA evaluation uses:

    exact_match("The red kite.", "red kite")   # 1.0: case, punctuation and articles ignored
    token_f1("a big red kite", "red kite")     # 0.8: P = 2/3, R = 2/2
    summarise([(1.0, 1.0), (0.0, 0.5)])        # {"exact_match": 0.5, "f1": 0.75, "n": 2}
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (in the
    SQuAD script's order: punctuation goes before articles, so "the." loses its article too)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall, counting shared tokens as a multiset
    (each gold token can be matched once). When either side normalises to no tokens, 1.0 if
    both do and 0.0 otherwise (the SQuAD v2 rule for unanswerable questions)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, gold: str) -> tuple[float, float]:
    """(exact match, token F1) of one answer."""
    return exact_match(prediction, gold), token_f1(prediction, gold)


def summarise(scores: Iterable[tuple[float, float]]) -> dict:
    """Mean exact match and F1 over turns (every turn weighs the same), with the turn count `n`.
    No turns gives means of 0.0 and n = 0."""
    pairs = list(scores)
    n = len(pairs)
    return {"exact_match": sum(em for em, _ in pairs) / n if n else 0.0,
            "f1": sum(f1 for _, f1 in pairs) / n if n else 0.0, "n": n}
