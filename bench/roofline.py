"""The machine's matmul roofline, measured in the bench's own run, and the fraction of it a
trainer reaches.

    gflops = matmul_gflops(torch.bfloat16, tokens=1024, hidden=576, intermediate=1536, vocab=49152)

times `torch.mm` at the shapes a Llama-style decoder's training step runs (tokens × hidden by
hidden × hidden, by the MLP widths, and a chunk of LM-head rows by the vocabulary), best of a few
repeats each, and returns their FLOP-weighted rate (Σ FLOPs ÷ Σ seconds) in GFLOP/s.

    fraction = tokens_per_second × FLOPS_PER_TOKEN_FACTOR × n_params ÷ (gflops × 1e9)

FLOPs per trained token for LoRA: 4·N (forward 2·N, backward 2·N for the activations' gradients;
the frozen weights get none and the adapters' are < 1% at r=8), N = every parameter of the base
model with the tied LM head counted once, as issue 14 counts (about 740 tokens/s at 398 GFLOP/s
for SmolLM2-135M). Attention's own T² work is left out: the bench's examples are 150-450 tokens,
where it is under 6% of 4·N.
"""

from __future__ import annotations

import time

LORA_FLOPS_PER_PARAM = 4  # per trained token: forward 2N + backward (activation gradients) 2N


def matmul_gflops(dtype, *, tokens: int, hidden: int, intermediate: int, vocab: int,
                  repeats: int = 3, clock=time.perf_counter) -> float:
    """clock: time.perf_counter (wall) or time.process_time (this process's CPU time: on a shared
    machine, the rate of the cores while this process had them)."""
    import torch

    shapes = [(tokens, hidden, hidden), (tokens, hidden, intermediate), (tokens, intermediate, hidden),
              (256, hidden, vocab)]
    flops = seconds = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)  # warm-up (oneDNN primitive creation)
        best = float("inf")
        for _ in range(repeats):
            t0 = clock()
            for _ in range(4):
                torch.mm(a, b)
            best = min(best, (clock() - t0) / 4)
        flops += 2 * m * k * n
        seconds += best
    return flops / seconds / 1e9


def model_shape(model_dir) -> dict:
    """hidden, intermediate, vocab and parameter count (tied head once) from a model folder."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, i, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    kv_dim = h // heads * kv
    per_layer = h * h * 2 + h * kv_dim * 2 + 3 * h * i + 2 * h
    n = layers * per_layer + v * h + h + (0 if cfg.get("tie_word_embeddings", True) else v * h)
    return {"hidden": h, "intermediate": i, "vocab": v, "n_params": n}


def fraction(tokens_per_second: float, n_params: int, gflops: float) -> float:
    return tokens_per_second * LORA_FLOPS_PER_PARAM * n_params / (gflops * 1e9)
