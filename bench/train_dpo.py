"""LoRA DPO throughput: tunehouse's `run_dpo` vs TRL's DPOTrainer on the same work.

SmolLM2-135M-Instruct (the built-in default), the same synthetic preference pairs (a question, a
longer preferred and a shorter non-preferred answer), LoRA r=8 / alpha 16 on all linear layers,
β 0.1, batch 4 pairs, max length 512 per side, 4 × (steps + 1) pairs (tunehouse stops after
`steps`, before its final save; TRL saves nothing).

    .venv/bin/python bench/train_dpo.py [--steps 6] [--rounds 2]

Each side runs in its own subprocess (separate peak RSS); the sides alternate for `--rounds`
rounds and each keeps its best (the load of a shared machine drifts over minutes). Throughput = pairs per second of
optimizer steps, the first step excluded (warm-up). tunehouse precomputes the reference log-probs
once (adapters off, no gradients) before training; its time is reported apart, and the "with
reference" figure charges it to the same steps (the data is exactly the pairs trained on, so it
is each pair's reference forward, amortised). tunehouse runs as shipped: one forward per pair
(both sides in one packed row), logits only at completion positions, bf16 autocast when the CPU
has native bf16. TRL runs its defaults (reference forward each step with adapters disabled,
padded [chosen; rejected] batch) in fp32, the setting of the DESIGN.md reference figure. The last
line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_sft import CACHE, TOPICS, WORDS  # noqa: E402  (same model cache and vocabulary)

MAX_LEN = 512
BATCH = 4
BETA = 0.1
LR = 1e-4
PACKING = True  # sides packed into rows of ≤ MAX_LEN tokens (as shipped: the config default)


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """n (question, preferred 5–10-sentence answer, non-preferred 2–5-sentence answer), seeded."""
    rng = random.Random(seed)

    def answer(lo: int, hi: int) -> str:
        return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize()
                        + "." for _ in range(rng.randint(lo, hi)))

    return [{"question": f"Tell me something about {TOPICS[i % len(TOPICS)]}, please.",
             "chosen": answer(5, 10), "rejected": answer(2, 5)} for i in range(n)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_tunehouse(model_dir: Path, steps: int, bf16: bool) -> dict:
    from tunehouse.train import dpo
    from tunehouse.train.config import DPOConfig
    from tunehouse.train.events import MemoryReporter

    tmp = Path(tempfile.mkdtemp(prefix="bench-tunehouse-dpo-"))
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": r["question"]}]},
        "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
        "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}]}) + "\n"
        for r in synthetic_pairs((steps + 1) * BATCH)))
    cfg = DPOConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file="file-bench",
                    batch_size=BATCH, learning_rate=LR, lr_scheduler_type="linear",
                    max_seq_length=MAX_LEN, packing=PACKING, lora=True, lora_r=8, lora_alpha=16,
                    lora_trainable_modules="all-linear", dpo_beta=BETA, random_seed=42)
    reference_seconds = []
    real = dpo.reference_logps

    def timed(run, pairs):
        t0 = time.perf_counter()
        out = real(run, pairs)
        reference_seconds.append(time.perf_counter() - t0)
        return out

    dpo.reference_logps = timed
    reporter = MemoryReporter(stop_after_steps=steps)  # cancel before the last step: no save
    try:
        dpo.run_dpo(cfg, model_path=model_dir, training_path=data, validation_path=None,
                    output_dir=tmp / "out", reporter=reporter, reference_cache_dir=tmp / "cache",
                    reference_id="bench", bf16=bf16)
    except dpo.Cancelled:
        pass
    rates = reporter.losses("pairs_per_second")
    train_seconds = sum(BATCH / r for r in rates[1:])
    # the precompute covered steps + 1 batches; charge the timed steps their share
    ref_seconds = sum(reference_seconds) * (len(rates) - 1) / (len(rates) + 1)
    pairs = BATCH * (len(rates) - 1)
    return {"pairs_per_second": pairs / train_seconds,
            "pairs_per_second_with_reference": pairs / (train_seconds + ref_seconds),
            "reference_seconds": sum(reference_seconds), "steps": len(rates),
            "losses": reporter.losses(), "peak_rss_mb": peak_rss_mb()}


def side_trl(model_dir: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(42)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                                 for r in synthetic_pairs(steps * BATCH)])
    timings: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            timings.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-dpo-"), max_length=MAX_LEN,
                     per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     learning_rate=LR, lr_scheduler_type="linear", max_steps=steps, beta=BETA,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     seed=42, dataloader_num_workers=0)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Clock()])
    trainer.train()
    return {"pairs_per_second": BATCH * (len(timings) - 1) / sum(timings[1:]),
            "steps": len(timings), "losses": losses, "peak_rss_mb": peak_rss_mb()}


def run_side(name: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--side", name, "--steps", str(steps)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"{name} side failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per side")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side; the best is kept")
    parser.add_argument("--side", choices=["tunehouse", "trl"])
    args = parser.parse_args()

    from tunehouse.models.default import ensure_default_model
    from tunehouse.train.precision import cpu_supports_bf16

    model_dir = ensure_default_model(CACHE, progress=lambda m: print(m, file=sys.stderr))
    if args.side:
        result = (side_trl(model_dir, args.steps) if args.side == "trl"
                  else side_tunehouse(model_dir, args.steps, bf16=cpu_supports_bf16()))
        print(json.dumps(result))
        return

    bf16 = cpu_supports_bf16()
    runs: dict[str, list[dict]] = {"tunehouse": [], "trl": []}
    for _ in range(max(1, args.rounds)):
        runs["tunehouse"].append(run_side("tunehouse", args.steps))
        runs["trl"].append(run_side("trl", args.steps))
    th, trl = (max(runs[k], key=lambda r: r["pairs_per_second"]) for k in ("tunehouse", "trl"))
    for name, rs in runs.items():
        print(f"{name} rounds: {', '.join(format(r['pairs_per_second'], '.3f') for r in rs)} pairs/s")
    speedup = th["pairs_per_second"] / trl["pairs_per_second"]
    with_ref = th["pairs_per_second_with_reference"] / trl["pairs_per_second"]
    rss_ratio = th["peak_rss_mb"] / trl["peak_rss_mb"]
    print(f"tunehouse ({'bf16' if bf16 else 'fp32'}): {th['pairs_per_second']:.2f} pairs/s "
          f"training, {th['pairs_per_second_with_reference']:.2f} pairs/s with the reference "
          f"precompute ({th['reference_seconds']:.1f} s for {(args.steps + 1) * BATCH} pairs), "
          f"peak RSS "
          f"{th['peak_rss_mb']:.0f} MB, losses {[round(x, 4) for x in th['losses']]}")
    print(f"TRL DPOTrainer (fp32): {trl['pairs_per_second']:.2f} pairs/s, peak RSS "
          f"{trl['peak_rss_mb']:.0f} MB, losses {[round(x, 4) for x in trl['losses']]}")
    print(f"speedup {speedup:.2f}x ({with_ref:.2f}x with the reference), RSS ratio {rss_ratio:.2f}")
    print(json.dumps({
        "steps": args.steps, "rounds": args.rounds, "batch_pairs": BATCH, "max_seq_length": MAX_LEN, "bf16": bf16,
        "tunehouse_pairs_per_second": round(th["pairs_per_second"], 3),
        "tunehouse_pairs_per_second_with_reference":
            round(th["pairs_per_second_with_reference"], 3),
        "tunehouse_reference_seconds": round(th["reference_seconds"], 2),
        "tunehouse_peak_rss_mb": round(th["peak_rss_mb"]),
        "trl_pairs_per_second": round(trl["pairs_per_second"], 3),
        "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
        "speedup": round(speedup, 2), "speedup_with_reference": round(with_ref, 2),
        "rss_ratio": round(rss_ratio, 3),
    }))


if __name__ == "__main__":
    main()
