"""GPU check: on a CUDA machine, a few steps of LoRA SFT and DPO on SmolLM2-135M-Instruct (and
a 2-process DDP SFT run when there are 2 GPUs), then 16 concurrent chat requests to the inference
engine; prints tokens/s, pairs/s, peak GPU memory and the first losses, and ends with one JSON
line. Without CUDA it says so and exits 0 (it cannot be run on the CPU machines tunehouse is
developed on).

    .venv/bin/python bench/gpu_check.py [--steps 6] [--batch 4] [--max-len 512] [--tokens 64]

Each training run is its own process (its own peak memory; the 2-process run under torchrun, one
rank per GPU, NCCL). Training runs as shipped on CUDA: bf16 autocast, fused head, Liger kernels
when installed. Throughput excludes the first step (warm-up, CUDA kernels compiled/cached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from scratch import scratch_dir  # noqa: E402

CACHE = Path.home() / ".cache" / "tunehouse-bench"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def write_data(folder: Path, n: int = 256) -> tuple[Path, Path]:
    """(chat SFT file, preference file) from the SFT bench's seeded synthetic conversations; the
    rejected answer of a pair is another row's answer."""
    from train_sft import synthetic_chat

    rows = synthetic_chat(n)
    chat, pairs = folder / "chat.jsonl", folder / "pairs.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                                     {"role": "assistant", "content": r["answer"]}]}) + "\n"
                            for r in rows))
    pairs.write_text("".join(json.dumps({"input": {"messages": [{"role": "user", "content": r["question"]}]},
                                         "preferred_output": [{"role": "assistant", "content": r["answer"]}],
                                         "non_preferred_output": [{"role": "assistant",
                                                                   "content": rows[(i + 7) % n]["answer"]}]}) + "\n"
                             for i, r in enumerate(rows)))
    return chat, pairs


def side(method: str, steps: int, batch: int, max_len: int) -> dict | None:
    """One training run in this process (or this rank); rank 0's figures, None on other ranks."""
    import torch

    from tunehouse.models.default import ensure_default_model
    from tunehouse.train import distributed
    from tunehouse.train.config import DPOConfig, SFTConfig
    from tunehouse.train.events import Cancelled, MemoryReporter

    d = distributed.setup()
    model_dir = ensure_default_model(CACHE) if d.is_main else None
    model_dir = distributed.broadcast(model_dir, d)  # rank 0 converts it once; the others wait for it
    tmp = Path(distributed.broadcast(str(scratch_dir("gpu-check-")) if d.is_main else None, d))
    if d.is_main:
        write_data(tmp)
    distributed.barrier(d)
    chat, pairs = tmp / "chat.jsonl", tmp / "pairs.jsonl"
    reporter = MemoryReporter(stop_after_steps=steps)  # cancel after `steps`: no final save
    common = dict(model=MODEL, training_file="file-gpu-check", batch_size=batch * d.world, learning_rate=1e-4,
                  max_seq_length=max_len, lora=True, lora_r=8, lora_alpha=16, random_seed=0)
    torch.cuda.reset_peak_memory_stats()
    try:
        if method == "dpo":
            from tunehouse.train.dpo import run_dpo

            run_dpo(DPOConfig(**common, dpo_beta=0.1), model_path=model_dir, training_path=pairs,
                    validation_path=None, output_dir=tmp / "out", reporter=reporter)
        else:
            from tunehouse.train.sft import run_sft

            run_sft(SFTConfig(**common), model_path=model_dir, training_path=chat, validation_path=None,
                    output_dir=tmp / "out", reporter=reporter)
    except Cancelled:
        pass
    if not d.is_main:
        return None
    rates = reporter.losses("tokens_per_second")[1:]
    out = {"processes": d.world, "global_batch": batch * d.world, "steps": len(reporter.metric_rows),
           "tokens_per_second": round(len(rates) / sum(1 / r for r in rates), 1) if rates else None,
           "first_losses": [round(x, 4) for x in reporter.losses()[:4]],
           "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if method == "dpo":
        pair_rates = reporter.losses("pairs_per_second")[1:]
        out["pairs_per_second"] = round(len(pair_rates) / sum(1 / r for r in pair_rates), 2) if pair_rates else None
    return out


def run_side(method: str, processes: int, args) -> dict:
    command = [__file__, "--side", method, "--steps", str(args.steps), "--batch", str(args.batch),
               "--max-len", str(args.max_len)]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run(launcher + command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        return {"error": f"{method} on {processes} process(es) failed (exit {done.returncode})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve(requests: int, tokens: int) -> dict:
    """`requests` chat requests at once to the engine on the GPU (bf16 where supported)."""
    import torch

    from tunehouse.models.default import DEFAULT_MODEL_NAME, ensure_default_model
    from tunehouse.serve.engine import ModelRef, TorchEngine
    from tunehouse.serve.sampling import SamplingParams

    model_dir = ensure_default_model(CACHE)
    engine = TorchEngine(max_batch_size=requests, dtype="auto")
    model = ModelRef(DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME, model_dir, 8192)
    tok = engine.tokenizer(model)
    questions = [f"Tell me three facts about the number {i}." for i in range(requests)]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for q in questions]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def one(ids) -> int:
        return sum([1 async for _ in engine.submit(model, ids, params)])

    async def all_at_once(batch) -> float:
        start = time.perf_counter()
        counts = await asyncio.gather(*[one(ids) for ids in batch])
        assert all(c == tokens for c in counts), counts
        return time.perf_counter() - start

    async def warm_then_timed() -> float:
        await all_at_once(prompts[:1])  # warm-up: load the weights onto the GPU
        return await all_at_once(prompts)

    torch.cuda.reset_peak_memory_stats()
    seconds = asyncio.run(warm_then_timed())
    engine.close()
    return {"requests": requests, "new_tokens_each": tokens, "dtype": str(engine.dtype).removeprefix("torch."),
            "tokens_per_second": round(requests * tokens / seconds, 1), "seconds": round(seconds, 2),
            "max_batch_seen": engine.stats()["max_batch_size"],
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per training run")
    parser.add_argument("--batch", type=int, default=4, help="rows (SFT) or pairs (DPO) per step per GPU")
    parser.add_argument("--max-len", type=int, default=512, help="max_seq_length")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per chat request")
    parser.add_argument("--side", choices=["sft", "dpo"], help="(internal) one training run")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("No CUDA device here: this check needs a GPU machine. Nothing was run.")
        print(json.dumps({"cuda": False}))
        return 0
    if args.side:
        result = side(args.side, args.steps, args.batch, args.max_len)
        if result is not None:
            print(json.dumps(result))
        return 0

    from tunehouse.models.default import ensure_default_model

    ensure_default_model(CACHE, progress=print)  # convert once, before the runs
    gpus = torch.cuda.device_count()
    report = {"cuda": True, "gpu": torch.cuda.get_device_name(0), "gpus": gpus,
              "bf16": torch.cuda.is_bf16_supported(), "torch": torch.__version__}
    print(f"{report['gpu']} × {gpus}, torch {torch.__version__}, bf16 {report['bf16']}")
    report["sft"] = run_side("sft", 1, args)
    print(f"LoRA SFT, 1 GPU: {report['sft']}")
    report["dpo"] = run_side("dpo", 1, args)
    print(f"LoRA DPO, 1 GPU: {report['dpo']}")
    if gpus >= 2:
        report["sft_ddp_2"] = run_side("sft", 2, args)
        print(f"LoRA SFT, 2 GPUs (DDP): {report['sft_ddp_2']}")
        one, two = report["sft"].get("tokens_per_second"), report["sft_ddp_2"].get("tokens_per_second")
        if one and two:
            report["ddp_2_scaling"] = round(two / one, 2)
    report["serve"] = serve(16, args.tokens)
    print(f"serving, 16 concurrent chat requests: {report['serve']}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
