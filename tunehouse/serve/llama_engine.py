"""`LlamaCppEngine`: the CPU serving backend. Generation runs in llama.cpp's `llama-server`, which
decodes several times faster than torch on a CPU (bench/serve.py); everything else stays on the
torch engine it wraps.

    submit() ─▶ llama-server for the request's weights (GGUF export of them, LoRA adapters as GGUF
                adapters, one process per base; started on first use)
             ─▶ POST /completion with the prompt's token ids, streamed token by token
             ─▶ tunehouse decodes the ids with the model's own tokenizer: stop sequences, held-back
                text, end of sequence and max_tokens are decided exactly as the torch engine does

- **What goes to torch instead** (`_torch_only`): prompt scoring (echo, validation loss, fp32
  there), `response_format` grammars, presence/frequency penalties (llama.cpp counts the prompt's
  tokens too, OpenAI only the output's), and models the GGUF exporter cannot write (non-llama
  architectures, adapters with per-module ranks). Sampling otherwise follows tunehouse's order
  (penalty, temperature, top-k, top-p, min-p); log-probs are the raw distribution's, as on torch.
- **Adapters:** llama-server loads LoRA adapters at start only, and applies them per request.
  A request for an adapter its base's server does not hold starts a new server with it (the
  `max_adapters` most recently used), new requests go there, and the old one is stopped when its
  last stream ends. Both map the same GGUF files, so the base's weights are in memory once.
  llama-server batches the requests that use the same adapter together.
- **Precision:** GGUF exports in bf16 where the CPU has AVX512-BF16, else f16, or as `serve_dtype`
  says (float32 → f32). Exports are cached in `cache_dir` by the source folder and its mtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import httpx
import orjson

from tunehouse.errors import InvalidInput
from tunehouse.export import gguf as gguf_export
from tunehouse.serve import scoring
from tunehouse.serve.engine import Engine, Generation, ModelRef, TokenEvent, TorchEngine
from tunehouse.serve.grammar import Grammar, Spec
from tunehouse.serve.llama_server import LlamaServer
from tunehouse.serve.sampling import SamplingParams, text_step
from tunehouse.serve.weights import eos_ids

log = logging.getLogger("tunehouse.serve")

GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def gguf_type_for(dtype: str) -> str:
    """`serve_dtype` → the GGUF type the weights are exported in."""
    if dtype == "auto":
        return "bf16" if cpu_has_bf16() else "f16"
    return GGUF_TYPES[dtype]


@dataclass(eq=False)
class _Server:
    """One llama-server process for one set of weights and the adapters it was started with."""

    proc: LlamaServer
    path: str  # the weights' folder
    threads: int
    adapters: list[str]  # adapter paths; index = llama.cpp's adapter id
    capacity: int = 0  # KV cache cells (-c), shared by all slots (unified)
    streams: int = 0  # requests in flight
    retired: bool = False  # no new requests; stopped when `streams` reaches 0
    used: dict[str, float] = field(default_factory=dict)  # adapter path → last use (monotonic)
    reserved: int = 0  # KV cells the streams admitted may fill (prompt + max_tokens each)
    queue: deque = field(default_factory=deque)  # streams waiting for cells, first come first served


class LlamaCppEngine(Engine):
    def __init__(self, binary: Path, cache_dir: Path, torch_engine: TorchEngine, *, slots: int = 32,
                 threads: int | None = None, dtype: str = "auto", max_models: int = 2, max_adapters: int = 8,
                 kv_tokens: int = 16384, cores_shared: Callable[[], bool] | None = None):
        self.binary, self.cache_dir = Path(binary), Path(cache_dir)
        self.torch = torch_engine
        self.slots, self.max_models, self.max_adapters = slots, max_models, max_adapters
        self.threads = threads or torch_engine.threads
        self._cores_shared = cores_shared
        self.gguf_type = gguf_type_for(dtype)
        self.kv_tokens = kv_tokens
        self._lock = threading.Lock()  # servers, stats: held briefly, also on the event loop
        self._starting = threading.Lock()  # one export + server start at a time
        self._servers: dict[str, _Server] = {}  # weights key → its current server (insertion = LRU)
        self._retired: list[_Server] = []
        self._unsupported: dict[str, str] = {}  # weights or adapter path → why it runs on torch
        self._decoders: dict[str, tuple] = {}  # weights path → (tokenizer, eos ids), for this engine's decoding
        self._exports: dict[str, Path] = {}  # weights/adapter path → its GGUF in cache_dir
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop → its client
        self._sources: dict[str, str] = {}
        self._closed = False
        # requests: those sent to llama-server; torch_requests: those routed to torch at submit;
        # torch_choices: choices whose weights the exporter refused, found out at their first start
        self._stats = dict(requests=0, tokens=0, cancelled=0, max_batch_size=0, server_starts=0,
                           torch_requests=0, torch_choices=0)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    # -- interface --------------------------------------------------------------------------------
    def tokenizer(self, model: ModelRef):
        return self.torch.tokenizer(model)

    def grammar(self, model: ModelRef, spec: Spec) -> Grammar:
        return self.torch.grammar(model, spec)

    def score(self, model: ModelRef, token_ids: list[int], top: int = 0) -> asyncio.Future[scoring.Scored]:
        return self.torch.score(model, token_ids, top)

    def submit(self, model: ModelRef, prompt_ids: list[int], params: SamplingParams, n: int = 1,
               grammar: Grammar | None = None) -> Generation:
        if model.source:
            with self._lock:
                self._sources[str(model.adapter_path or model.weights_path)] = model.source
        if self._torch_only(model, params, grammar):
            with self._lock:
                self._stats["torch_requests"] += 1
            return self.torch.submit(model, prompt_ids, params, n, grammar)
        if self._closed:
            raise RuntimeError("the inference engine is shut down")
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task] = []

        def cancel():  # Generation.cancel may be called from any thread
            loop.call_soon_threadsafe(lambda: [t.cancel() for t in tasks])

        gen = Generation(n, on_cancel=cancel)
        tasks += [loop.create_task(self._choice(gen, i, model, list(prompt_ids), params)) for i in range(n)]
        with self._lock:
            self._stats["requests"] += 1
        return gen

    def forget(self, where: str | Path) -> None:
        where = str(where)

        def under(path: str | None) -> bool:
            return path is not None and (path == where or path.startswith(where.rstrip("/") + "/"))

        def gone(path: str) -> bool:
            return under(path) or under(self._sources.get(path))

        with self._lock:
            for key, srv in list(self._servers.items()):
                if gone(srv.path) or any(gone(a) for a in srv.adapters):
                    self._retire(self._servers.pop(key))
            for path in [p for p in self._sources if gone(p)]:
                del self._sources[path]
            for path in [p for p in self._decoders if gone(p)]:
                del self._decoders[path]
            for path in [p for p in self._exports if gone(p)]:  # a running server keeps its mapping
                self._exports.pop(path).unlink(missing_ok=True)
        self.torch.forget(where)

    def stats(self) -> dict:
        """The torch engine's counters (scoring, grammars) with this engine's added in: requests,
        tokens, cancelled and running count both; max_batch_size here is the most streams one set
        of llama-servers had in flight at once; `loaded` lists what either holds."""
        t = self.torch.stats()
        with self._lock:
            streams = sum(s.streams for s in [*self._servers.values(), *self._retired])
            loaded = {k: list(v) for k, v in t["loaded"].items()}
            for k, srv in self._servers.items():
                loaded[k] = list(dict.fromkeys([*loaded.get(k, []), *srv.adapters]))
            mine = self._stats
            return dict(t, backend="llama.cpp", gguf_type=self.gguf_type, server_starts=mine["server_starts"],
                        torch_requests=mine["torch_requests"], torch_choices=mine["torch_choices"], loaded=loaded,
                        requests=mine["requests"] + t["requests"] - mine["torch_choices"],
                        tokens=mine["tokens"] + t["tokens"], cancelled=mine["cancelled"] + t["cancelled"],
                        running=streams + t["running"], max_batch_size=max(mine["max_batch_size"], t["max_batch_size"]))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            servers = [*self._servers.values(), *self._retired]
            self._servers, self._retired = {}, []
        for srv in servers:
            srv.proc.stop()
        self.torch.close()

    # -- routing ----------------------------------------------------------------------------------
    def _torch_only(self, model: ModelRef, params: SamplingParams, grammar: Grammar | None) -> bool:
        if grammar is not None or params.presence_penalty or params.frequency_penalty:
            return True
        with self._lock:
            return any(str(p) in self._unsupported for p in (model.weights_path, model.adapter_path) if p)

    # -- one choice -------------------------------------------------------------------------------
    async def _choice(self, gen: Generation, index: int, model: ModelRef, prompt: list[int],
                      params: SamplingParams) -> None:
        srv = None
        try:
            try:
                srv, lora = await asyncio.to_thread(self._acquire, model)
                tokenizer, eos = self._decoders.get(str(model.weights_path)) or await asyncio.to_thread(
                    self._decoder, model)
            except InvalidInput as exc:  # the GGUF exporter cannot write these weights: torch serves them
                log.info("%s is served by the torch engine: %s", model.name, exc)
                await self._on_torch(gen, index, model, prompt, params)
                return
            except Exception as exc:
                log.exception("starting llama-server for %s failed", model.name)
                gen.put(TokenEvent(index, "", -1, error=f"cannot load {model.name}: {exc}"))
                return
            need = len(prompt) + params.max_tokens
            await self._admit(srv, need)
            try:
                await self._stream(gen, index, srv, lora, prompt, params, tokenizer, eos)
            finally:
                with self._lock:
                    srv.reserved -= need
        except asyncio.CancelledError:
            with self._lock:
                self._stats["cancelled"] += index == 0  # counted per request, as on torch
        except Exception as exc:  # a failed stream fails its own choice
            log.exception("llama-server request for %s failed", model.name)
            gen.put(TokenEvent(index, "", -1, error=f"{type(exc).__name__}: {exc}"))
        finally:
            if srv is not None:
                self._release(srv)

    async def _on_torch(self, gen: Generation, index: int, model: ModelRef, prompt: list[int],
                        params: SamplingParams) -> None:
        """Choice `index` of `gen`, generated by the torch engine (with the seed it would have had)."""
        seed = None if params.seed is None else params.seed + index
        with self._lock:
            self._stats["torch_choices"] += 1
        inner = self.torch.submit(model, prompt, replace(params, seed=seed), 1)
        try:
            async for event in inner:
                event.index = index
                gen.put(event)
        finally:
            inner.cancel()

    async def _stream(self, gen: Generation, index: int, srv: _Server, lora: int | None, prompt: list[int],
                      params: SamplingParams, tokenizer, eos: set[int]) -> None:
        body = _request(prompt, params, None if params.seed is None else params.seed + index,
                        srv.proc.lora_scales(lora))
        out: list[int] = []
        text, emitted = "", 0
        # Incremental decoding (vLLM's way): the new tokens are decoded together with a few before
        # them, for context (SentencePiece spaces), and appended once they make whole characters.
        prefix, read, before = 0, 0, None
        # A special token's event waits for the next chunk: llama.cpp's end-of-generation set can hold
        # more tokens than the model's eos ids (ChatML's <|endoftext|> beside <|im_end|>), and when it
        # stops on one, that token ends the choice with `eos`.
        held: TokenEvent | None = None
        special = set(tokenizer.all_special_ids)
        async with self._client().stream("POST", f"{srv.proc.url}/completion", json=body) as r:
            if r.status_code != 200:
                detail = (await r.aread()).decode(errors="replace")[:500]
                raise RuntimeError(f"llama-server answered {r.status_code}: {detail}")
            async for chunk in _events(r):
                if "error" in chunk:  # e.g. the shared KV cache is full: this choice fails, with why
                    raise RuntimeError(f"llama-server: {chunk['error'].get('message', chunk['error'])}")
                if chunk.get("tokens_predicted", 0) > len(out) + len(chunk.get("tokens") or []):
                    raise RuntimeError(
                        f"{self.binary} did not stream every token (a stock llama-server holds back those "
                        "that end inside a UTF-8 character); use the one `make llama-server` builds")
                probs = chunk.get("completion_probabilities") or []
                for j, token in enumerate(chunk.get("tokens") or []):
                    if held is not None:  # the special token before this one did not end it
                        gen.put(held)
                        held = None
                    out.append(token)
                    lp, top = _logprobs(probs[j] if j < len(probs) else None, params.logprobs)
                    is_eos = token in eos and not params.ignore_eos
                    last = is_eos or len(out) >= params.max_tokens  # then an incomplete character goes too
                    if before is None:  # decoded once per (prefix, read), not per token
                        before = tokenizer.decode(out[prefix:read], skip_special_tokens=True)
                    after = tokenizer.decode(out[prefix:], skip_special_tokens=True)
                    if len(after) > len(before) and (last or not after.endswith("\ufffd")):
                        text += after[len(before):]
                        prefix, read, before = read, len(out), None
                    delta, emitted, finish = text_step(text, emitted, params, len(out), eos=is_eos)
                    with self._lock:
                        self._stats["tokens"] += 1
                    event = TokenEvent(index, delta, token, lp, top, finish)
                    if finish:
                        gen.put(event)
                        return  # leaving the stream closes it; llama-server frees the slot
                    if token in special:  # it may be in llama.cpp's end-of-generation set and not in eos
                        held = event
                    else:
                        gen.put(event)
                if chunk.get("stop"):
                    if held is None:
                        raise RuntimeError(f"llama-server stopped early ({chunk.get('stop_type')}, "
                                           f"{chunk.get('tokens_predicted')} tokens)")
                    held.finish_reason = "eos"
                    gen.put(held)
                    return
        raise RuntimeError("llama-server ended the stream without finishing it")

    def _client(self) -> httpx.AsyncClient:
        """This event loop's HTTP client (one per loop: a client's connections belong to the loop
        it was first used on). Making one costs ~20 ms of CPU (its TLS context), so not one per
        request. No kept-alive connections: llama-server closes idle ones, and a request sent on
        one of those fails; a loopback connect costs well under a millisecond."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.get(loop)
            if client is None:
                client = self._clients[loop] = httpx.AsyncClient(
                    timeout=httpx.Timeout(None, connect=10),
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))
            return client

    # -- servers ----------------------------------------------------------------------------------
    def _decoder(self, model: ModelRef) -> tuple:
        """This engine's own tokenizer for a model (decoding runs on the event loop thread, the
        API's tokenizer in its worker threads) and the model's eos ids."""
        key = str(model.weights_path)
        with self._lock:
            if key in self._decoders:
                return self._decoders[key]
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.weights_path)
        found = (tokenizer, eos_ids(model.weights_path, tokenizer))
        with self._lock:
            return self._decoders.setdefault(key, found)

    def _acquire(self, model: ModelRef) -> tuple[_Server, int | None]:
        """A running server for the model's weights that holds its adapter, and the adapter's id
        there; counts a stream on it (`_release` uncounts). Starts one if needed (blocking: call
        it off the event loop). Starts are serialised; requests to running servers never wait on one."""
        adapter = str(model.adapter_path) if model.adapter_path else None
        threads = self._threads_now()
        with self._lock:
            if (got := self._running(model.weights, adapter, threads)) is not None:
                return got
        with self._starting:
            with self._lock:
                if (got := self._running(model.weights, adapter, threads)) is not None:
                    return got  # another request started it meanwhile
                srv = self._servers.get(model.weights)
                recent = [a for a in sorted(srv.used, key=srv.used.get) if a != adapter] if srv else []
                keep = recent[max(0, len(recent) - (self.max_adapters - 1)):] if self.max_adapters > 1 else []
                adapters = [a for a in srv.adapters if a in keep] if srv else []
                adapters += [adapter] if adapter and adapter not in adapters else []
                used = {a: t for a, t in srv.used.items() if a in adapters} if srv else {}
            lora_ggufs = [self._export_adapter(model, Path(a)) for a in adapters]
            ctx = max(self.kv_tokens, model.context_length)
            proc = LlamaServer(self.binary, self._export_model(model), threads=threads, slots=self.slots,
                               ctx=ctx, loras=lora_ggufs,
                               cache_type="f32" if self.gguf_type == "f32" else None,  # else f16
                               flash_attn="off" if self.gguf_type == "f32" else "auto",
                               log_dir=self.cache_dir)
            proc.start()
            log.info("llama-server for %s (%d adapter(s), %s, %d threads) on %s", model.weights, len(adapters),
                     self.gguf_type, threads, proc.url)
            with self._lock:
                self._stats["server_starts"] += 1
                if model.weights in self._servers:
                    self._retire(self._servers.pop(model.weights))
                new = self._servers[model.weights] = _Server(proc, str(model.weights_path), threads, adapters,
                                                             capacity=ctx, used=used)
                for key in [k for k in self._servers if k != model.weights]:  # least recently used first
                    if len(self._servers) <= self.max_models:
                        break
                    self._retire(self._servers.pop(key))
                return self._take(new, model.weights, adapter)

    def _running(self, key: str, adapter: str | None, threads: int) -> tuple[_Server, int | None] | None:
        """(under the lock) The current server for `key` if it holds `adapter` and runs `threads`
        threads (or is busy: one started with other thread counts is replaced once idle, since
        llama.cpp's threads meet at a barrier on every op and spin on cores a training process
        also uses); None if one must be started."""
        srv = self._servers.get(key)
        if srv is not None and not srv.proc.alive:
            log.warning("llama-server for %s exited (%s); starting it again", key, srv.proc.proc.returncode)
            self._retire(self._servers.pop(key))
            return None
        if srv is None or (srv.threads != threads and srv.streams == 0):
            return None
        return self._take(srv, key, adapter) if adapter is None or adapter in srv.adapters else None

    def _threads_now(self) -> int:
        shared = self._cores_shared is not None and self._cores_shared()
        return max(1, self.threads // 2) if shared else self.threads

    def _take(self, srv: _Server, key: str, adapter: str | None) -> tuple[_Server, int | None]:
        """(under the lock) Count a stream on `srv`, mark it and its adapter most recently used."""
        srv.streams += 1
        if adapter:
            srv.used[adapter] = time.monotonic()
        self._servers[key] = self._servers.pop(key)
        running = sum(s.streams for s in self._servers.values())
        self._stats["max_batch_size"] = max(self._stats["max_batch_size"], running)
        return srv, srv.adapters.index(adapter) if adapter else None

    async def _admit(self, srv: _Server, need: int) -> None:
        """Wait until the server's KV cache has room for `need` more cells, in arrival order.
        llama-server has no admission of its own: when the shared cache fills up it fails every
        running request ("Context size has been exceeded"), so none is sent that might not fit."""
        if need > srv.capacity:
            raise RuntimeError(f"prompt + max_tokens is {need} tokens, more than the {srv.capacity}-token KV cache "
                               "of llama-server (serve_llama_kv_tokens)")
        ticket = object()
        with self._lock:
            srv.queue.append(ticket)
        try:
            while True:
                with self._lock:
                    if srv.queue[0] is ticket and srv.reserved + need <= srv.capacity:
                        srv.queue.popleft()
                        srv.reserved += need
                        return
                await asyncio.sleep(0.005)  # rare: only while the cache is full
        except BaseException:
            with self._lock:
                if ticket in srv.queue:
                    srv.queue.remove(ticket)
            raise

    def _release(self, srv: _Server) -> None:
        with self._lock:
            srv.streams -= 1
            stop = srv.retired and srv.streams == 0
            if stop:
                self._retired.remove(srv)
        if stop:
            srv.proc.stop()

    def _retire(self, srv: _Server) -> None:
        """(under the lock) No new requests go to `srv`; it stops now if idle, else after its last."""
        srv.retired = True
        if srv.streams == 0:
            threading.Thread(target=srv.proc.stop, daemon=True).start()
        else:
            self._retired.append(srv)

    def _export_model(self, model: ModelRef) -> Path:
        return self._gguf(Path(model.weights_path), "model", lambda tmp: gguf_export.write_model(
            model.weights_path, tmp, self.gguf_type, name=model.weights))

    def _export_adapter(self, model: ModelRef, adapter: Path) -> Path:
        def write(tmp: Path) -> Path:
            config = json.loads((Path(model.weights_path) / "config.json").read_text())
            return gguf_export.write_adapter(adapter, config, tmp, self.gguf_type)

        return self._gguf(adapter, "lora", write)

    def _gguf(self, source: Path, kind: str, write) -> Path:
        """`source` as GGUF in the cache (written through a temporary file the first time). One the
        exporter refuses marks `source` as served by torch and raises InvalidInput."""
        stamp = f"{source.resolve()}:{os.stat(source).st_mtime_ns}:{self.gguf_type}"
        dest = self.cache_dir / f"{kind}-{hashlib.sha256(stamp.encode()).hexdigest()[:20]}.gguf"
        if not dest.is_file():
            tmp = dest.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                write(tmp)
                tmp.rename(dest)
            except InvalidInput as exc:
                with self._lock:
                    self._unsupported[str(source)] = str(exc)
                raise
            finally:
                tmp.unlink(missing_ok=True)
        with self._lock:
            self._exports[str(source)] = dest
        return dest


async def _events(response: httpx.Response):
    """The JSON objects of a server-sent event stream (`data: {...}` lines), parsed from the raw
    bytes: one event per token, so no str decoding or line splitting in Python."""
    pending = b""
    async for data in response.aiter_raw():
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data: {"):
                yield orjson.loads(line[6:])
    if pending.startswith(b"data: {"):
        yield orjson.loads(pending[6:])


def _request(prompt: list[int], params: SamplingParams, seed: int | None, lora: list[dict]) -> dict:
    """The /completion body: tunehouse's sampling in its order, only the samplers that act (greedy is
    top-k 1: a temperature-0 chain would still end in a softmax over the whole vocabulary, per
    token and per row), every llama.cpp extra off."""
    chain = ["penalties"] if params.repetition_penalty != 1 else []
    if params.greedy:
        chain.append("top_k")
    else:
        chain += ["temperature"] + [name for name, on in (("top_k", params.top_k > 0), ("top_p", params.top_p < 1),
                                                           ("min_p", params.min_p > 0)) if on]
    body = {"prompt": prompt, "n_predict": params.max_tokens, "stream": True, "return_tokens": True,
            "samplers": chain, "temperature": params.temperature, "top_k": 1 if params.greedy else params.top_k,
            "top_p": params.top_p, "min_p": params.min_p, "typical_p": 1.0,
            # HF's repetition penalty covers prompt and output: the window is all of both.
            "repeat_penalty": params.repetition_penalty, "repeat_last_n": len(prompt) + params.max_tokens,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0,
            "mirostat": 0, "top_n_sigma": -1.0, "ignore_eos": params.ignore_eos, "lora": lora}
    if seed is not None:
        body["seed"] = seed
    if params.logprobs is not None:
        body["n_probs"] = max(params.logprobs, 1)  # the chosen token's log-prob comes with any n_probs
    if params.logit_bias:
        body["logit_bias"] = [[t, b] for t, b in params.logit_bias]
    return body


def _logprobs(entry: dict | None, k: int | None) -> tuple[float | None, list[tuple[int, float]] | None]:
    """llama.cpp's `completion_probabilities` entry → (chosen token's log-prob, top k (id, log-prob))."""
    if k is None or entry is None:
        return None, None
    return entry["logprob"], [(t["id"], t["logprob"]) for t in entry.get("top_logprobs", [])[:k]]
