"""SFT losses on 3-element tensors with hand-worked answers."""

from __future__ import annotations

import math

import pytest
import torch
from train_fixtures import chat_rows, tiny_model_dir, tiny_tokenizer  # noqa: F401  (fixtures)

from tunehouse.train.losses import (
    mean_token_accuracy,
    sequence_logps,
    token_accuracy,
    token_cross_entropy,
    trained_logits,
)

# Three positions over a 2-token vocabulary; the middle one is not trained.
#   pos 0: logits [0, 1], target 0 → p = 1/(1+e)  → loss ln(1+e),   argmax 1 (wrong)
#   pos 1: logits [2, 0], target -100                → ignored
#   pos 2: logits [0, ln 3], target 1 → p = 3/4    → loss ln(4/3),   argmax 1 (right)
LOGITS = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, math.log(3.0)]])
TARGETS = torch.tensor([0, -100, 1])


def test_token_cross_entropy_is_a_sum_and_a_count():
    loss, count = token_cross_entropy(LOGITS, TARGETS)
    assert count == 2
    assert loss.item() == pytest.approx(math.log(1 + math.e) + math.log(4 / 3), rel=1e-6)


def test_token_accuracy():
    assert token_accuracy(LOGITS, TARGETS) == (1, 2)
    assert mean_token_accuracy(LOGITS, TARGETS) == 0.5
    assert mean_token_accuracy(LOGITS, torch.full((3,), -100)) == 0.0


def test_sequence_logps_per_row():
    """Row 0 = the three positions above: −ln(1+e) − ln(4/3). Row 1 trains only pos 1 with
    target 0: log(e²/(e²+1)) = 2 − ln(e²+1)."""
    logits = torch.stack([LOGITS, LOGITS])
    targets = torch.tensor([[0, -100, 1], [-100, 0, -100]])
    got = sequence_logps(logits, targets)
    want = [-math.log(1 + math.e) - math.log(4 / 3), 2 - math.log(math.e ** 2 + 1)]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


@torch.no_grad()
def test_logits_only_where_needed_equal_full_logits(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from tunehouse.data.packing import collate
    from tunehouse.data.tokenize import pad_token_id, tokenize_row

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [tokenize_row(r, tiny_tokenizer, train_on_inputs=False, max_seq_length=128)
                for r in chat_rows(2)]
    batch = collate([examples], pad_token_id(tiny_tokenizer))
    full = model(**batch.model_inputs()).logits
    keep = batch.targets != -100
    some, targets = trained_logits(model, batch.model_inputs(), batch.targets)
    assert some.shape == (int(keep.sum()), full.shape[-1])
    assert torch.allclose(some, full[keep], atol=1e-5)
    assert torch.equal(targets, batch.targets[keep])
    assert token_cross_entropy(some, targets)[0].item() == pytest.approx(
        token_cross_entropy(full, batch.targets)[0].item(), rel=1e-6)
