"""Packing: a packed row gives each example the logits and loss it gets alone (to ~1e-5)."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import chat_rows, tiny_model_dir, tiny_tokenizer  # noqa: F401  (fixtures)

from tunehouse.data.packing import collate, pack
from tunehouse.data.tokenize import IGNORE, pad_token_id, tokenize_row
from tunehouse.train.losses import token_cross_entropy


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    rows = chat_rows(3) + [{"text": "The quick brown fox jumps over the lazy dog."}]
    return [tokenize_row(r, tiny_tokenizer, train_on_inputs="auto", max_seq_length=256)
            for r in rows]


def segments(batch_row_lengths):
    start = 0
    for n in batch_row_lengths:
        yield start, start + n
        start += n


@torch.no_grad()
def test_packed_row_equals_examples_run_alone(tiny_model, tiny_tokenizer, examples):
    pad = pad_token_id(tiny_tokenizer)
    packed = collate([examples], pad)
    alone = collate([[ex] for ex in examples], pad)  # padded batch, one example per row
    lp = tiny_model(**packed.model_inputs()).logits
    la = tiny_model(**alone.model_inputs()).logits
    for i, (a, b) in enumerate(segments([ex.num_tokens for ex in examples])):
        assert torch.allclose(lp[0, a:b], la[i, : b - a], atol=1e-5)
        assert torch.equal(packed.targets[0, a:b], alone.targets[i, : b - a])
    loss_p, n_p = token_cross_entropy(lp, packed.targets)
    loss_a, n_a = token_cross_entropy(la, alone.targets)
    assert n_p == n_a == sum(ex.num_trained_tokens for ex in examples)
    assert loss_p.item() == pytest.approx(loss_a.item(), rel=1e-5)
    # Sensitivity: without the block mask the second segment sees the first (DESIGN.md).
    leaky = tiny_model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits
    a, b = list(segments([ex.num_tokens for ex in examples]))[1]
    assert (leaky[0, a:b] - la[1, : b - a]).abs().max() > 1e-3


def test_collate_fields(tiny_tokenizer, examples):
    pad = pad_token_id(tiny_tokenizer)
    batch = collate([examples[:2], examples[2:3]], pad)
    n0, n1 = examples[0].num_tokens, examples[1].num_tokens
    width = n0 + n1
    assert batch.input_ids.shape == (2, width)
    assert batch.position_ids[0].tolist() == list(range(n0)) + list(range(n1))
    # targets are the next labels inside a segment, -100 at each segment's last token and padding
    assert batch.targets[0, : n0 - 1].tolist() == examples[0].labels[1:]
    assert batch.targets[0, n0 - 1].item() == IGNORE
    assert batch.targets[0, width - 1].item() == IGNORE
    n2 = examples[2].num_tokens
    assert batch.input_ids[1, n2:].eq(pad).all() and batch.targets[1, n2 - 1:].eq(IGNORE).all()
    assert batch.num_tokens == n0 + n1 + n2
    assert batch.num_trained_tokens == sum(e.num_trained_tokens for e in examples[:3])
    mask = batch.attention_mask
    assert mask.shape == (2, 1, width, width)
    assert mask[0, 0, n0, n0 - 1] < -1e30 and mask[0, 0, n0, n0] == 0  # new segment, fresh start
    assert mask[0, 0, 1, 2] < -1e30  # causal
    assert mask[1, 0, width - 1].eq(0).sum() == 1  # a pad query sees only itself


def test_pack_fits_every_example_once_and_is_deterministic(examples):
    rows = pack(examples, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(examples[i].num_tokens for i in row) <= 64 for row in rows)
    assert pack(examples, 64) == rows
    with pytest.raises(ValueError, match="max_seq_length"):
        pack(examples, 8)


def test_packed_attention_without_mask_equals_the_masked_row(tiny_model_dir, tiny_tokenizer, examples):
    """`train/attention.py`: per-example attention read from position_ids gives the logits and
    the gradients of transformers' SDPA under the 4-D block mask — for a packed row and for a
    shorter, right-padded row beside it (GQA: the tiny model has 4 heads over 2 KV heads)."""
    from transformers import AutoModelForCausalLM

    from tunehouse.train import attention

    pad = pad_token_id(tiny_tokenizer)
    rows = [examples, examples[1:3]]
    masked, plain = collate(rows, pad), collate(rows, pad, mask_dtype=None)
    assert plain.attention_mask is None and "attention_mask" not in plain.model_inputs()

    def run(batch, packed: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert attention.enable(model) if packed else True
        logits = model(**batch.model_inputs()).logits
        token_cross_entropy(logits, batch.targets)[0].backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    want_logits, want_grads = run(masked, packed=False)
    got_logits, got_grads = run(plain, packed=True)
    real = plain.targets != IGNORE
    assert torch.allclose(got_logits[real], want_logits[real], atol=1e-5)
    assert all(torch.allclose(got_grads[n], want_grads[n], atol=1e-5) for n in want_grads)
