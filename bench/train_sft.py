"""LoRA SFT throughput: tunehouse's recipe vs TRL's SFTTrainer on the same work.

SmolLM2-135M-Instruct (the built-in default), the same synthetic chat data (loss on the
assistant answers only: tunehouse `train_on_inputs=false`, TRL prompt/completion data with its
default completion-only loss), LoRA r=8 / alpha 16 on all linear layers, max length 512.

    .venv/bin/python bench/train_sft.py [--steps 8] [--rounds 2] [--no-fp32] [--max-len 512]
    .venv/bin/python bench/train_sft.py --processes 2 [--steps 8] [--max-len 512]

`--processes N` compares tunehouse with itself instead: 1 process against N processes (torchrun,
DDP; gloo on a CPU, one rank per GPU with NCCL), each process taking 2 packed rows per step, and
prints both throughputs (tokens/s over all processes) and their ratio.

Each side runs in its own subprocess (separate peak RSS). Throughput = non-pad tokens per second
of optimizer steps, the first step excluded (warm-up). The sides alternate for `--rounds` rounds
and each keeps its best round: on a shared machine the load drifts over minutes (single runs of
the same side were seen 30% apart), and alternating exposes both sides to the same drift. tunehouse runs as shipped: packing,
logits only at trained positions, bf16 autocast when the CPU has native bf16 (else fp32); with
fp32 compared too, the report also gives the loss-curve gap between bf16 and fp32. TRL runs in
fp32 with padding (its defaults). The last line printed is one JSON object with every figure.
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

CACHE = Path.home() / ".cache" / "tunehouse-test"
MAX_LEN = 512
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
    tmp = Path(distributed.broadcast(tempfile.mkdtemp(prefix="bench-tunehouse-") if d.is_main else None, d))
    data = tmp / "chat.jsonl"
    if d.is_main:
        data.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": r["answer"]}]}) + "\n" for r in synthetic_chat(400)))
    distributed.barrier(d)
    cfg = SFTConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file="file-bench",
                    batch_size=batch * d.world, learning_rate=LR, lr_scheduler_type="linear",
                    max_seq_length=max_len, packing=True, train_on_inputs=False, lora=True,
                    lora_r=8, lora_alpha=16, lora_trainable_modules="all-linear",
                    random_seed=42)
    reporter = MemoryReporter(stop_after_steps=steps)  # cancel after N steps: no final save
    try:
        run_sft(cfg, model_path=model_dir, training_path=data, validation_path=None,
                output_dir=tmp / "out", reporter=reporter, bf16=bf16)
    except Cancelled:
        pass
    if not d.is_main:
        return None
    rates = reporter.losses("tokens_per_second")[1:]
    # Packed rows are all ~512 tokens, so Σtokens/Σtime = the harmonic mean of per-step rates.
    return {"tokens_per_second": len(rates) / sum(1 / r for r in rates),
            "losses": reporter.losses(), "peak_rss_mb": peak_rss_mb(), "steps": len(rates) + 1}


def side_trl(model_dir: Path, steps: int, batch: int, max_len: int = MAX_LEN) -> dict:
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
            self.t0, self.n0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            timings.append((time.perf_counter() - self.t0, state.num_input_tokens_seen - self.n0))

    tmp = tempfile.mkdtemp(prefix="bench-trl-")
    args = SFTConfig(output_dir=tmp, max_length=max_len, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="linear",
                     max_steps=steps, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, bf16=False, packing=False, seed=42,
                     include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Clock(), Losses()])
    trainer.train()
    seconds = sum(t for t, _ in timings[1:])
    tokens = sum(n for _, n in timings[1:])
    return {"tokens_per_second": tokens / seconds, "losses": losses,
            "peak_rss_mb": peak_rss_mb(), "steps": len(timings)}


def run_side(name: str, steps: int, batch: int, max_len: int, processes: int = 1) -> dict:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    out = subprocess.run(launcher + [__file__, "--side", name, "--steps", str(steps),
                                     "--batch", str(batch), "--max-len", str(max_len)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"{name} side failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side; the best is kept")
    parser.add_argument("--side", choices=["tunehouse", "tunehouse-fp32", "trl"])
    parser.add_argument("--batch", type=int, default=0, help="(internal) batch size")
    parser.add_argument("--no-fp32", action="store_true", help="skip the tunehouse fp32 run")
    parser.add_argument("--processes", type=int, default=1, help="compare tunehouse on 1 process with this many "
                        "(torchrun, DDP) instead of with TRL")
    parser.add_argument("--max-len", type=int, default=MAX_LEN, help="max_seq_length of both sides (tunehouse packs "
                        "rows of this length; TRL truncates to it and pads to the longest example)")
    args = parser.parse_args()

    from tunehouse.models.default import ensure_default_model
    from tunehouse.train.sft import cpu_supports_bf16

    model_dir = ensure_default_model(CACHE, progress=lambda m: print(m, file=sys.stderr))
    if args.side:
        if args.side == "trl":
            result = side_trl(model_dir, args.steps, args.batch, args.max_len)
        else:
            result = side_tunehouse(model_dir, args.steps, args.batch, max_len=args.max_len,
                                    bf16=args.side == "tunehouse" and cpu_supports_bf16())
        if result is not None:  # rank 0 (or the only process) reports
            print(json.dumps(result))
        return
    if args.processes > 1:
        return compare_processes(args)

    # tunehouse: 2 packed rows × 512 tokens per step; TRL: 4 padded examples (~200 tokens each).
    bf16 = cpu_supports_bf16()
    runs: dict[str, list[dict]] = {"tunehouse": [], "trl": []}
    for _ in range(max(1, args.rounds)):
        runs["tunehouse"].append(run_side("tunehouse", args.steps, 2, args.max_len))
        runs["trl"].append(run_side("trl", args.steps, 4, args.max_len))
    th, trl = (max(runs[k], key=lambda r: r["tokens_per_second"]) for k in ("tunehouse", "trl"))
    fp32 = None if args.no_fp32 or not bf16 else run_side("tunehouse-fp32", args.steps, 2, args.max_len)
    for name, rs in runs.items():
        print(f"{name} rounds: {', '.join(format(r['tokens_per_second'], '.1f') for r in rs)} tokens/s")
    speedup = th["tokens_per_second"] / trl["tokens_per_second"]
    print(f"tunehouse ({'bf16' if bf16 else 'fp32'}): {th['tokens_per_second']:.1f} tokens/s, "
          f"peak RSS {th['peak_rss_mb']:.0f} MB, losses {[round(x, 4) for x in th['losses']]}")
    if fp32:
        gap = max(abs(a - b) for a, b in zip(th["losses"], fp32["losses"]))
        print(f"tunehouse (fp32): {fp32['tokens_per_second']:.1f} tokens/s, "
              f"peak RSS {fp32['peak_rss_mb']:.0f} MB, max |loss bf16 − fp32| {gap:.4f}")
    print(f"TRL SFTTrainer (fp32, padded): {trl['tokens_per_second']:.1f} tokens/s, "
          f"peak RSS {trl['peak_rss_mb']:.0f} MB")
    print(f"speedup {speedup:.2f}x, RSS ratio {th['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")
    summary = {
        "steps": args.steps, "rounds": args.rounds, "max_seq_length": args.max_len, "bf16": bf16,
        "tunehouse_tokens_per_second": round(th["tokens_per_second"], 1),
        "tunehouse_peak_rss_mb": round(th["peak_rss_mb"]),
        "tunehouse_fp32_tokens_per_second": fp32 and round(fp32["tokens_per_second"], 1),
        "bf16_fp32_max_loss_gap": fp32 and round(
            max(abs(a - b) for a, b in zip(th["losses"], fp32["losses"])), 5),
        "trl_tokens_per_second": round(trl["tokens_per_second"], 1),
        "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
        "rss_ratio": round(th["peak_rss_mb"] / trl["peak_rss_mb"], 3),
        "speedup": round(speedup, 2),
    }
    print(json.dumps(summary))


def compare_processes(args) -> None:
    """tunehouse on 1 process vs `args.processes` (2 packed rows per process per step)."""
    n = args.processes
    one = run_side("tunehouse", args.steps, 2, args.max_len)
    many = run_side("tunehouse", args.steps, 2, args.max_len, processes=n)
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
