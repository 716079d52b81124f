"""The DPO recipe on the tiny model: recorded losses, a learnable preference task, KL from 0,
the reference (adapters off, a continued SFT adapter, the cache), SimPO without a reference,
resume equality, accumulation invariance, truncation, checkpoint contents, cancel, full weights."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny_model_dir, tiny_tokenizer, write_jsonl  # noqa: F401  (fixtures)

from tunehouse.data.preference import collate_pairs, tokenize_pair, truncate_pair
from tunehouse.train import dpo
from tunehouse.train import events as ev
from tunehouse.train.checkpoint import list_files, read_state
from tunehouse.train.config import DPOConfig, SFTConfig
from tunehouse.train.events import MemoryReporter
from tunehouse.train.losses import segment_logps, trained_logits

BASE = dict(model="tunehouse/tiny-llama", training_file="file-test", batch_size=4,
            learning_rate=1e-2, max_seq_length=64, random_seed=0, dpo_beta=0.5)
TOKENIZER_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
STATE_FILES = ["optimizer.pt", "rng_state.pt", "trainer_state.json", "tunehouse_config.json"]
LORA_FILES = sorted(["adapter_config.json", "adapter_model.safetensors"]
                    + TOKENIZER_FILES + STATE_FILES)
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors"]
MERGED_FILES = sorted(f"merged/{name}" for name in MODEL_FILES + TOKENIZER_FILES)
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]

# First 4 train losses of `test_first_losses_match_recorded` (LoRA r=8, lr 1e-2, β 0.5, seed 0,
# fp32).
RECORDED_LOSSES = [0.693147, 1.608370, 0.782711, 1.198923]


def say_rows(n: int, shift: int = 3) -> list[dict]:
    """ "Say X." → preferred "X", non-preferred another word (X shifted by `shift` in WORDS)."""
    return [{"input": {"messages": [{"role": "user", "content": f"Say {WORDS[i % 8]}."}]},
             "preferred_output": [{"role": "assistant", "content": WORDS[i % 8]}],
             "non_preferred_output": [{"role": "assistant", "content": WORDS[(i + shift) % 8]}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def say_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "say24.jsonl", say_rows(24))


@pytest.fixture(scope="module")
def learn_files(tmp_path_factory) -> tuple[Path, Path]:
    """All 56 (word, wrong word) "Say X" pairs: 40 to train on, 16 held out."""
    def row(i: int, shift: int) -> dict:
        return say_rows(i + 1, shift)[i]

    pairs = [(i, s) for s in range(1, 8) for i in range(8)]
    held = [(i, s) for i, s in pairs if (3 * i + s) % 7 in (0, 4)]
    folder = tmp_path_factory.mktemp("learn")
    return (write_jsonl(folder / "train.jsonl", [row(*p) for p in pairs if p not in held]),
            write_jsonl(folder / "held-out.jsonl", [row(*p) for p in held]))


def train(tmp: Path, model_dir: Path, data: Path, *, reporter: MemoryReporter | None = None,
          name: str = "run", **overrides):
    reporter = reporter or MemoryReporter()
    overrides.setdefault("bf16", False)  # the recorded numbers are fp32; bf16=None is the default precision
    cfg = DPOConfig(**{**BASE, **overrides.pop("cfg", {})})
    final = dpo.run_dpo(cfg, model_path=model_dir, training_path=data,
                        validation_path=overrides.pop("validation_path", None),
                        output_dir=tmp / name, reporter=reporter, **overrides)
    return final, reporter


@pytest.fixture()
def reference_calls(monkeypatch) -> list[int]:
    """Counts reference forwards: every one goes through `dpo.reference_model`."""
    calls: list[int] = []
    real = dpo.reference_model

    def counting(run):
        calls.append(1)
        return real(run)

    monkeypatch.setattr(dpo, "reference_model", counting)
    return calls


LEARN = dict(n_epochs=3, n_evals=2, validation_file="file-valid", learning_rate=3e-3,
             dpo_beta=0.1, lora_r=16)


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_model_dir, learn_files):  # noqa: F811
    """3 epochs (30 steps) on 40 "Say X" pairs, evaluated on 16 held-out pairs at 0, 15, 30."""
    tmp = tmp_path_factory.mktemp("learned")
    train_file, held_out = learn_files
    final, reporter = train(tmp, tiny_model_dir, train_file, validation_path=held_out,
                            reference_cache_dir=tmp / "cache", cfg=LEARN)
    return tmp, final, reporter


def test_first_losses_match_recorded(tmp_path, tiny_model_dir, say_file):  # noqa: F811
    _, reporter = train(tmp_path, tiny_model_dir, say_file)
    assert reporter.losses()[:4] == pytest.approx(RECORDED_LOSSES, abs=1e-4)
    assert reporter.losses()[0] == pytest.approx(0.693147, abs=1e-6)  # π = ρ at step 1: log 2


def test_bf16_reference_and_policy_agree_at_step_one(tmp_path, tiny_model_dir, say_file):  # noqa: F811
    """Under bf16 autocast the precomputed reference and the first policy forward take the same
    path (fused head, packed attention), so π = ρ exactly and the first loss is log 2."""
    from tunehouse.train.precision import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    _, reporter = train(tmp_path, tiny_model_dir, say_file, bf16=True, cfg=dict(n_epochs=1))
    assert reporter.losses()[0] == pytest.approx(0.693147, abs=1e-6)


def test_preference_is_learned_and_kl_grows_from_zero(learned):
    _, final, reporter = learned
    evals = [(step, v) for step, v in reporter.metric_rows if "valid_loss" in v]
    assert [step for step, _ in evals] == [0, 15, 30]
    (_, first), _, (_, last) = evals
    # step 0: policy = reference, so every reward is 0: no pair is ranked right (ties), loss log 2
    assert first["valid/rewards/accuracies"] <= 0.5
    assert first["valid_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert last["valid/rewards/accuracies"] >= 0.9 and last["valid/rewards/margins"] > 0
    assert 0.01 < evals[1][1]["kl"] and last["kl"] > 0.01
    assert set(last) == {"train_loss", "lr", "grad_norm", "pairs_per_second", "tokens_per_second",
                         "rewards/chosen", "rewards/rejected", "rewards/margins",
                         "rewards/accuracies", "logps/chosen", "logps/rejected", "kl/estimate",
                         "epoch", "valid_loss", "valid/rewards/chosen", "valid/rewards/rejected",
                         "valid/rewards/margins", "valid/rewards/accuracies", "valid/logps/chosen",
                         "valid/logps/rejected", "kl"}
    types = reporter.event_types()
    assert types[0] == ev.TRAINING_START and types[-1] == ev.TRAINING_COMPLETE
    assert types.count(ev.EPOCH_COMPLETE) == 3 and types.count(ev.EVAL_COMPLETE) == 2
    assert list_files(final) == sorted(LORA_FILES + MERGED_FILES)  # no "reference" adapter


def test_reference_cache_is_written_once_and_reused(learned, tmp_path, tiny_model_dir,  # noqa: F811
                                                    learn_files, reference_calls):
    tmp, _, first = learned
    files = sorted((tmp / "cache").iterdir())
    assert len(files) == 2  # the training file and the validation file
    stamps = [f.stat().st_mtime_ns for f in files]
    _, again = train(tmp_path, tiny_model_dir, learn_files[0], validation_path=learn_files[1],
                     reference_cache_dir=tmp / "cache", cfg={**LEARN, "n_epochs": 1, "n_evals": 1})
    # the evaluations' KL still runs the reference (full-vocabulary logits are not cached) …
    eval_batches = 2 * 4  # steps 0 and 10, 16 held-out pairs in micro-batches of 4
    assert len(reference_calls) == eval_batches
    # … but no log-prob precomputation: same files, untouched, and the same step-1 loss
    assert sorted((tmp / "cache").iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert again.losses()[:2] == pytest.approx(first.losses()[:2], abs=1e-6)


def test_simpo_runs_no_reference_forward(tmp_path, tiny_model_dir, say_file,  # noqa: F811
                                         reference_calls):
    _, reporter = train(tmp_path, tiny_model_dir, say_file, reference_cache_dir=tmp_path / "cache",
                        cfg=dict(simpo_gamma=0.5, dpo_beta=2.0))
    assert reference_calls == [] and not (tmp_path / "cache").exists()
    last = reporter.metric_rows[-1][1]
    assert "kl/estimate" not in last and "rewards/chosen" in last
    assert all(math.isfinite(loss) for loss in reporter.losses())


@torch.no_grad()
def test_adapters_off_is_the_base_model(tiny_model_dir, tiny_tokenizer):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from tunehouse.train.lora import add_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, alpha=8,
                      dropout=0.0, modules="all-linear").eval()
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.1)  # a trained-looking adapter, so policy ≠ base
    run = SimpleNamespace(cfg=SimpleNamespace(lora=True), model=policy,
                          causal_lm=policy.get_base_model())
    ids = torch.tensor([[1, 303, 277, 201, 42, 75, 264, 2, 201, 1, 67]])
    with dpo.reference_model(run) as reference:
        off = reference(input_ids=ids).logits
    assert torch.equal(off, base(input_ids=ids).logits)
    assert not torch.allclose(policy(input_ids=ids).logits, off, atol=1e-3)


def test_continuing_an_sft_adapter_uses_it_as_the_reference(tmp_path, tiny_model_dir,  # noqa: F811
                                                            tiny_tokenizer, say_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunehouse.train.sft import run_sft

    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": r["input"]["messages"] + r["preferred_output"]} for r in say_rows(8)])
    sft = run_sft(SFTConfig(model="tunehouse/tiny-llama", training_file="f", batch_size=4,
                            learning_rate=1e-2, max_seq_length=64, random_seed=0, n_epochs=2),
                  model_path=tiny_model_dir, training_path=chat, validation_path=None,
                  output_dir=tmp_path / "sft", reporter=MemoryReporter())
    final, _ = train(tmp_path, tiny_model_dir, say_file, init_adapter=sft,
                     reference_cache_dir=tmp_path / "cache", cfg=dict(n_epochs=1))
    assert list_files(final) == sorted(LORA_FILES + MERGED_FILES)
    (cache,) = (tmp_path / "cache").iterdir()
    cached = torch.load(cache, weights_only=True)["logps"]

    pairs = [tokenize_pair(row, tiny_tokenizer, max_seq_length=64) for row in say_rows(24)]
    batch = collate_pairs(pairs, pad_id=0)

    def logps(model) -> torch.Tensor:
        with torch.no_grad():
            logits, targets = trained_logits(model, batch.model_inputs(), batch.targets, batch.index)
        return segment_logps(logits, targets, batch.segment, 48).view(-1, 2)

    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.allclose(cached, logps(sft_model.merge_and_unload()), atol=1e-4)
    assert not torch.allclose(cached, logps(base), atol=0.1)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, say_file):  # noqa: F811
    cfg = dict(n_epochs=2, n_checkpoints=2, lora_dropout=0.1)  # dropout: the RNG must resume too
    full, whole = train(tmp_path, tiny_model_dir, say_file, name="whole", cfg=cfg,
                        reference_cache_dir=tmp_path / "cache")
    total = len(whole.losses())
    (mid_step, mid, kind), _ = whole.checkpoints
    assert kind == "Intermediate" and mid_step == total // 2 == 6
    assert list_files(mid) == LORA_FILES
    assert list_files(full) == sorted(LORA_FILES + MERGED_FILES)
    state = read_state(mid)
    assert (state["step"], state["total_steps"], state["seed"]) == (mid_step, total, 0)

    resumed_final, resumed = train(tmp_path, tiny_model_dir, say_file, name="resumed", cfg=cfg,
                                   resume_from=mid, reference_cache_dir=tmp_path / "cache")
    assert [s for s, _ in resumed.metric_rows] == list(range(mid_step + 1, total + 1))
    assert resumed.losses() == pytest.approx(whole.losses()[mid_step:], abs=1e-6)
    a, b = (load_file(f / "adapter_model.safetensors") for f in (full, resumed_final))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_batch_8x1_equals_2x4_equals_1x8(tmp_path, tiny_model_dir, say_file):  # noqa: F811
    runs = []
    for accumulation in (1, 4, 8):
        final, reporter = train(tmp_path, tiny_model_dir, say_file, name=f"acc{accumulation}",
                                cfg=dict(batch_size=8, gradient_accumulation_steps=accumulation,
                                         packing=False))
        runs.append((load_file(final / "adapter_model.safetensors"), reporter))
    (w1, r1) = runs[0]
    assert len(r1.losses()) == 3  # 24 pairs, 8 per step
    for w, r in runs[1:]:
        assert r.losses() == pytest.approx(r1.losses(), rel=1e-5)
        assert r.losses("grad_norm") == pytest.approx(r1.losses("grad_norm"), rel=1e-4)
        assert r.losses("rewards/margins") == pytest.approx(r1.losses("rewards/margins"),
                                                            rel=1e-5, abs=1e-6)
        # lr 1e-2 Adam turns float-rounding differences of the summation order into ~1e-5
        assert all(torch.allclose(w[k], w1[k], atol=5e-5) for k in w1)


def test_truncation_cuts_the_prompt_from_the_left_then_the_completion():
    prompt, chosen, rejected = list(range(100, 120)), [1, 2, 3, 4], [5, 6]
    kept = truncate_pair(prompt, chosen, rejected, max_seq_length=16)
    assert kept.prompt == prompt[-12:] and kept.chosen == chosen and kept.truncated
    # the prompt keeps at least half the limit, then the completion is cut from the right
    long = truncate_pair(prompt, list(range(30)), rejected, max_seq_length=16)
    assert (long.prompt, long.chosen, long.rejected) == (prompt[-8:], list(range(8)), rejected)
    fits = truncate_pair(prompt[:4], chosen, rejected, max_seq_length=16)
    assert (fits.prompt, fits.chosen, fits.truncated) == (prompt[:4], chosen, False)


def test_full_fine_tuning_dpo_with_truncation(tmp_path, tiny_model_dir,  # noqa: F811
                                              tiny_tokenizer):
    rows = say_rows(8)
    rows[0]["input"]["messages"][0]["content"] = "Please, " * 20 + "say red."  # too long
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    final, reporter = train(tmp_path, tiny_model_dir, data, cfg=dict(
        lora=False, learning_rate=1e-3, max_seq_length=40, n_epochs=2, n_evals=1))
    warnings = [e["message"] for e in reporter.events if e["type"] == ev.WARNING]
    assert warnings == ["1 training pairs longer than max_seq_length 40 were truncated "
                        "(prompt from the left first, then the completion from the right)"]
    pair = tokenize_pair(rows[0], tiny_tokenizer, max_seq_length=40)
    prompt = tiny_tokenizer.decode(pair.prompt)  # cut from the left: its end is kept
    assert prompt.endswith("say red.<|im_end|>\n<|im_start|>assistant\n")
    assert list_files(final) == sorted(MODEL_FILES + TOKENIZER_FILES + STATE_FILES)
    evals = [v for _, v in reporter.metric_rows if "kl" in v]  # frozen copy: KL still measured
    assert evals[0]["kl"] == pytest.approx(0.0, abs=1e-6) and evals[-1]["kl"] > 0
    base = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(final / "model.safetensors")
    assert all(not torch.equal(base[k], trained[k]) for k in base)


def test_cancel_stops_without_a_partial_checkpoint(tmp_path, tiny_model_dir,  # noqa: F811
                                                   say_file):
    reporter = MemoryReporter(stop_after_steps=2)
    with pytest.raises(dpo.Cancelled) as stopped:
        train(tmp_path, tiny_model_dir, say_file, reporter=reporter, cfg=dict(n_epochs=3))
    assert stopped.value.step == 2 and len(reporter.metric_rows) == 2
    assert ev.TRAINING_COMPLETE not in reporter.event_types() and reporter.checkpoints == []
    out = tmp_path / "run"
    assert not out.exists() or list_files(out) == []


def test_config_fields_track_sft_and_simpo_forces_its_flags():
    import dataclasses

    sft = {f.name: f for f in dataclasses.fields(SFTConfig)}
    ours = {f.name: f for f in dataclasses.fields(DPOConfig)}
    assert set(sft) - set(ours) == {"train_on_inputs"}
    assert set(ours) - set(sft) == {"dpo_beta", "dpo_normalize_logratios_by_length",
                                    "dpo_reference_free", "rpo_alpha", "simpo_gamma"}
    for name in set(sft) & set(ours):
        assert (ours[name].type, ours[name].default) == (sft[name].type, sft[name].default), name
    cfg = DPOConfig(model="m", training_file="f", simpo_gamma=0.5)
    assert cfg.dpo_reference_free and cfg.dpo_normalize_logratios_by_length
    assert DPOConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError) as err:
        DPOConfig(model="m", training_file="f", dpo_beta=0.0, rpo_alpha=-1.0, simpo_gamma=-1,
                  n_epochs=0)
    assert str(err.value) == ("invalid DPO config: n_epochs must be an integer ≥ 1, got 0; "
                              "dpo_beta must be > 0, got 0.0; rpo_alpha must be ≥ 0, got -1.0; "
                              "simpo_gamma must be ≥ 0, got -1")
    with pytest.raises(ValueError, match="unknown field"):
        DPOConfig.from_dict({**cfg.to_dict(), "train_on_inputs": True})
    assert json.loads(json.dumps(cfg.to_dict()))["simpo_gamma"] == 0.5


def test_early_stopping_on_reversed_validation_pairs(tmp_path, tiny_model_dir, say_file):
    """Validation pairs with the preference reversed: their DPO loss rises as the policy learns
    the training preference, so the run stops early with the best evaluation's weights (the
    step-0 evaluation of the reference is not one of the counted evaluations)."""
    reversed_rows = [{**r, "preferred_output": r["non_preferred_output"], "non_preferred_output": r["preferred_output"]}
                     for r in say_rows(8)]
    valid = write_jsonl(tmp_path / "valid.jsonl", reversed_rows)
    final, reporter = train(tmp_path, tiny_model_dir, say_file, validation_path=valid,
                            cfg=dict(n_epochs=4, n_evals=12, n_checkpoints=12, validation_file="file-valid",
                                     early_stopping_enabled=True, early_stopping_warmup_evals=0,
                                     early_stopping_patience=1))
    evals = [(s, v["valid_loss"]) for s, v in reporter.metric_rows if s > 0 and "valid_loss" in v]
    total = next(e["total_steps"] for e in reporter.events if e["type"] == ev.TRAINING_START)
    done = [e for e in reporter.events if e["type"] == ev.TRAINING_COMPLETE][-1]
    assert evals[-1][0] < total and evals[-1][1] >= evals[-2][1]  # stopped at the first rise
    assert all(b < a for (_, a), (_, b) in zip(evals, evals[1:-1]))  # and not before
    assert done["early_stopping_best_step"] == evals[-2][0]
    best = tmp_path / "run" / "checkpoints" / f"step-{evals[-2][0]:06d}"
    a, b = (load_file(f / "adapter_model.safetensors") for f in (best, final))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reference_cache_key_misses_on_every_input(tmp_path):
    """The cached reference log-probs are reused only for the same reference weights, data bytes,
    max_seq_length and precision: each change gives another key."""
    from tunehouse.models.tiny import build_tiny_model
    from tunehouse.train.dpo import reference_cache_key, weights_stamp

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"a": 1}\n')
    model = build_tiny_model(tmp_path / "m", seed=0)
    stamp = weights_stamp(model)
    base = reference_cache_key(f"name|{stamp}", data, 128, False)
    assert reference_cache_key(f"name|{stamp}", data, 128, False) == base  # deterministic
    assert reference_cache_key(f"name|{stamp}", data, 256, False) != base
    assert reference_cache_key(f"name|{stamp}", data, 128, True) != base
    data.write_text('{"a": 2}\n')
    assert reference_cache_key(f"name|{stamp}", data, 128, False) != base
    data.write_text('{"a": 1}\n')
    # The same name with other weights (re-registered, or the folder rewritten): another stamp.
    import shutil

    shutil.rmtree(model)
    assert weights_stamp(build_tiny_model(tmp_path / "m", seed=1)) != stamp
