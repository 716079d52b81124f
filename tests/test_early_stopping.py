"""The early-stopping rule on hand-worked loss sequences."""

from __future__ import annotations

from tunehouse.train.early_stopping import EarlyStopping


def test_warmup_evals_are_ignored_then_patience_counts_non_improvements():
    rule = EarlyStopping(patience=2, min_delta=0.0, warmup_evals=1)
    # eval 1 (step 10) is warm-up even though it is the lowest; best is step 20 (1.5);
    # 1.52 and 1.6 do not improve on it: two in a row → stop.
    v = rule.verdict([(10, 0.9), (20, 1.5), (30, 1.52), (40, 1.6)])
    assert (v.stop, v.best_step, v.best_value, v.evals_without_improvement) == (True, 20, 1.5, 2)
    assert rule.min_evals() == 4


def test_an_improvement_resets_the_count():
    rule = EarlyStopping(patience=2, warmup_evals=0)
    v = rule.verdict([(1, 2.0), (2, 2.1), (3, 1.9), (4, 1.95)])
    assert (v.stop, v.best_step, v.evals_without_improvement) == (False, 3, 1)


def test_min_delta_improvements_smaller_than_it_do_not_count():
    rule = EarlyStopping(patience=2, min_delta=0.05, warmup_evals=0)
    # 1.97 and 1.96 are better than 2.0 but by less than 0.05: not improvements.
    v = rule.verdict([(1, 2.0), (2, 1.97), (3, 1.96)])
    assert (v.stop, v.best_step, v.best_value) == (True, 1, 2.0)
    # 1.94 beats 2.0 by 0.06: it is.
    assert not rule.verdict([(1, 2.0), (2, 1.94), (3, 1.96)]).stop


def test_nothing_to_decide_during_warmup():
    v = EarlyStopping(patience=1, warmup_evals=3).verdict([(1, 3.0), (2, 4.0), (3, 5.0)])
    assert (v.stop, v.best_step, v.best_value) == (False, None, None)
