"""Where a tunehouse SFT or DPO step's time goes: torch.profiler over a few LoRA steps on SmolLM2-135M.

    .venv/bin/python bench/profile_train.py [--seq-len 512] [--steps 3] [--fp32] [--dpo]

Runs the recipe's own step (`sft.train_step` on packed rows of synthetic chat; with --dpo
`dpo.train_step` on bench/train_dpo.py's batch of 4 synthetic pairs, after the recipe's own
reference precompute) and prints the top operators by self CPU time, then the time grouped by
kind (matmul, attention, casts, elementwise, optimizer, other) as percentages: fractions stay
meaningful on a loaded machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.scratch import scratch_dir  # noqa: E402

KINDS = [  # first match wins
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "_weight_int", "mkldnn_")),
    ("attention", ("_scaled_dot_product", "scaled_dot_product", "_flash_attention", "_efficient_attention", "softmax")),
    ("casts/copies", ("to_copy", "copy_", "_to_dtype", "clone", "contiguous")),
    ("optimizer", ("_fused_adamw", "_foreach", "adamw", "lerp", "addcdiv", "addcmul")),
]


def kind(name: str) -> str:
    short = name.removeprefix("aten::")
    for k, keys in KINDS:
        if any(short == key or short.startswith(key) for key in keys):
            return k
    return "elementwise/other"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=0, help="rows per step (default 2 at 512, 1 at 2048)")
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--cpu-time", action="store_true", help="no profiler: 1 torch thread, tokens per CPU-second "
                   "of this process (robust to other processes sharing the cores), for before/after comparisons")
    p.add_argument("--dpo", action="store_true", help="profile dpo.train_step (batch 4 pairs) instead of SFT")
    p.add_argument("--dpo-batch", type=int, default=0, help="with --dpo: which batch of 4 consecutive synthetic "
                   "pairs (0: the bench's warm-up batch, 3 padded rows before prompt sharing; 1+: typical ones)")
    p.add_argument("--stacks", default="", help="comma list of ops (aten::copy_) whose calling lines to print")
    args = p.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.train_sft import CACHE, synthetic_chat
    from tunehouse.models.default import ensure_default_model
    from tunehouse.train import sft
    from tunehouse.train.config import SFTConfig
    from tunehouse.train.events import MemoryReporter

    model_dir = ensure_default_model(CACHE)
    if args.dpo:
        return profile_dpo(args, model_dir)
    batch = args.batch or max(1, 1024 // args.seq_len)
    tmp = scratch_dir("profile-")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}) + "\n"
        for r in synthetic_chat(400)))
    cfg = SFTConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file="file-bench",
                    batch_size=batch, learning_rate=1e-4, max_seq_length=args.seq_len, packing=True,
                    train_on_inputs=False, lora=True, lora_r=8, lora_alpha=16,
                    lora_trainable_modules="all-linear", random_seed=42)
    captured = {}
    original = sft._train_loop

    def grab(run, *a, **k):  # the recipe's own setup, then our steps instead of its loop
        captured["run"] = run
        raise KeyboardInterrupt  # stop before the final save (which merges the adapter)

    sft._train_loop = grab
    try:
        sft.run_sft(cfg, model_path=model_dir, training_path=data, validation_path=None,
                    output_dir=tmp / "out", reporter=MemoryReporter(stop_after_steps=0), bf16=not args.fp32)
    except KeyboardInterrupt:
        pass
    sft._train_loop = original
    run = captured["run"]
    rows = [run.train_rows[i] for i in range(batch)]
    timed = warm_and_time(lambda: sft.train_step(run, rows, 1e-4), args)
    if timed:
        (loss, acc, gn, tokens), cpu, wall = timed
        sys.path.insert(0, str(ROOT / "bench"))
        from roofline import fraction, matmul_gflops, model_shape

        shape = model_shape(model_dir)
        peak = matmul_gflops(torch.bfloat16, tokens=batch * args.seq_len, hidden=shape["hidden"],
                             intermediate=shape["intermediate"], vocab=shape["vocab"], clock=time.process_time)
        print(f"seq_len {args.seq_len}, {batch} rows/step, {'fp32' if args.fp32 else 'bf16'}, 1 thread: "
              f"{tokens * args.steps / cpu:.1f} tokens per CPU-second ({tokens * args.steps / wall:.1f} tokens/s wall), "
              f"loss {loss:.4f}; bf16 matmul {peak:.0f} GFLOP/s per CPU-second (1 thread, same run): roofline "
              f"fraction {fraction(tokens * args.steps / cpu, shape['n_params'], peak):.3f} (4·N FLOPs per token)")
        return
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], with_stack=bool(args.stacks),
                 record_shapes=bool(args.stacks)) as prof:
        for _ in range(args.steps):
            loss, acc, gn, tokens = sft.train_step(run, rows, 1e-4)
    wall = time.perf_counter() - t0
    print(f"seq_len {args.seq_len}, {batch} rows/step, {'fp32' if args.fp32 else 'bf16'}: "
          f"{tokens * args.steps / wall:.1f} tokens/s under the profiler, loss {loss:.4f}")
    if args.stacks:
        wanted = set(args.stacks.split(","))
        stacked = sorted((e for e in prof.key_averages(group_by_stack_n=6) if e.key in wanted),
                         key=lambda e: -e.self_cpu_time_total)
        for e in stacked[:args.top]:
            print(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms x{e.count}: " + " <- ".join(
                line.split("/")[-1] for line in e.stack[:6]))
        shaped = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key in wanted),
                        key=lambda e: -e.self_cpu_time_total)
        for e in shaped[:args.top]:
            print(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms x{e.count}: {e.input_shapes}")
        return
    report(prof, args.top)


def warm_and_time(step, args):
    """One warm-up `step()`; with --cpu-time (1 torch thread, set before the warm-up) then
    `args.steps` timed ones → (the last step's result, CPU seconds, wall seconds); else None
    (the caller profiles its own steps)."""
    import torch

    if args.cpu_time:
        torch.set_num_threads(1)
    step()
    if not args.cpu_time:
        return None
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        out = step()
    return out, time.process_time() - c0, time.perf_counter() - t0


def report(prof, top: int) -> None:
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))
    by_kind = collections.Counter()
    for e in events:
        by_kind[kind(e.key)] += e.self_cpu_time_total
    total = sum(by_kind.values())
    print("by kind: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in by_kind.most_common()))
    # the step's stages, as labelled by record_function in profile_dpo / the recipes
    stages = {e.key: e.cpu_time_total for e in events if e.key.startswith("## ")}
    if stages:
        print("stages (inclusive CPU time): " + ", ".join(f"{k[3:]} {v / 1e3:.0f} ms" for k, v in stages.items()))


def profile_dpo(args, model_dir: Path) -> None:
    """dpo.train_step on bench/train_dpo.py's first batch of 4 pairs, profiled or timed."""
    from torch.profiler import ProfilerActivity, profile, record_function

    sys.path.insert(0, str(ROOT / "bench"))
    from train_dpo import BATCH, synthetic_pairs
    from tunehouse.train import dpo, head
    from tunehouse.train.config import DPOConfig
    from tunehouse.train.events import MemoryReporter

    tmp = scratch_dir("profile-dpo-")
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": r["question"]}]},
        "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
        "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}]}) + "\n"
        for r in synthetic_pairs((args.dpo_batch + 1) * BATCH)))
    cfg = DPOConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file="file-bench",
                    batch_size=BATCH, learning_rate=1e-4, lr_scheduler_type="linear",
                    max_seq_length=args.seq_len, packing=True, lora=True, lora_r=8, lora_alpha=16,
                    lora_trainable_modules="all-linear", dpo_beta=0.1, random_seed=42)
    captured = {}

    def grab(run, *a, **k):  # the recipe's own setup (reference precompute included), then our steps
        captured["run"] = run
        raise KeyboardInterrupt

    original, dpo._train_loop = dpo._train_loop, grab
    r0 = time.perf_counter()
    try:
        dpo.run_dpo(cfg, model_path=model_dir, training_path=data, validation_path=None,
                    output_dir=tmp / "out", reporter=MemoryReporter(stop_after_steps=0), bf16=not args.fp32)
    except KeyboardInterrupt:
        pass
    dpo._train_loop = original
    run = captured["run"]
    print(f"setup + reference precompute of {(args.dpo_batch + 1) * BATCH} pairs: {time.perf_counter() - r0:.1f} s")
    picked = list(range(args.dpo_batch * BATCH, (args.dpo_batch + 1) * BATCH))
    timed = warm_and_time(lambda: dpo.train_step(run, picked, 1e-4), args)
    if timed:
        (loss, metrics, gn, tokens), cpu, wall = timed
        print(f"DPO, {BATCH} pairs/step ({tokens} tokens run), {'fp32' if args.fp32 else 'bf16'}, 1 thread: "
              f"{BATCH * args.steps / cpu:.3f} pairs per CPU-second ({BATCH * args.steps / wall:.3f} pairs/s wall), "
              f"loss {loss:.6f}")
        return
    # label the step's stages: collation, forward (decoder / fused head), backward, optimizer
    labelled = {}
    for mod, name in ((dpo, "_collate"), (dpo, "_pair_losses"), (dpo.recipe, "optimizer_step"),
                      (head, "linear_log_softmax_gather")):
        fn = getattr(mod, name)
        labelled[(mod, name)] = fn

        def wrapped(*a, _fn=fn, _name=name, **k):
            with record_function(f"## {_name}"):
                return _fn(*a, **k)

        setattr(mod, name, wrapped)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            with record_function("## train_step"):
                loss, metrics, gn, tokens = dpo.train_step(run, picked, 1e-4)
    wall = time.perf_counter() - t0
    for (mod, name), fn in labelled.items():
        setattr(mod, name, fn)
    print(f"DPO, {BATCH} pairs/step ({tokens} tokens run), {'fp32' if args.fp32 else 'bf16'}: "
          f"{BATCH * args.steps / wall:.3f} pairs/s under the profiler, loss {loss:.6f}")
    report(prof, args.top)


if __name__ == "__main__":
    main()
