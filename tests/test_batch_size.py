"""`batch_size: "max"`: the memory model in `fit_batch`, checked against hand-computed values."""

from __future__ import annotations

from tunehouse.train.batch_size import fit_batch

GIB = 1 << 30


def test_lora_batch_fits_activations_in_free_memory():
    """n_params 1e9 in bf16 (2 GB of weights), 16 layers x hidden 2048 x 2048 tokens:
    one row's activations = 2048 * 16 * 2048 * 34 B = 2.28e9 B. With 20 GiB free:
    0.8 * 21.47e9 - 2e9 = 15.18e9 → 6 rows fit → the power of two below: 4."""
    assert fit_batch(20 * GIB, n_params=10**9, hidden=2048, n_layers=16, seq_len=2048, bytes_per_param=2,
                     lora=True, max_batch=64) == 4


def test_full_training_pays_for_gradients_and_adam():
    """Same model, full weights: + 12 B per parameter (fp32 grad, m, v) = 12e9 B more →
    15.18e9 - 12e9 = 3.18e9 → 1 row (2.28e9) fits → 1."""
    assert fit_batch(20 * GIB, n_params=10**9, hidden=2048, n_layers=16, seq_len=2048, bytes_per_param=2,
                     lora=False, max_batch=64) == 1


def test_capped_by_max_batch_and_never_below_one():
    assert fit_batch(1000 * GIB, n_params=10**6, hidden=64, n_layers=2, seq_len=128, bytes_per_param=4,
                     lora=True, max_batch=8) == 8
    assert fit_batch(1 * GIB, n_params=10**10, hidden=4096, n_layers=32, seq_len=4096, bytes_per_param=2,
                     lora=True, max_batch=64) == 1
