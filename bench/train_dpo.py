"""LoRA DPO throughput and memory: tunehouse's `run_dpo` vs TRL's DPOTrainer at its best.

SmolLM2-135M-Instruct (the built-in default), the same synthetic preference pairs (a question, a
longer preferred and a shorter non-preferred answer), LoRA r=8 / alpha 16 / dropout 0 on all
linear layers, β 0.1, AdamW lr 1e-4 linear, batch 4 pairs, max length 512, the same torch
thread count, 4 × (steps + 1) pairs.

    .venv/bin/python bench/train_dpo.py [--steps 6] [--rounds 2] [--precision both|bf16|fp32]

Both sides precompute the reference log-probs once before training (tunehouse always does;
TRL `precompute_ref_log_probs=True`), and the throughput counts the optimizer steps, the first
excluded (warm-up); tunehouse's "with reference" figure also charges its precompute to the steps.
TRL 1.16's DPOTrainer has `padding_free` disabled ("temporarily unavailable ... falls back to
standard padding", its DPOConfig says), so TRL pads [chosen; rejected]; tunehouse packs both sides
of a pair into one row. Precisions, like with like: bf16 (tunehouse's default on a CPU with
native bf16; TRL `bf16=True`, the better of fp32 weights under autocast and weights loaded in
bf16) and fp32 vs fp32. TRL runs without gradient checkpointing (its DPOConfig default is on,
which is slower) for its speed; its default, with checkpointing, runs too and its lower peak RSS is
the one the RSS ratio compares against. Each side runs in its own subprocess (separate peak RSS);
the sides alternate for `--rounds` rounds and each keeps its best. The last line printed is one
JSON object (`speedup` = tunehouse ÷ TRL at its best, bf16 where the CPU has it).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from scratch import scratch_dir  # noqa: E402

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

    tmp = scratch_dir("bench-tunehouse-dpo-")
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
    steps_cpu: list[float] = []
    real_step = dpo.train_step

    def timed_step(run, picked, lr):
        c0 = time.process_time()
        out = real_step(run, picked, lr)
        steps_cpu.append(time.process_time() - c0)
        return out

    dpo.train_step = timed_step
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
    return {"pairs_per_second": pairs / train_seconds, "pairs_per_cpu_second": pairs / sum(steps_cpu[1:]),
            "pairs_per_second_with_reference": pairs / (train_seconds + ref_seconds),
            "reference_seconds": sum(reference_seconds), "steps": len(rates),
            "losses": reporter.losses(), "peak_rss_mb": peak_rss_mb(),
            "settings": f"run_dpo, {'bf16 (frozen weights bf16, LoRA fp32, autocast)' if bf16 else 'fp32'}, "
                        f"reference log-probs precomputed, both sides of a pair packed in one row, batch {BATCH} "
                        f"pairs, max_seq_length {MAX_LEN}, LoRA r=8 alpha=16 all-linear, AdamW lr {LR} linear, "
                        f"torch threads {__import__('torch').get_num_threads()}"}


def side_trl(model_dir: Path, steps: int, precision: str, checkpointing: bool) -> dict:
    """precision: "fp32"; "bf16-autocast" (fp32 weights, Trainer bf16); "bf16-weights" (model in bf16)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(42)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                                 for r in synthetic_pairs((steps + 1) * BATCH)])
    timings: list[float] = []
    cpu: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            timings.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    bf16 = precision != "fp32"
    args = DPOConfig(output_dir=str(scratch_dir("bench-trl-dpo-")), max_length=MAX_LEN,
                     per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     learning_rate=LR, lr_scheduler_type="linear", max_steps=steps, beta=BETA,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=bf16,
                     precompute_ref_log_probs=True, padding_free=False,  # True: warns, falls back to padding
                     gradient_checkpointing=checkpointing, seed=42, dataloader_num_workers=0)
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), args=args,
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Clock()])
    trainer.train()
    setup_and_precompute = time.perf_counter() - t0 - sum(timings)
    return {"pairs_per_second": BATCH * (len(timings) - 1) / sum(timings[1:]),
            "pairs_per_cpu_second": BATCH * (len(cpu) - 1) / sum(cpu[1:]),
            "steps": len(timings), "losses": losses, "peak_rss_mb": peak_rss_mb(),
            "setup_and_reference_seconds": setup_and_precompute,
            "settings": f"DPOTrainer {precision} (weights {str(dtype).removeprefix('torch.')}, bf16={bf16}), "
                        f"precompute_ref_log_probs=True, padded (padding_free unavailable in TRL 1.16), "
                        f"gradient_checkpointing={checkpointing}, batch {BATCH} pairs, max_length {MAX_LEN}, "
                        f"LoRA r=8 alpha=16 all-linear, AdamW lr {LR} linear, torch threads {torch.get_num_threads()}"}


SIDES = {  # name → precision
    "tunehouse-bf16": "bf16", "trl-bf16-autocast": "bf16", "trl-bf16-weights": "bf16", "trl-bf16-autocast-gc": "bf16",
    "tunehouse-fp32": "fp32", "trl-fp32": "fp32", "trl-fp32-gc": "fp32",
}


def run_side(name: str, steps: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--side", name, "--steps", str(steps), "--threads", str(threads)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"{name} side failed")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {name}: {result['pairs_per_second']:.3f} pairs/s, {result['pairs_per_cpu_second']:.3f} per CPU-second, peak RSS {result['peak_rss_mb']:.0f} MB",
          file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per side")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side; the best is kept")
    parser.add_argument("--side", choices=list(SIDES))
    parser.add_argument("--precision", choices=["both", "bf16", "fp32"], default="both")
    parser.add_argument("--sides", default="", help="comma list of the sides to run (default: all of the "
                        "precisions asked for); each precision needs its tunehouse side and at least one TRL side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of every side (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tunehouse.models.default import ensure_default_model
    from tunehouse.train.precision import cpu_supports_bf16

    model_dir = ensure_default_model(CACHE, progress=lambda m: print(m, file=sys.stderr))
    if args.side:
        if args.side.startswith("trl"):
            name = args.side.removeprefix("trl-")
            result = side_trl(model_dir, args.steps, name.removesuffix("-gc"), checkpointing=name.endswith("-gc"))
        else:
            result = side_tunehouse(model_dir, args.steps, bf16=args.side == "tunehouse-bf16")
        print(json.dumps(result))
        return

    bf16 = cpu_supports_bf16()
    precisions = [p for p in ("bf16", "fp32") if args.precision in ("both", p) and (p == "fp32" or bf16)]
    sides = [name for name, p in SIDES.items() if p in precisions
             and (not args.sides or name in args.sides.split(","))]
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(max(1, args.rounds)):
        for name in sides:
            runs[name].append(run_side(name, args.steps, args.threads))
    best = {name: max(rs, key=lambda r: r["pairs_per_second"]) for name, rs in runs.items()}
    print(f"SmolLM2-135M-Instruct LoRA DPO, batch {BATCH} pairs, max length {MAX_LEN}, {args.steps} steps "
          f"(first excluded), best of {args.rounds} alternating rounds; CPU native bf16: {bf16}")
    for name in sides:
        r = best[name]
        extra = (f", {r['pairs_per_second_with_reference']:.3f} pairs/s with its reference precompute "
                 f"({r['reference_seconds']:.1f} s)") if name.startswith("tunehouse") else ""
        print(f"{name}: {r['pairs_per_second']:.3f} pairs/s{extra}, {r['pairs_per_cpu_second']:.3f} pairs per "
              f"CPU-second of its process (rounds: "
              f"{', '.join(format(x['pairs_per_second'], '.3f') for x in runs[name])}), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB\n    settings: {r['settings']}\n    losses: {[round(x, 4) for x in r['losses']]}")
    summary = {"steps": args.steps, "rounds": args.rounds, "batch_pairs": BATCH, "max_seq_length": MAX_LEN,
               "bf16": bf16, "threads": torch.get_num_threads()}
    for p in precisions:
        th = best[f"tunehouse-{p}"]
        trls = [n for n in sides if n.startswith("trl") and SIDES[n] == p]
        fastest = max(trls, key=lambda n: best[n]["pairs_per_second"])
        leanest = min(trls, key=lambda n: best[n]["peak_rss_mb"])
        speedup = th["pairs_per_second"] / best[fastest]["pairs_per_second"]
        with_ref = th["pairs_per_second_with_reference"] / best[fastest]["pairs_per_second"]
        rss = th["peak_rss_mb"] / best[leanest]["peak_rss_mb"]
        trl_cpu = max(best[n]["pairs_per_cpu_second"] for n in trls)
        cpu_speedup = th["pairs_per_cpu_second"] / trl_cpu
        print(f"{p} vs {p} per CPU-second: tunehouse {th['pairs_per_cpu_second']:.3f}, TRL's best {trl_cpu:.3f}: "
              f"{cpu_speedup:.2f}x")
        print(f"{p} vs {p}: tunehouse {th['pairs_per_second']:.3f} pairs/s, TRL at its fastest ({fastest}) "
              f"{best[fastest]['pairs_per_second']:.3f}: {speedup:.2f}x ({with_ref:.2f}x counting tunehouse's "
              f"reference precompute); peak RSS {th['peak_rss_mb']:.0f} MB vs TRL's lowest ({leanest}) "
              f"{best[leanest]['peak_rss_mb']:.0f} MB: {rss:.2f}x")
        summary[p] = {"tunehouse_pairs_per_second": round(th["pairs_per_second"], 3),
                      "tunehouse_pairs_per_second_with_reference": round(th["pairs_per_second_with_reference"], 3),
                      "trl_pairs_per_second": round(best[fastest]["pairs_per_second"], 3), "trl_fastest": fastest,
                      "speedup": round(speedup, 2), "speedup_with_reference": round(with_ref, 2),
                      "speedup_cpu_time": round(cpu_speedup, 2),
                      "tunehouse_peak_rss_mb": round(th["peak_rss_mb"]), "trl_lowest_rss_mb": round(best[leanest]["peak_rss_mb"]),
                      "trl_lowest_rss": leanest, "rss_ratio": round(rss, 3)}
    lead = summary[precisions[0]]
    summary.update(speedup=lead["speedup"], rss_ratio=lead["rss_ratio"], speedup_cpu_time=lead["speedup_cpu_time"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
