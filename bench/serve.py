"""Serving speed of tunehouse against llama.cpp's `llama-server` and transformers' batched
`generate`, on the same model, precision, prompts and thread count.

    .venv/bin/python bench/serve.py [--tokens 32] [--rounds 2] [--threads N] [--precision fp32|bf16|both]

tunehouse is measured twice: its CPU backend (`LlamaCppEngine`, what `tunehouse serve` runs on a
machine without a GPU once `make llama-server` has built the binary) and its torch engine (GPUs,
and CPUs without llama-server). The model is the built-in default (SmolLM2-135M-Instruct,
dequantized to safetensors). The peer llama-server runs the same weights written as GGUF by
tunehouse's own exporter (tunehouse/export/gguf.py), f32 for fp32 and bf16 for bf16, so both
precisions compare like with like; tunehouse's backend exports its own copy the same way.
`llama-server` is built once from the llama.cpp that llama-cpp-python 0.3.36 vendors
(tunehouse/serve/llama_server.py; 9 min on 2 idle cores) and run at its documented best on a CPU:
`-t N -tb N -np 16` with continuous batching (its default), a unified KV cache of 16384 tokens (f32
with flash attention off for f32 weights, llama.cpp's default f16 and flash attention otherwise),
the prompt cache on, no web UI: the flags tunehouse's backend starts its own llama-server with.

The prompts are 8 chat questions through the model's chat template, sent to every side as the
same token ids; greedy, exactly `--tokens` new tokens per request (EOS ignored). tunehouse is
timed in-process through `Engine.submit` (its Python interface, no HTTP API in front; the
llama.cpp backend itself streams from its llama-server over loopback HTTP and decodes the token
ids with the model's tokenizer), the peer llama-server over loopback HTTP with streaming. Every
side uses every core (`os.cpu_count()`) unless `--threads` says otherwise. Run it on an otherwise
idle machine: when all threads have a core each, anything else that runs stalls llama.cpp's
threads at its per-operation barriers. Measured on 2 cores at load 3 (another test suite running),
llama-server f32 single-request decode was 3.5 tok/s with -t 2 and 21 tok/s with -t 1.

Figures, per precision:
- single request: decode rate (tokens after the first ÷ seconds after the first) and time to first
  token, on the base and with a LoRA adapter applied at request time (a random r=8 adapter on all
  linear layers; llama-server loads its GGUF with `--lora … --lora-init-without-apply` and applies
  it per request); target LoRA ≥ 0.9× base. On tunehouse's CPU backend also the same adapter served
  merged (`serve_lora=merged`: the adapter folded into the base weights by tunehouse's merge, f32
  safetensors, exported to GGUF like the base and run by a llama-server of its own), and, as a
  second reference for it, the base on a llama-server of its own that holds no adapter ("plain";
  the base's own server holds the adapter, at scale 0 for base requests);
- 16 concurrent requests: generated tokens ÷ wall seconds (tunehouse `max_batch_size=16`,
  llama-server 16 slots, transformers one left-padded batch of 16);
- ratios tunehouse ÷ llama.cpp and tunehouse ÷ transformers; targets single and 16-concurrent ≥ 1×
  llama.cpp.
Sides alternate within each of `--rounds` rounds and each figure keeps its best round, since the
load of a shared machine drifts. Each side's settings are printed first; the last line is one JSON
object: `speedup` = tunehouse (its CPU backend) 16-concurrent ÷ llama-server 16-parallel in bf16
(fp32 if only that ran), every other figure beside it (`torch_engine_*`: the torch engine's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

from tunehouse.serve.llama_server import LlamaServer, build_info, ensure_llama_server, find_llama_server  # noqa: E402
from scratch import scratch_dir  # noqa: E402  (bench/ is on the path: run as a script)
from tunehouse.export.gguf import write_adapter, write_model  # noqa: E402
from tunehouse.models.default import DEFAULT_MODEL_NAME, ensure_default_model  # noqa: E402
from tunehouse.models.tiny import random_lora_adapter  # noqa: E402
from tunehouse.train.lora import merge_adapter_folder  # noqa: E402
from tunehouse.serve.engine import ModelRef, TorchEngine  # noqa: E402
from tunehouse.serve.llama_engine import LlamaCppEngine  # noqa: E402
from tunehouse.serve.sampling import SamplingParams  # noqa: E402

CACHE = Path.home() / ".cache" / "tunehouse-bench"


@dataclass
class Stream:
    """Client-side timing of one streamed request: perf_counter() at send, first token and end."""

    start: float
    first: float
    end: float
    tokens: int
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "Give me three tips for learning to cook.", "Why is the sky blue?", "What is a prime number?",
             "Describe a cat to someone who has never seen one.", "How do trains work?"]
CONCURRENT = 16
OWN_SERVERS = ("plain", "merged")  # measured on tunehouse's CPU backend alone
PRECISIONS = {"fp32": ("float32", "f32"), "bf16": ("bfloat16", "bf16")}  # → (torch dtype, GGUF type)


def single(s: Stream) -> dict:
    return {"tok_s": (s.tokens - 1) / (s.end - s.first), "ttft_ms": 1000 * (s.first - s.start)}


async def measure(one, prompts: list[list[int]], tokens: int, more: tuple[str, ...] = ()) -> dict:
    """`one(ids, model, tokens) -> Stream` on one side, `model` one of "base", "lora" (the adapter
    applied per request) or those in `more` ("plain": the base on a server holding no adapter,
    "merged": the adapter merged into the weights): a single request to each, then CONCURRENT base
    requests at once."""
    base, lora = single(await one(prompts[0], "base", tokens)), single(await one(prompts[0], "lora", tokens))
    own = {}
    for model in more:
        m = single(await one(prompts[0], model, tokens))
        own |= {f"{model}_tok_s": m["tok_s"], f"{model}_ttft_ms": m["ttft_ms"]}
    start = time.perf_counter()
    await asyncio.gather(*[one(prompts[i % len(prompts)], "base", tokens) for i in range(CONCURRENT)])
    return {"single_tok_s": base["tok_s"], "ttft_ms": base["ttft_ms"], "lora_tok_s": lora["tok_s"],
            "lora_ttft_ms": lora["ttft_ms"], **own,
            "concurrent16_tok_s": CONCURRENT * tokens / (time.perf_counter() - start)}


def keep_best(best: dict, new: dict) -> dict:
    return {k: v if k not in best else (min if k.endswith("_ms") else max)(best[k], v) for k, v in new.items()}


def tunehouse_side(engine, models: dict[str, ModelRef]):
    async def one(ids: list[int], model: str, tokens: int) -> Stream:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        start, first, n = time.perf_counter(), None, 0
        async for _ in engine.submit(models[model], ids, params):
            first = first or time.perf_counter()
            n += 1
        assert n == tokens, n
        return Stream(start, first, time.perf_counter(), n)
    return one


def llama_side(server: LlamaServer, client: httpx.AsyncClient):
    async def one(ids: list[int], model: str, tokens: int) -> Stream:
        """Greedy, exactly `tokens` new tokens after the prompt `ids` (sent as token ids, so both
        engines see the same ones), streamed; the adapter applied at scale 1 when `model` is "lora"."""
        body = {"prompt": ids, "n_predict": tokens, "temperature": 0, "top_k": 1, "samplers": ["top_k"], "ignore_eos": True,
                "stream": True, "return_tokens": True,
                "lora": server.lora_scales(0 if model == "lora" else None)}
        start, first, n = time.perf_counter(), None, 0
        async with client.stream("POST", f"{server.url}/completion", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                got = len(json.loads(line[6:]).get("tokens") or [])
                if got and first is None:
                    first = time.perf_counter()
                n += got
        if n != tokens:
            raise RuntimeError(f"llama-server streamed {n} tokens, not {tokens}")
        return Stream(start, first, time.perf_counter(), n)
    return one


class FirstToken:
    """A `generate` streamer noting when the first new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, _):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


class TransformersSide:
    """`model.generate`, greedy, exactly `tokens` new tokens: one request, and all CONCURRENT
    prompts as one left-padded batch (its batched generation)."""

    def __init__(self, path: Path, dtype: torch.dtype, pad_id: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.pad_id = pad_id

    def generate(self, prompts: list[list[int]], tokens: int, streamer=None) -> None:
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                      do_sample=False, pad_token_id=self.pad_id, streamer=streamer)
        assert out.shape[1] == width + tokens, out.shape

    def measure(self, prompts: list[list[int]], tokens: int) -> dict:
        first, start = FirstToken(), time.perf_counter()
        self.generate(prompts[:1], tokens, first)
        s = single(Stream(start, first.first, time.perf_counter(), tokens))
        start = time.perf_counter()
        self.generate([prompts[i % len(prompts)] for i in range(CONCURRENT)], tokens)
        return {"single_tok_s": s["tok_s"], "ttft_ms": s["ttft_ms"],
                "batched16_tok_s": CONCURRENT * tokens / (time.perf_counter() - start)}


def cached_gguf(base_dir: Path, gguf_type: str) -> Path:
    """The default model as GGUF, written once (temp name, then rename) by tunehouse's exporter."""
    dest = CACHE / "gguf" / f"{DEFAULT_MODEL_NAME.split('/')[-1]}-{gguf_type}.gguf"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".partial")
        write_model(base_dir, tmp, gguf_type, name=DEFAULT_MODEL_NAME)
        tmp.rename(dest)
    return dest


def run_precision(name: str, args, base_dir: Path, adapter: Path, merged_dir: Path, prompts: list[list[int]],
                  binary: Path, tmp: Path) -> dict:
    """Every side's figures at one precision, best of `args.rounds`, sides alternating."""
    dtype, gguf_type = PRECISIONS[name]
    t, threads = args.tokens, args.threads
    model_gguf = cached_gguf(base_dir, gguf_type)
    config = json.loads((base_dir / "config.json").read_text())
    lora_gguf = write_adapter(adapter, config, tmp / f"lora0-{gguf_type}.gguf", gguf_type)
    engine = TorchEngine(max_batch_size=CONCURRENT, threads=threads, dtype=dtype)
    # tunehouse's CPU backend: its own llama-server, its own GGUF export of the same weights.
    llama_engine = LlamaCppEngine(binary, tmp / f"engine-{name}", TorchEngine(threads=threads, dtype=dtype),
                                  slots=CONCURRENT, threads=threads, dtype=dtype, max_models=3)
    base = ModelRef(DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME, base_dir, 8192)
    lora = ModelRef("lora0", DEFAULT_MODEL_NAME, base_dir, 8192, adapter_path=adapter)
    merged = ModelRef("lora0-merged", "lora0-merged", merged_dir, 8192)  # what serve_lora=merged resolves to
    plain = ModelRef(DEFAULT_MODEL_NAME, "base-plain", base_dir, 8192)  # another weights key: its own llama-server
    peer = TransformersSide(base_dir, getattr(torch, dtype), engine.tokenizer(base).pad_token_id or 0)
    # The peer runs with the flags tunehouse's backend gives its own llama-server: a unified KV cache
    # of max(16384, context) tokens, f32 for f32 weights and llama.cpp's default f16 otherwise (with
    # f16 an f32 model's logits moved by 0.004, with f32 by 0.0000, on the tiny model in
    # tests/test_gguf_export.py), the prompt cache on (both sides see the same prompts each round).
    with LlamaServer(binary, model_gguf, threads=threads, slots=CONCURRENT, ctx=16384,
                     cache_type="f32" if gguf_type == "f32" else None, loras=[lora_gguf],
                     flash_attn="off" if gguf_type == "f32" else "auto") as server:
        print(f"\n== {name} ==")
        print(f"tunehouse     LlamaCppEngine (the CPU backend, serve_backend=auto): slots={CONCURRENT}, "
              f"threads={threads}, dtype={dtype} → GGUF {llama_engine.gguf_type}, the same llama-server binary and "
              f"flags as the peer, in-process submit() (token ids over loopback HTTP to its llama-server, "
              f"decoded by tunehouse), greedy, ignore_eos, LoRA {adapter.name} exported to GGUF and applied per request; "
              f"serve_lora=merged: {merged_dir.name} (the adapter merged into the f32 weights) exported to GGUF "
              f"{llama_engine.gguf_type} like the base and run by a llama-server of its own with the same flags, "
              f"and the base on one more llama-server holding no adapter (max_models=3: three servers)")
        print(f"tunehouse-torch TorchEngine(max_batch_size={CONCURRENT}, threads={engine.threads}, dtype={dtype}), "
              f"torch {torch.__version__}, in-process submit(), greedy, ignore_eos, LoRA {adapter.name} "
              f"attached at request time, no prompt cache")
        print(f"llama.cpp     llama-server, GGUF {gguf_type} ({model_gguf.name}, adapter {lora_gguf.name}), "
              + ", ".join(f"{k} {v}" for k, v in server.settings.items())
              + "; greedy as top_k 1 alone in the sampler chain (what tunehouse sends), ignore_eos, streamed over loopback HTTP")
        print(f"              {' '.join(server.cmd[1:])}")
        print(f"transformers  model.generate, {dtype}, {threads} threads, attention "
              f"{peer.model.config._attn_implementation}, greedy, min_new_tokens=max_new_tokens={t}, "
              f"one request and one left-padded batch of {CONCURRENT}")

        async def rounds() -> dict:
            # A fresh connection per request: a kept-alive one that llama-server had closed meanwhile
            # failed a request ("Server disconnected without sending a response"); loopback connects
            # cost well under a millisecond.
            limits = httpx.Limits(max_connections=4 * CONCURRENT, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=None, limits=limits) as client:
                sides = {"tunehouse": tunehouse_side(llama_engine, {"base": base, "lora": lora, "plain": plain,
                                                                    "merged": merged}),
                         "tunehouse_torch": tunehouse_side(engine, {"base": base, "lora": lora}),
                         "llama_cpp": llama_side(server, client)}
                for side, one in sides.items():  # warm-up: load weights and adapter, first-call costs
                    for model in ["base", "lora", *OWN_SERVERS] if side == "tunehouse" else ["base", "lora"]:
                        await one(prompts[0], model, 2)
                peer.generate(prompts[:2], 2)
                best = {k: {} for k in [*sides, "transformers"]}
                for r in range(args.rounds):
                    order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # who goes first alternates
                    for side in order:
                        more = OWN_SERVERS if side == "tunehouse" else ()
                        best[side] = keep_best(best[side], await measure(sides[side], prompts, t, more))
                    best["transformers"] = keep_best(best["transformers"], peer.measure(prompts, t))
                return best

        best = asyncio.run(rounds())
    engine.close()
    llama_engine.close()
    return best


def report(name: str, best: dict) -> dict:
    """Print one precision's readable lines; return its flat JSON figures."""
    th, tt, lc, tf = best["tunehouse"], best["tunehouse_torch"], best["llama_cpp"], best["transformers"]
    r = {"torch_engine_single_vs_llama_cpp": tt["single_tok_s"] / lc["single_tok_s"],
         "torch_engine_concurrent16_vs_llama_cpp": tt["concurrent16_tok_s"] / lc["concurrent16_tok_s"],
         "torch_engine_lora_vs_base": tt["lora_tok_s"] / tt["single_tok_s"],
         "single_vs_llama_cpp": th["single_tok_s"] / lc["single_tok_s"],
         "lora_vs_llama_cpp": th["lora_tok_s"] / lc["lora_tok_s"],
         "concurrent16_vs_llama_cpp": th["concurrent16_tok_s"] / lc["concurrent16_tok_s"],
         "single_vs_transformers": th["single_tok_s"] / tf["single_tok_s"],
         "concurrent16_vs_transformers_batched": th["concurrent16_tok_s"] / tf["batched16_tok_s"],
         "tunehouse_lora_vs_base": th["lora_tok_s"] / th["single_tok_s"],
         "tunehouse_lora_merged_vs_base": th["merged_tok_s"] / th["single_tok_s"],
         "tunehouse_lora_merged_vs_plain_base": th["merged_tok_s"] / th["plain_tok_s"],
         "tunehouse_lora_vs_plain_base": th["lora_tok_s"] / th["plain_tok_s"],
         "llama_cpp_lora_vs_base": lc["lora_tok_s"] / lc["single_tok_s"]}
    print(f"{name} single request  tunehouse {th['single_tok_s']:.1f} tok/s (first token {th['ttft_ms']:.0f} ms), "
          f"llama.cpp {lc['single_tok_s']:.1f} tok/s ({lc['ttft_ms']:.0f} ms), "
          f"transformers {tf['single_tok_s']:.1f} tok/s ({tf['ttft_ms']:.0f} ms)")
    print(f"{name} LoRA single     tunehouse {th['lora_tok_s']:.1f} tok/s ({r['tunehouse_lora_vs_base']:.2f}x base, "
          f"target >= 0.9x; first token {th['lora_ttft_ms']:.0f} ms), served merged {th['merged_tok_s']:.1f} tok/s "
          f"({r['tunehouse_lora_merged_vs_base']:.2f}x base; {th['merged_ttft_ms']:.0f} ms), llama.cpp "
          f"{lc['lora_tok_s']:.1f} tok/s ({r['llama_cpp_lora_vs_base']:.2f}x base; {lc['lora_ttft_ms']:.0f} ms)")
    print(f"{name} base, no adapter tunehouse {th['plain_tok_s']:.1f} tok/s on a llama-server of its own "
          f"({th['plain_ttft_ms']:.0f} ms): served merged {r['tunehouse_lora_merged_vs_plain_base']:.2f}x it, "
          f"LoRA applied per request {r['tunehouse_lora_vs_plain_base']:.2f}x it")
    print(f"{name} torch engine    single {tt['single_tok_s']:.1f} tok/s ({r['torch_engine_single_vs_llama_cpp']:.2f}x "
          f"llama.cpp), LoRA {r['torch_engine_lora_vs_base']:.2f}x base, {CONCURRENT} concurrent "
          f"{tt['concurrent16_tok_s']:.1f} tok/s ({r['torch_engine_concurrent16_vs_llama_cpp']:.2f}x)")
    print(f"{name} {CONCURRENT} concurrent   tunehouse {th['concurrent16_tok_s']:.1f} tok/s, llama-server "
          f"-np {CONCURRENT} {lc['concurrent16_tok_s']:.1f} tok/s, transformers batched "
          f"{tf['batched16_tok_s']:.1f} tok/s")
    print(f"{name} tunehouse ÷     llama.cpp: single {r['single_vs_llama_cpp']:.2f}x, LoRA {r['lora_vs_llama_cpp']:.2f}x, "
          f"{CONCURRENT} concurrent {r['concurrent16_vs_llama_cpp']:.2f}x (targets >= 1x); transformers: single "
          f"{r['single_vs_transformers']:.2f}x, {CONCURRENT} concurrent vs batched "
          f"{r['concurrent16_vs_transformers_batched']:.2f}x")
    flat = {f"{k}_{name}": v for k, v in r.items()}
    for side, figures in best.items():
        flat.update({f"{side}_{k}_{name}": v for k, v in figures.items()})
    return flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads, every side (default: all cores)")
    ap.add_argument("--rounds", type=int, default=2, help="repeats of every figure; the best is kept")
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    args = ap.parse_args()

    binary = find_llama_server() or ensure_llama_server()
    info = build_info(binary)
    llama_version = info.get("version", "?").splitlines()[0].removeprefix("version: ")
    base_dir = ensure_default_model(CACHE, progress=print)
    tmp = scratch_dir("tunehouse-bench-serve-")  # ~2 GB of weights
    adapter = random_lora_adapter(base_dir, tmp / "lora0", seed=0)
    merged_dir = merge_adapter_folder(base_dir, adapter, tmp / "lora0-merged")
    from transformers import AutoTokenizer, __version__ as transformers_version

    tok = AutoTokenizer.from_pretrained(base_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in QUESTIONS]
    prompts = [tok.encode(p, add_special_tokens=False) for p in prompts]
    print(f"{DEFAULT_MODEL_NAME}, {args.tokens} new tokens per request, {len(QUESTIONS)} chat prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.threads} thread(s) every side, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"llama.cpp {llama_version}, built from {info.get('sdist')} "
          f"(vendored llama.cpp) with {' '.join(info.get('cmake_flags', []))} in {info.get('build_seconds')} s; "
          f"transformers {transformers_version}")

    names = list(PRECISIONS) if args.precision == "both" else [args.precision]
    fig = {}
    for name in names:
        fig.update(report(name, run_precision(name, args, base_dir, adapter, merged_dir, prompts, binary, tmp)))
    headline = "bf16" if "bf16" in names else "fp32"
    out = {"speedup": fig[f"concurrent16_vs_llama_cpp_{headline}"], "headline": f"concurrent16_vs_llama_cpp_{headline}",
           **fig, "tokens": args.tokens, "threads": args.threads, "rounds": args.rounds,
           "llama_cpp": llama_version, "load_average_end": os.getloadavg()[0]}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
