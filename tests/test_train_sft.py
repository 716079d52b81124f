"""The SFT recipe on the tiny model: recorded losses, learning, frozen/trained parameters,
resume equality, merge equality, accumulation invariance, checkpoint contents, cancel."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import (  # noqa: F401  (fixtures)
    QA,
    chat_file,
    chat_rows,
    tiny_model_dir,
    write_jsonl,
)

from tunehouse.train import events as ev
from tunehouse.train.checkpoint import list_files, read_state
from tunehouse.train.config import SFTConfig
from tunehouse.train.events import MemoryReporter
from tunehouse.train.lora import merge_adapter_folder
from tunehouse.train.sft import Cancelled, run_sft

BASE = dict(model="tunehouse/tiny-llama", training_file="file-test", batch_size=2,
            learning_rate=1e-2, max_seq_length=128, random_seed=0)
TOKENIZER_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
STATE_FILES = ["optimizer.pt", "rng_state.pt", "trainer_state.json", "tunehouse_config.json"]
LORA_FILES = sorted(["adapter_config.json", "adapter_model.safetensors"]
                    + TOKENIZER_FILES + STATE_FILES)
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors"]
FULL_FILES = sorted(MODEL_FILES + TOKENIZER_FILES + STATE_FILES)
MERGED_FILES = sorted(f"merged/{name}" for name in MODEL_FILES + TOKENIZER_FILES)

# First 4 train losses of `test_first_losses_match_recorded` (LoRA r=8, lr 1e-2, seed 0, fp32).
RECORDED_LOSSES = [7.147700, 6.993497, 6.237105, 5.031139]


def train(tmp: Path, model_dir: Path, data: Path, *, reporter: MemoryReporter | None = None,
          name: str = "run", **overrides):
    reporter = reporter or MemoryReporter()
    overrides.setdefault("bf16", False)  # the recorded numbers are fp32; bf16=None is the default precision
    cfg = SFTConfig(**{**BASE, **overrides.pop("cfg", {})})
    final = run_sft(cfg, model_path=model_dir, training_path=data,
                    validation_path=overrides.pop("validation_path", None),
                    output_dir=tmp / name, reporter=reporter, **overrides)
    return final, reporter


def base_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_model_dir, chat_file):
    """40 LoRA steps (10 epochs) from a known initial adapter, with 2 evaluations."""
    from transformers import AutoModelForCausalLM

    from tunehouse.train.lora import add_lora

    tmp = tmp_path_factory.mktemp("memorised")
    torch.manual_seed(123)
    init = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=8, alpha=16,
                    dropout=0.0, modules="all-linear")
    init.save_pretrained(tmp / "init-adapter", save_embedding_layers=False)
    final, reporter = train(tmp, tiny_model_dir, chat_file, init_adapter=tmp / "init-adapter",
                            validation_path=chat_file,
                            cfg=dict(n_epochs=10, n_evals=2, validation_file="file-valid"))
    return tmp, final, reporter


def test_first_losses_match_recorded(tmp_path, tiny_model_dir, chat_file):
    _, reporter = train(tmp_path, tiny_model_dir, chat_file)
    assert reporter.losses()[:4] == pytest.approx(RECORDED_LOSSES, abs=1e-4)


# Bound on the largest |bf16 − fp32| train loss over the 12 steps of `test_bf16_default_trains_like_fp32`
# (measured 0.033-0.036 on 2026-11-30, AVX512-BF16 CPU); the margin leaves room for other bf16 CPUs.
BF16_LOSS_GAP = 0.05


def test_bf16_default_trains_like_fp32(tmp_path, tiny_model_dir, chat_file):
    """The default precision (bf16 where the CPU has it: frozen base weights stored in bf16,
    LoRA masters and the loss in fp32) gives the fp32 losses within BF16_LOSS_GAP, and still learns."""
    from tunehouse.train.precision import bf16_default

    if not bf16_default(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16: the default is fp32")
    cfg = dict(n_epochs=3)
    _, low = train(tmp_path, tiny_model_dir, chat_file, name="default", bf16=None, cfg=cfg)
    _, high = train(tmp_path, tiny_model_dir, chat_file, name="fp32", bf16=False, cfg=cfg)
    gap = max(abs(a - b) for a, b in zip(low.losses(), high.losses()))
    print(f"bf16 vs fp32: max |loss gap| {gap:.4f} over {len(high.losses())} steps")
    assert len(low.losses()) == len(high.losses()) >= 6
    assert gap < BF16_LOSS_GAP
    assert low.losses()[-1] < 0.8 * low.losses()[0]


def test_loss_decreases_and_metrics_and_events(memorised):
    _, _, reporter = memorised
    losses = reporter.losses()
    assert len(losses) >= 30
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0]
    step, last = reporter.metric_rows[-1]
    assert set(last) == {"train_loss", "lr", "grad_norm", "tokens_per_second",
                         "train_mean_token_accuracy", "epoch", "valid_loss",
                         "valid_mean_token_accuracy"}
    assert last["epoch"] == 10.0 and last["train_mean_token_accuracy"] > 0.9
    assert last["valid_loss"] < 1.0  # the validation file is the training file
    types = reporter.event_types()
    assert types[0] == ev.TRAINING_START and types[-1] == ev.TRAINING_COMPLETE
    assert types.count(ev.EPOCH_COMPLETE) == 10 and types.count(ev.EVAL_COMPLETE) == 2
    assert reporter.events[1]["message"].startswith("Epoch completed, at step ")
    assert reporter.checkpoints == [(step, reporter.checkpoints[0][1], "Final")]


def test_every_trainable_parameter_changed_and_frozen_ones_did_not(memorised, tiny_model_dir):
    tmp, final, _ = memorised
    init = load_file(tmp / "init-adapter" / "adapter_model.safetensors")
    trained = load_file(final / "adapter_model.safetensors")
    assert set(init) == set(trained) and len(trained) == 2 * 7 * 2  # A, B × 7 linears × 2 layers
    for name, tensor in trained.items():
        assert not torch.equal(tensor, init[name]), name
    # Frozen base: merged = base + (alpha/r)·B·A on adapted linears, bit-equal elsewhere.
    base, merged = base_state(tiny_model_dir), load_file(final / "merged" / "model.safetensors")
    assert set(base) == set(merged)
    for name, w in merged.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        a, b = trained.get(prefix + ".lora_A.weight"), trained.get(prefix + ".lora_B.weight")
        if a is None:
            assert torch.equal(w, base[name]), name
        else:
            assert torch.allclose(w, base[name] + 2.0 * b @ a, atol=1e-6), name


@torch.no_grad()
def test_merged_weights_give_the_adapter_logits(memorised, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, final, _ = memorised
    ids = torch.tensor([[1, 303, 277, 201, 42, 75, 264, 2, 201, 1, 67]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    want = adapted(input_ids=ids).logits
    assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)
    assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-2)
    # the same merge, done afterwards from the folders (continuing a job from a LoRA parent)
    again = merge_adapter_folder(tiny_model_dir, final, tmp_path / "merged-again")
    assert list_files(again) == sorted(MODEL_FILES + TOKENIZER_FILES)
    assert torch.allclose(AutoModelForCausalLM.from_pretrained(again)(input_ids=ids).logits, want,
                          atol=1e-4)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, chat_file):
    cfg = dict(n_epochs=4, n_checkpoints=2, lora_dropout=0.1)  # dropout: the RNG must resume too
    full, whole = train(tmp_path, tiny_model_dir, chat_file, name="whole", cfg=cfg)
    total = len(whole.losses())
    (mid_step, mid, kind), _ = whole.checkpoints
    assert kind == "Intermediate" and mid_step == total // 2
    assert mid == tmp_path / "whole" / "checkpoints" / f"step-{mid_step:06d}"
    assert list_files(mid) == LORA_FILES
    assert list_files(full) == sorted(LORA_FILES + MERGED_FILES)
    state = read_state(mid)
    assert (state["step"], state["total_steps"], state["seed"]) == (mid_step, total, 0)
    assert [m["train_loss"] for m in state["metrics"]] == whole.losses()[:mid_step]

    resumed_final, resumed = train(tmp_path, tiny_model_dir, chat_file, name="resumed", cfg=cfg,
                                   resume_from=mid)
    assert [s for s, _ in resumed.metric_rows] == list(range(mid_step + 1, total + 1))
    assert resumed.losses() == pytest.approx(whole.losses()[mid_step:], abs=1e-6)
    a, b = (load_file(f / "adapter_model.safetensors") for f in (full, resumed_final))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert len(read_state(resumed_final)["metrics"]) == total


def test_batch_8x1_equals_2x4_equals_1x8(tmp_path, tiny_model_dir, chat_file):
    runs = []
    for accumulation in (1, 4, 8):
        final, reporter = train(tmp_path, tiny_model_dir, chat_file, name=f"acc{accumulation}",
                                cfg=dict(batch_size=8, gradient_accumulation_steps=accumulation,
                                         packing=False))
        runs.append((load_file(final / "adapter_model.safetensors"), reporter))
    (w1, r1) = runs[0]
    assert len(r1.losses()) == 2  # 16 unpacked examples, 8 per step
    for w, r in runs[1:]:
        assert r.losses() == pytest.approx(r1.losses(), rel=1e-6)
        assert r.losses("grad_norm") == pytest.approx(r1.losses("grad_norm"), rel=1e-5)
        assert all(torch.allclose(w[k], w1[k], atol=1e-6) for k in w1)


def test_full_fine_tuning_changes_every_parameter(tmp_path, tiny_model_dir, chat_file):
    final, reporter = train(tmp_path, tiny_model_dir, chat_file,
                            cfg=dict(lora=False, learning_rate=1e-3, n_epochs=2))
    assert reporter.losses()[-1] < reporter.losses()[0]
    assert list_files(final) == FULL_FILES
    base, trained = base_state(tiny_model_dir), load_file(final / "model.safetensors")
    assert set(base) == set(trained)
    for name in base:
        assert not torch.equal(base[name], trained[name]), name


def test_cancel_stops_without_a_partial_checkpoint(tmp_path, tiny_model_dir, chat_file):
    reporter = MemoryReporter(stop_after_steps=2)
    with pytest.raises(Cancelled) as stopped:
        train(tmp_path, tiny_model_dir, chat_file, reporter=reporter, cfg=dict(n_epochs=3))
    assert stopped.value.step == 2 and len(reporter.metric_rows) == 2
    assert ev.TRAINING_COMPLETE not in reporter.event_types() and reporter.checkpoints == []
    out = tmp_path / "run"
    assert not out.exists() or list_files(out) == []


def test_init_adapter_of_another_rank_is_refused(memorised, tmp_path, tiny_model_dir, chat_file):
    _, final, _ = memorised
    with pytest.raises(ValueError, match="r=8, the job asks for r=4"):
        train(tmp_path, tiny_model_dir, chat_file, init_adapter=final, cfg=dict(lora_r=4))


def test_text_and_pretokenised_data_train(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The cat sat on the mat."}] * 4)
    _, reporter = train(tmp_path, tiny_model_dir, text, name="text")
    assert all(math.isfinite(x) for x in reporter.losses())
    table = pa.table({"input_ids": [[5, 6, 7, 8]] * 4, "labels": [[-100, 6, 7, 8]] * 4})
    pq.write_table(table, tmp_path / "tok.parquet")
    _, reporter = train(tmp_path, tiny_model_dir, tmp_path / "tok.parquet", name="parquet")
    assert all(math.isfinite(x) for x in reporter.losses())


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        SFTConfig(model="m", training_file="f", n_epochs=0, learning_rate=0.0, warmup_ratio=2.0, batch_size=8,
                  lora_dropout=1.0, lr_scheduler_type="step", train_on_inputs="yes", n_evals=2,
                  lora_trainable_modules="q_proj,,v_proj", gradient_accumulation_steps=9)
    message = str(err.value)
    for field in ("n_epochs", "learning_rate", "warmup_ratio", "lora_dropout", "lr_scheduler_type",
                  "train_on_inputs", "n_evals", "lora_trainable_modules",
                  "gradient_accumulation_steps"):
        assert field in message
    assert "n_epochs must be an integer ≥ 1, got 0" in message
    cfg = SFTConfig(model="m", training_file="f", validation_file="")
    assert cfg.validation_file is None
    assert SFTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        SFTConfig.from_dict({**cfg.to_dict(), "dpo_beta": 0.1})


@pytest.mark.slow
def test_three_lora_steps_on_the_default_model(tmp_path):
    from tunehouse.models.default import ensure_default_model

    model_dir = ensure_default_model(Path.home() / ".cache" / "tunehouse-test")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(6))
    final, reporter = train(tmp_path, model_dir, data, cfg=dict(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", batch_size=2, learning_rate=1e-3,
        max_seq_length=256, packing=False))
    losses = reporter.losses()
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    adapter = load_file(final / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())


def test_early_stopping_keeps_the_best_evaluation_weights(tmp_path, tiny_model_dir, chat_file):
    """Validation data that contradicts the training answers: its loss turns up as the model
    memorises, training stops `patience` evaluations after the best one, and the final weights
    are the best evaluation's (equal to the intermediate checkpoint of that step)."""
    from tunehouse.train.early_stopping import EarlyStopping

    answers = [a for _, a in QA]
    contradicting = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answers[i - 3]}]}
                     for i, (q, _) in enumerate(QA)]
    valid = write_jsonl(tmp_path / "valid.jsonl", contradicting)
    cfg = dict(n_epochs=6, n_evals=12, n_checkpoints=12, validation_file="file-valid", early_stopping_enabled=True,
               early_stopping_patience=2, early_stopping_warmup_evals=1)
    final, reporter = train(tmp_path, tiny_model_dir, chat_file, validation_path=valid, cfg=cfg)
    total = next(e["total_steps"] for e in reporter.events if e["type"] == ev.TRAINING_START)
    evals = [(s, v["valid_loss"]) for s, v in reporter.metric_rows if "valid_loss" in v]
    verdict = EarlyStopping(patience=2, warmup_evals=1).verdict(evals)
    stopped = reporter.metric_rows[-1][0]
    assert verdict.stop and stopped == evals[-1][0] < total  # it stopped at the deciding evaluation
    assert not EarlyStopping(patience=2, warmup_evals=1).verdict(evals[:-1]).stop  # and not before
    done = [e for e in reporter.events if e["type"] == ev.TRAINING_COMPLETE][-1]
    assert done["early_stopping_best_step"] == verdict.best_step and "stopped early" in done["message"]
    assert done["early_stopping_best_metric_value"] == pytest.approx(min(v for _, v in evals[1:]))
    final_step, _, kind = reporter.checkpoints[-1]
    assert (final_step, kind) == (verdict.best_step, ev.FINAL)
    best = tmp_path / "run" / "checkpoints" / f"step-{verdict.best_step:06d}"
    a, b = (load_file(f / "adapter_model.safetensors") for f in (best, final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_gives_the_same_losses(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    """Recomputing each layer in the backward (on from registry.CHECKPOINT_FROM_TOKENS tokens per
    micro-batch, or forced by $TUNEHOUSE_ACTIVATION_CHECKPOINTING=1) changes memory, not numbers."""
    monkeypatch.setenv("TUNEHOUSE_ACTIVATION_CHECKPOINTING", "1")
    _, reporter = train(tmp_path, tiny_model_dir, chat_file)
    assert any("checkpointing on" in e["message"] for e in reporter.events)
    assert reporter.losses()[:4] == pytest.approx(RECORDED_LOSSES, abs=1e-4)
