"""Generation throughput of tunehouse's TorchEngine vs plain `transformers` `model.generate`.

SmolLM2-135M-Instruct (the built-in default, fp32), chat prompts from its own template, greedy,
a fixed number of new tokens per request (EOS ignored on both sides). Each engine figure is the
best of `--rounds` runs (base and LoRA alternate), since the load of a shared machine drifts; the
peer runs its 16 requests once. In-process: the engine is driven through its Python interface (no
HTTP), so the figures are the engine's, not uvicorn's.

    .venv/bin/python bench/serve.py [--tokens 32] [--threads N] [--rounds 2]

Figures:
- base and LoRA single-request tokens/s (LoRA: a random r=8 adapter on all linear layers, B
  non-zero so it really changes the outputs), target LoRA ≥ 0.9× base;
- adapter switch latency: time to first token on an adapter not yet loaded (load + attach), on
  another adapter already loaded (switch), and on the base (reference);
- throughput (generated tokens/s of wall time) at 1, 4 and 16 concurrent requests, target
  16 ≥ 3× 1;
- the peer: `model.generate` one request at a time over the same 16 requests.
The last line printed is one JSON object with every figure; `speedup` = tunehouse 16-concurrent
throughput ÷ the peer's sequential throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tunehouse.models.default import DEFAULT_MODEL_NAME, ensure_default_model  # noqa: E402
from tunehouse.models.tiny import random_lora_adapter  # noqa: E402
from tunehouse.serve.engine import ModelRef, TorchEngine  # noqa: E402
from tunehouse.serve.sampling import SamplingParams  # noqa: E402

CACHE = Path.home() / ".cache" / "tunehouse-bench"
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "Give me three tips for learning to cook.", "Why is the sky blue?", "What is a prime number?",
             "Describe a cat to someone who has never seen one.", "How do trains work?"]


async def run(engine: TorchEngine, model: ModelRef, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """All prompts at once; returns (wall seconds, mean time to first token)."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def one(ids):
        start, first, n = time.perf_counter(), None, 0
        async for ev in engine.submit(model, ids, params):
            first = first or time.perf_counter() - start
            n += 1
        assert n == tokens, n
        return first

    start = time.perf_counter()
    firsts = await asyncio.gather(*[one(p) for p in prompts])
    return time.perf_counter() - start, sum(firsts) / len(firsts)


def peer(path: Path, prompts: list[list[int]], tokens: int, threads: int) -> float:
    """transformers `generate`, one request at a time; returns generated tokens/s."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            assert out.shape[1] - len(ids) == tokens
        return len(prompts) * tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: the engine's)")
    ap.add_argument("--rounds", type=int, default=2, help="repeats of each engine figure; the best is kept")
    args = ap.parse_args()
    rounds = args.rounds

    base_dir = ensure_default_model(CACHE, progress=print)
    tmp = Path(tempfile.mkdtemp(prefix="tunehouse-bench-serve-"))
    adapters = [random_lora_adapter(base_dir, tmp / f"lora{i}", seed=i) for i in range(3)]
    engine = TorchEngine(max_batch_size=16, threads=args.threads)
    threads = engine.threads
    base = ModelRef(DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME, base_dir, 8192)
    lora = [ModelRef(f"lora{i}", DEFAULT_MODEL_NAME, base_dir, 8192, adapter_path=a) for i, a in enumerate(adapters)]
    tok = engine.tokenizer(base)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in QUESTIONS]
    prompts = [tok.encode(p, add_special_tokens=False) for p in prompts]
    t = args.tokens
    print(f"{DEFAULT_MODEL_NAME} fp32, {t} new tokens per request, {threads} torch thread(s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    async def engine_figures() -> dict:
        await run(engine, base, prompts[:1], 2)  # warm-up: load the base
        out = {}
        _, ttft_cold = await run(engine, lora[0], prompts[:1], 2)  # load + attach
        await run(engine, lora[1], prompts[:1], 2)
        _, ttft_switch = await run(engine, lora[0], prompts[:1], 2)  # loaded: switch only
        _, ttft_base = await run(engine, base, prompts[:1], 2)
        out["adapter_cold_ttft_ms"], out["adapter_switch_ttft_ms"] = 1000 * ttft_cold, 1000 * ttft_switch
        out["base_ttft_ms"] = 1000 * ttft_base
        # Base and LoRA alternate, best of `rounds` each: on a shared machine the load drifts.
        base_s, lora_s = [], []
        for _ in range(rounds):
            base_s.append(t / (await run(engine, base, prompts[:1], t))[0])
            lora_s.append(t / (await run(engine, lora[0], prompts[:1], t))[0])
        out["base_tokens_per_s"], out["lora_tokens_per_s"] = max(base_s), max(lora_s)
        for c in (1, 4, 16):
            work = [prompts[i % len(prompts)] for i in range(c)]
            out[f"concurrent_{c}_tokens_per_s"] = max([c * t / (await run(engine, base, work, t))[0]
                                                      for _ in range(rounds)])
        return out

    fig = asyncio.run(engine_figures())
    fig["max_batch_size_seen"] = engine.stats()["max_batch_size"]
    engine.close()
    fig["peer_sequential_tokens_per_s"] = peer(base_dir, [prompts[i % len(prompts)] for i in range(16)], t, threads)
    fig["load_average_end"] = os.getloadavg()[0]
    fig["lora_vs_base"] = fig["lora_tokens_per_s"] / fig["base_tokens_per_s"]
    fig["concurrency_16_vs_1"] = fig["concurrent_16_tokens_per_s"] / fig["concurrent_1_tokens_per_s"]
    fig["speedup"] = fig["concurrent_16_tokens_per_s"] / fig["peer_sequential_tokens_per_s"]

    print(f"single request   base {fig['base_tokens_per_s']:.1f} tok/s, LoRA {fig['lora_tokens_per_s']:.1f} tok/s "
          f"({fig['lora_vs_base']:.2f}x base; target >= 0.9x)")
    print(f"first token      base {fig['base_ttft_ms']:.0f} ms, adapter cold (load) {fig['adapter_cold_ttft_ms']:.0f} ms, "
          f"adapter switch {fig['adapter_switch_ttft_ms']:.0f} ms")
    print("throughput       " + ", ".join(f"{c} concurrent {fig[f'concurrent_{c}_tokens_per_s']:.1f} tok/s"
                                          for c in (1, 4, 16))
          + f" (16 vs 1: {fig['concurrency_16_vs_1']:.2f}x; target >= 3x)")
    print(f"peer             transformers generate, one at a time: {fig['peer_sequential_tokens_per_s']:.1f} tok/s; "
          f"tunehouse 16 concurrent is {fig['speedup']:.2f}x that")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in fig.items()}))


if __name__ == "__main__":
    main()
