"""The LM head fused with log-softmax and the target pick, in chunks of positions.

    logp, argmax = linear_log_softmax_gather(hidden [N, H], weight [V, H], targets [N])

gives log p(target) at each position (differentiable in hidden and weight) and the argmax token
(for accuracy), without ever holding the [N, V] logits: each chunk of positions is projected,
reduced to its log-sum-exp and its target's logit, and dropped; the backward pass recomputes the
chunk's logits from the saved hidden states and log-sum-exps (softmax − one-hot, times the
incoming gradient). With a 49k vocabulary the unfused path keeps four [N, V] fp32 tensors alive
(logits, their fp32 copy, log-softmax, its gradient): ~800 MB for 1,000 trained tokens, against
~50 MB here.

Matmuls run in `compute_dtype` (the autocast dtype under autocast, else the hidden states'
dtype), the softmax in fp32: the numbers are those of the unfused path under the same autocast.
"""

from __future__ import annotations

import torch

CHUNK = 256  # positions per chunk: 256 × 49k × 4 B = 50 MB of fp32 logits at a time


class _LinearLogSoftmaxGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, compute_dtype: torch.dtype):
        # A frozen head (LoRA): d log p(t)/d hidden = (one_hot(t) − softmax) @ W depends on the
        # position alone, so it is computed here from the logits at hand ([N, H], small) and the
        # backward only scales it by the incoming gradient: two head matmuls instead of three.
        jacobian = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            n = hidden.shape[0]
            logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(logp)
            argmax = torch.empty(n, dtype=torch.long, device=hidden.device)
            jac = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if jacobian else None
            for s in range(0, n, chunk):
                logits = (hidden[s:s + chunk].to(compute_dtype) @ w.T).float()
                lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
                logp[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None])[:, 0] - lse[s:s + chunk]
                argmax[s:s + chunk] = logits.argmax(-1)
                if jacobian:
                    g = torch.exp(logits.sub_(lse[s:s + chunk, None])).neg_()
                    g.scatter_add_(-1, targets[s:s + chunk, None], torch.ones_like(g[:, :1]))
                    jac[s:s + chunk] = g.to(compute_dtype) @ w
        if jacobian:
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.compute_dtype, ctx.jacobian, ctx.hidden_dtype = chunk, compute_dtype, jacobian, hidden.dtype
        ctx.mark_non_differentiable(argmax)
        return logp, argmax

    @staticmethod
    def backward(ctx, grad_logp, _grad_argmax):
        if ctx.jacobian:
            (jac,) = ctx.saved_tensors
            return (jac * grad_logp[:, None].float()).to(ctx.hidden_dtype), None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        dtype, chunk = ctx.compute_dtype, ctx.chunk
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(dtype)
                g_out = grad_logp[s:s + chunk, None].float()
                # d log p(t) / d logits = one_hot(t) − softmax
                g = torch.exp((h @ w.T).float() - lse[s:s + chunk, None]).mul_(-g_out)
                g.scatter_add_(-1, targets[s:s + chunk, None], g_out)
                g = g.to(dtype)
                if want_hidden:
                    grad_hidden[s:s + chunk] = (g @ w).to(hidden.dtype)
                if want_weight:
                    grad_weight += (g.T @ h).float()
        return (grad_hidden, grad_weight.to(weight.dtype) if want_weight else None, None, None, None)


def linear_log_softmax_gather(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets) [N] fp32, argmax token [N]) of the logits hidden @ weightᵀ, chunked."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _LinearLogSoftmaxGather.apply(hidden, weight, targets, chunk, dtype)


def fusable(causal_lm) -> bool:
    """Whether the model's head is a plain bias-free projection (no soft-capping or scaling) that
    `linear_log_softmax_gather` computes exactly; other heads take the unfused path."""
    head = causal_lm.get_output_embeddings()
    cfg = causal_lm.config
    return (isinstance(head, torch.nn.Linear) and head.bias is None
            and not getattr(cfg, "final_logit_softcapping", None) and not getattr(cfg, "logit_scale", None))
