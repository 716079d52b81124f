"""LoRA SFT throughput: tunehouse's recipe vs TRL's SFTTrainer at its best, on the same work.

SmolLM2-135M-Instruct (the built-in default), the same synthetic chat data (loss on the
assistant answers only: tunehouse `train_on_inputs=false`, TRL prompt/completion data with its
default completion-only loss), LoRA r=8 / alpha 16 / dropout 0 on all linear layers, AdamW,
lr 1e-4 linear, the same rows of `--seq-len` tokens per step (both sides pack: tunehouse its
packing, TRL `packing=True` with its default "bfd" strategy, which is its padding-free mode),
the same torch thread count.

    .venv/bin/python bench/train_sft.py [--seq-len 512|2048] [--steps 6] [--rounds 2]
                                        [--precision both|bf16|fp32] [--threads N]
    .venv/bin/python bench/train_sft.py --processes 2 [--steps 8] [--seq-len 512]

Precisions, compared like with like:
- bf16 (where the CPU has native bf16): tunehouse as shipped (bf16 default: frozen base weights
  stored in bf16, LoRA masters fp32, autocast); TRL `bf16=True` two ways, fp32 weights under
  autocast (Trainer's bf16 mixed precision) and the model loaded in bf16 (`dtype=bfloat16`,
  PEFT keeps the adapter fp32), and the better of the two is TRL's figure.
- fp32: tunehouse `bf16=False`, TRL `bf16=False` with fp32 weights.

Each side runs in its own subprocess (separate peak RSS). Throughput = non-pad tokens per second
of optimizer steps, the first step excluded (warm-up). The sides alternate for `--rounds` rounds
and each keeps its best round: on a shared machine the load drifts over minutes, and alternating
exposes both sides to the same drift. The matmul roofline (bench/roofline.py) is measured in the
same run, right before the sides, in both precisions; roofline fraction = achieved FLOP/s
(4·N per trained token, N = 134.5M) ÷ the measured bf16 matmul FLOP/s. The last line printed is
one JSON object with every figure (`speedup` = tunehouse ÷ TRL at its best, in bf16 where the
CPU has it; `roofline_fraction` = tunehouse's, bf16).

On a shared machine wall-clock rates swing with the other load (one side alone was seen at 5 and
at 20 tokens/s within minutes), so each side also reports tokens per CPU-second of its own
process, and the roofline is measured in CPU time too (`*_cpu_time` figures). With `--threads 1`
that is the clean comparison there (no OpenMP thread waiting for a descheduled partner, which
makes small ops 10x dearer in CPU time on an overloaded box); on an idle machine use wall time.
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

CACHE = Path.home() / ".cache" / "tunehouse-test"
MAX_LEN = 512
ROWS = {512: 2, 2048: 1}  # packed rows per optimizer step (1,024 / 2,048 tokens)
LORA = dict(r=8, alpha=16, dropout=0.0, modules="all-linear")
LR = 1e-4
TOPICS = ["the sea", "mountains", "bread", "trains", "the moon", "gardens", "music", "rivers",
          "libraries", "bees", "winter", "bicycles", "clocks", "forests", "cities", "tea"]
WORDS = ("the a of and to in is it that was for on are with as his they be at one have this "
         "from or had by hot word but what some we can out other were all there when up use "
         "your how said an each she which do their time if will way about many then them write "
         "would like so these her long make thing see him two has look more day could go come "
         "did number sound no most people my over know water than call first who may down side "
         "been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form "
         "sentence great think say help low line differ turn cause much mean before move right "
         "boy old too same tell does set three want air well also play small end put home read "
         "hand port large spell add even land here must big high such follow act why ask men "
         "change went light kind off need house picture try us again animal point mother world").split()


def synthetic_chat(n: int, seed: int = 0) -> list[dict]:
    """n conversations: a short question and a 60–160-word answer (seeded, so both sides match)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        sentences = []
        for _ in range(rng.randint(5, 12)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
            sentences.append(" ".join(words).capitalize() + ".")
        rows.append({"question": f"Tell me something about {topic}, please.",
                     "answer": " ".join(sentences)})
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_tunehouse(model_dir: Path, steps: int, batch: int, bf16: bool, max_len: int = MAX_LEN) -> dict:
    from tunehouse.train import distributed
    from tunehouse.train.config import SFTConfig
    from tunehouse.train.events import MemoryReporter
    from tunehouse.train.sft import Cancelled, run_sft

    d = distributed.setup()  # under torchrun: `batch` rows per process
    tmp = Path(distributed.broadcast(str(scratch_dir("bench-tunehouse-")) if d.is_main else None, d))
    data = tmp / "chat.jsonl"
    if d.is_main:
        data.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": r["answer"]}]}) + "\n" for r in synthetic_chat(400)))
    distributed.barrier(d)
    cfg = SFTConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file="file-bench",
                    batch_size=batch * d.world, learning_rate=LR, lr_scheduler_type="linear",
                    max_seq_length=max_len, packing=True, train_on_inputs=False, lora=True,
                    lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                    lora_trainable_modules=LORA["modules"], random_seed=42)
    from tunehouse.train import sft

    steps_timed: list[tuple[float, float, int]] = []  # (wall s, CPU s, tokens) per optimizer step
    real_step = sft.train_step

    def timed_step(run, rows, lr):
        t0, c0 = time.perf_counter(), time.process_time()
        out = real_step(run, rows, lr)
        steps_timed.append((time.perf_counter() - t0, time.process_time() - c0, out[3]))
        return out

    sft.train_step = timed_step
    reporter = MemoryReporter(stop_after_steps=steps)  # cancel after N steps: no final save
    try:
        run_sft(cfg, model_path=model_dir, training_path=data, validation_path=None,
                output_dir=tmp / "out", reporter=reporter, bf16=bf16)
    except Cancelled:
        pass
    if not d.is_main:
        return None
    timed = steps_timed[1:]  # the first step is warm-up
    tokens = sum(n for _, _, n in timed)
    return {"tokens_per_second": tokens / sum(w for w, _, _ in timed),
            "tokens_per_cpu_second": tokens / sum(c for _, c, _ in timed), "losses": reporter.losses(),
            "peak_rss_mb": peak_rss_mb(), "steps": len(steps_timed),
            "settings": f"run_sft, {'bf16 (frozen weights bf16, LoRA fp32, autocast)' if bf16 else 'fp32'}, "
                        f"packing {batch} rows x {max_len}, LoRA r={LORA['r']} alpha={LORA['alpha']} "
                        f"{LORA['modules']}, AdamW lr {LR} linear, torch threads {torch_threads()}"}


def side_trl(model_dir: Path, steps: int, batch: int, max_len: int = MAX_LEN, precision: str = "fp32") -> dict:
    """precision: "fp32"; "bf16-autocast" (fp32 weights, Trainer bf16); "bf16-weights" (model in bf16)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(42)
    rows = synthetic_chat(400)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                  "completion": [{"role": "assistant", "content": r["answer"]}]}
                                 for r in rows])
    timings: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0, self.n0 = time.perf_counter(), time.process_time(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            timings.append((time.perf_counter() - self.t0, state.num_input_tokens_seen - self.n0,
                            time.process_time() - self.c0))

    tmp = str(scratch_dir("bench-trl-"))
    bf16 = precision != "fp32"
    args = SFTConfig(output_dir=tmp, max_length=max_len, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="linear",
                     max_steps=steps, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, bf16=bf16, packing=True, packing_strategy="bfd", seed=42,
                     gradient_checkpointing=False,  # TRL's default is on: slower, and tunehouse has it off
                     include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        args=args, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules=LORA["modules"], task_type="CAUSAL_LM"),
        callbacks=[Clock(), Losses()])
    trainer.train()
    seconds = sum(t for t, _, _ in timings[1:])
    tokens = sum(n for _, n, _ in timings[1:])
    cpu = sum(c for _, _, c in timings[1:])
    attn = trainer.model.config._attn_implementation
    return {"tokens_per_second": tokens / seconds, "tokens_per_cpu_second": tokens / cpu, "losses": losses,
            "peak_rss_mb": peak_rss_mb(), "steps": len(timings),
            "settings": f"SFTTrainer {precision} (weights {str(dtype).removeprefix('torch.')}, "
                        f"bf16={bf16}), packing bfd = padding-free ({batch} rows x {max_len}), attn {attn}, "
                        f"no gradient checkpointing, completion-only loss, LoRA r={LORA['r']} alpha={LORA['alpha']} {LORA['modules']}, "
                        f"AdamW lr {LR} linear, torch threads {torch_threads()}"}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_side(name: str, steps: int, batch: int, max_len: int, processes: int = 1, threads: int = 0) -> dict:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    out = subprocess.run(launcher + [__file__, "--side", name, "--steps", str(steps), "--threads", str(threads),
                                     "--batch", str(batch), "--seq-len", str(max_len)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"{name} side failed")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {name}: {result['tokens_per_second']:.1f} tokens/s, {result['tokens_per_cpu_second']:.1f} per CPU-second, peak RSS {result['peak_rss_mb']:.0f} MB",
          file=sys.stderr, flush=True)
    return result


SIDES = {  # name → (precision label, what runs)
    "tunehouse-bf16": "bf16", "trl-bf16-autocast": "bf16", "trl-bf16-weights": "bf16",
    "tunehouse-fp32": "fp32", "trl-fp32": "fp32",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per side (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side; the best is kept")
    parser.add_argument("--side", choices=[*SIDES, "tunehouse"])
    parser.add_argument("--batch", type=int, default=0, help="packed rows per step (default: 2 at 512, 1 at 2048)")
    parser.add_argument("--precision", choices=["both", "bf16", "fp32"], default="both")
    parser.add_argument("--sides", default="", help="comma list of the sides to run (default: all of the "
                        "precisions asked for); each precision needs its tunehouse side and at least one TRL side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of every side (0: torch's default)")
    parser.add_argument("--processes", type=int, default=1, help="compare tunehouse on 1 process with this many "
                        "(torchrun, DDP) instead of with TRL")
    parser.add_argument("--seq-len", "--max-len", dest="max_len", type=int, default=MAX_LEN,
                        help="max_seq_length of both sides: the length of the packed rows")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tunehouse.models.default import ensure_default_model
    from tunehouse.train.precision import cpu_supports_bf16

    model_dir = ensure_default_model(CACHE, progress=lambda m: print(m, file=sys.stderr))
    batch = args.batch or ROWS.get(args.max_len, max(1, 1024 // args.max_len))
    if args.side:
        if args.side.startswith("trl"):
            result = side_trl(model_dir, args.steps, batch, args.max_len, args.side.removeprefix("trl-"))
        else:
            result = side_tunehouse(model_dir, args.steps, batch, max_len=args.max_len,
                                    bf16=args.side != "tunehouse-fp32" and cpu_supports_bf16())
        if result is not None:  # rank 0 (or the only process) reports
            print(json.dumps(result))
        return
    if args.processes > 1:
        return compare_processes(args, batch)

    from roofline import fraction, matmul_gflops, model_shape

    bf16 = cpu_supports_bf16()
    precisions = [p for p in ("bf16", "fp32") if args.precision in ("both", p) and (p == "fp32" or bf16)]
    sides = [name for name, p in SIDES.items() if p in precisions
             and (not args.sides or name in args.sides.split(","))]
    shape = model_shape(model_dir)
    mm = lambda dtype, **kw: matmul_gflops(dtype, tokens=batch * args.max_len, hidden=shape["hidden"],  # noqa: E731
                                           intermediate=shape["intermediate"], vocab=shape["vocab"], **kw)
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    peaks = {"bf16": [], "fp32": []}
    cpu_peaks = {"bf16": [], "fp32": []}  # the same, in this process's CPU time (robust to other load)
    for _ in range(max(1, args.rounds)):
        for p, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            if p == "fp32" or bf16:
                peaks[p].append(mm(dtype))
                cpu_peaks[p].append(mm(dtype, clock=time.process_time))
        for name in sides:
            runs[name].append(run_side(name, args.steps, batch, args.max_len, threads=args.threads))
    best = {name: max(rs, key=lambda r: r["tokens_per_second"]) for name, rs in runs.items()}
    peak = {p: max(v) for p, v in peaks.items() if v}
    cpu_peak = {p: max(v) for p, v in cpu_peaks.items() if v}

    print(f"SmolLM2-135M-Instruct LoRA SFT, rows of {args.max_len} tokens, {batch} per step, {args.steps} steps "
          f"(first excluded), best of {args.rounds} alternating rounds; CPU native bf16: {bf16}")
    print(f"matmul roofline measured in this run (FLOP-weighted over the step's shapes): "
          + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peak.items())
          + " wall, " + ", ".join(f"{p} {g:.0f}" for p, g in cpu_peak.items()) + " per CPU-second"
          + f"; FLOPs per trained token 4·N = {4 * shape['n_params'] / 1e6:.0f} MFLOP (N = {shape['n_params'] / 1e6:.1f}M)")
    for name in sides:
        r = best[name]
        print(f"{name}: {r['tokens_per_second']:.1f} tokens/s wall, {r['tokens_per_cpu_second']:.1f} tokens per "
              f"CPU-second of its process (rounds: "
              f"{', '.join(format(x['tokens_per_second'], '.1f') for x in runs[name])}), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, roofline fraction "
              f"{fraction(r['tokens_per_second'], shape['n_params'], peak.get('bf16', peak['fp32'])):.3f}\n"
              f"    settings: {r['settings']}\n    losses: {[round(x, 4) for x in r['losses']]}")
    summary = {"seq_len": args.max_len, "rows_per_step": batch, "steps": args.steps, "rounds": args.rounds,
               "threads": torch.get_num_threads(), "bf16": bf16,
               "matmul_gflops": {p: round(g, 1) for p, g in peak.items()},
               "matmul_gflops_cpu_time": {p: round(g, 1) for p, g in cpu_peak.items()},
               "flops_per_token": 4 * shape["n_params"]}
    for p in precisions:
        th = best[f"tunehouse-{p}"]
        trl_name = max((n for n in sides if n.startswith("trl") and SIDES[n] == p),
                       key=lambda n: best[n]["tokens_per_second"])
        trl = best[trl_name]
        speedup = th["tokens_per_second"] / trl["tokens_per_second"]
        trl_cpu = max((best[n] for n in sides if n.startswith("trl") and SIDES[n] == p),
                      key=lambda r: r["tokens_per_cpu_second"])
        cpu_speedup = th["tokens_per_cpu_second"] / trl_cpu["tokens_per_cpu_second"]
        print(f"{p} vs {p}: tunehouse {th['tokens_per_second']:.1f} tokens/s, TRL at its best ({trl_name}) "
              f"{trl['tokens_per_second']:.1f}: {speedup:.2f}x wall; per CPU-second {th['tokens_per_cpu_second']:.1f} "
              f"vs {trl_cpu['tokens_per_cpu_second']:.1f}: {cpu_speedup:.2f}x; peak RSS {th['peak_rss_mb']:.0f} vs "
              f"{trl['peak_rss_mb']:.0f} MB")
        summary[p] = {"tunehouse_tokens_per_second": round(th["tokens_per_second"], 1),
                      "trl_tokens_per_second": round(trl["tokens_per_second"], 1), "trl_best": trl_name,
                      "speedup": round(speedup, 2), "speedup_cpu_time": round(cpu_speedup, 2),
                      "tunehouse_tokens_per_cpu_second": round(th["tokens_per_cpu_second"], 1),
                      "trl_tokens_per_cpu_second": round(trl_cpu["tokens_per_cpu_second"], 1),
                      "tunehouse_peak_rss_mb": round(th["peak_rss_mb"]), "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
                      "roofline_fraction": round(fraction(th["tokens_per_second"], shape["n_params"],
                                                          peak.get("bf16", peak["fp32"])), 3),
                      "roofline_fraction_cpu_time": round(fraction(th["tokens_per_cpu_second"], shape["n_params"],
                                                                   cpu_peak.get("bf16", cpu_peak["fp32"])), 3)}
    if len(precisions) == 2:
        gap = max(abs(a - b) for a, b in zip(best["tunehouse-bf16"]["losses"], best["tunehouse-fp32"]["losses"]))
        print(f"tunehouse max |loss bf16 − fp32| over {args.steps} steps: {gap:.4f}")
        summary["bf16_fp32_max_loss_gap"] = round(gap, 5)
    lead = summary[precisions[0]]
    summary.update(speedup=lead["speedup"], roofline_fraction=lead["roofline_fraction"],
                   speedup_cpu_time=lead["speedup_cpu_time"], roofline_fraction_cpu_time=lead["roofline_fraction_cpu_time"])
    print(json.dumps(summary))


def compare_processes(args, batch: int) -> None:
    """tunehouse on 1 process vs `args.processes` (`batch` packed rows per process per step)."""
    n = args.processes
    one = run_side("tunehouse", args.steps, batch, args.max_len)
    many = run_side("tunehouse", args.steps, batch, args.max_len, processes=n)
    ratio = many["tokens_per_second"] / one["tokens_per_second"]
    print(f"tunehouse 1 process: {one['tokens_per_second']:.1f} tokens/s, losses {[round(x, 4) for x in one['losses']]}")
    print(f"tunehouse {n} processes: {many['tokens_per_second']:.1f} tokens/s (all processes), "
          f"losses {[round(x, 4) for x in many['losses']]}")
    print(f"{n} processes / 1 process: {ratio:.2f}x")
    print(json.dumps({"steps": args.steps, "max_seq_length": args.max_len, "processes": n,
                      "tokens_per_second_1": round(one["tokens_per_second"], 1),
                      f"tokens_per_second_{n}": round(many["tokens_per_second"], 1), "speedup": round(ratio, 2)}))


if __name__ == "__main__":
    main()
