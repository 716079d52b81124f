"""The fused, chunked LM head + log-softmax + target pick against the plain computation."""

from __future__ import annotations

import pytest
import torch

from tunehouse.train.head import linear_log_softmax_gather


def plain(hidden, weight, targets):
    """The reference: full logits, in float64 for float64 inputs (the fused head's softmax is fp32)."""
    logits = hidden @ weight.T
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0], logits.argmax(-1)


def test_values_and_gradients_equal_the_plain_head_over_several_chunks():
    torch.manual_seed(0)
    n, h, v = 37, 16, 50  # chunk 8: four full chunks and a short one
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    upstream = torch.randn(n, dtype=torch.float64)

    logp, argmax = linear_log_softmax_gather(hidden, weight, targets, chunk=8)
    (logp * upstream).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want_logp, want_argmax = plain(hidden, weight, targets)
    (want_logp * upstream).sum().backward()

    assert torch.allclose(logp.double(), want_logp, atol=1e-5)  # logp is fp32 by contract
    assert torch.equal(argmax, want_argmax)
    assert torch.allclose(got[0], hidden.grad, atol=1e-5) and torch.allclose(got[1], weight.grad, atol=1e-5)


def test_frozen_head_gradient_from_the_forward_jacobian():
    """A frozen head (LoRA) takes the per-position Jacobian computed in the forward pass: the
    same hidden gradient as the plain head, and no gradient for the weight."""
    torch.manual_seed(1)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64)
    targets = torch.randint(0, v, (n,))
    upstream = torch.randn(n, dtype=torch.float64)
    logp, _ = linear_log_softmax_gather(hidden, weight, targets, chunk=8)
    (logp * upstream).sum().backward()
    got, hidden.grad = hidden.grad.clone(), None
    want_logp, _ = plain(hidden, weight, targets)
    (want_logp * upstream).sum().backward()
    assert torch.allclose(logp.double(), want_logp, atol=1e-5)
    assert torch.allclose(got, hidden.grad, atol=1e-5) and weight.grad is None


def test_under_bf16_autocast_it_matches_the_autocast_head():
    torch.manual_seed(2)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(1000, 32) * 0.1  # frozen (a LoRA base head)
    targets = torch.randint(0, 1000, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, argmax = linear_log_softmax_gather(hidden, weight, targets)
        logits = torch.nn.functional.linear(hidden, weight)  # bf16, as the model's head gives it
    want = logits.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    assert logp.dtype == torch.float32 and torch.allclose(logp, want, atol=1e-3)
    assert (argmax == logits.float().argmax(-1)).float().mean() > 0.99  # ties in bf16 may differ
    logp.sum().backward()
    assert hidden.grad is not None and hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_inputs(n):
    hidden = torch.randn(n, 4, requires_grad=True)
    logp, argmax = linear_log_softmax_gather(hidden, torch.randn(6, 4), torch.zeros(n, dtype=torch.long))
    assert logp.shape == argmax.shape == (n,)
