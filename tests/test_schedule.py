"""Learning-rate schedules match transformers' schedulers and hand-worked points."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup

from tunehouse.train.schedule import lr_multiplier, warmup_steps


def hf_multipliers(make, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.25])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.2])
@pytest.mark.parametrize("num_cycles", [0.5, 1.0])
def test_cosine_matches_transformers(warmup_ratio, min_lr_ratio, num_cycles):
    total = 20
    warm = warmup_steps(total, warmup_ratio)
    want = hf_multipliers(lambda o: get_cosine_with_min_lr_schedule_with_warmup(
        o, warm, total, num_cycles=num_cycles, min_lr_rate=min_lr_ratio), total)
    got = [lr_multiplier(s, total, scheduler="cosine", warmup_ratio=warmup_ratio,
                         min_lr_ratio=min_lr_ratio, num_cycles=num_cycles) for s in range(total)]
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1])
def test_linear_matches_transformers(warmup_ratio):
    total = 20
    warm = warmup_steps(total, warmup_ratio)
    want = hf_multipliers(lambda o: get_linear_schedule_with_warmup(o, warm, total), total)
    got = [lr_multiplier(s, total, scheduler="linear", warmup_ratio=warmup_ratio)
           for s in range(total)]
    assert got == pytest.approx(want, abs=1e-12)


def test_hand_worked_points():
    """10 steps, warmup 0.2 → 2 warmup steps (0, 0.5), then decay over 8 steps."""
    kw = dict(warmup_ratio=0.2)
    assert lr_multiplier(0, 10, **kw) == 0.0
    assert lr_multiplier(1, 10, **kw) == 0.5
    assert lr_multiplier(2, 10, **kw) == 1.0
    # linear, min 0.1: halfway through decay (step 6) → 0.1 + 0.9 × 0.5
    assert lr_multiplier(6, 10, scheduler="linear", min_lr_ratio=0.1, **kw) == pytest.approx(0.55)
    # cosine half cycle: halfway → 0.5; end of decay → min
    assert lr_multiplier(6, 10, **kw) == pytest.approx(0.5)
    assert lr_multiplier(10, 10, min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_multiplier(6, 10, num_cycles=1.0, **kw) == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(lr_multiplier(0, 10), 1.0)
    with pytest.raises(ValueError):
        lr_multiplier(0, 10, scheduler="step")
