"""Inference engine: the `Engine` interface the API talks to, and `TorchEngine`, its
transformers implementation for CPUs and small GPUs (a vLLM engine can implement the same
interface on GPU machines).

TorchEngine runs one scheduler thread over one running batch:

    submit() ──▶ waiting (FIFO) ──admit──▶ prefill (left-padded) ──merge KV──▶ running batch
                                                                            │ one forward per step
    asyncio.Queue per request ◀── text deltas, finish reasons ◀── sample ◀──┘ finished/cancelled rows leave

- A request may carry a grammar (`response_format`, `serve/grammar.py`): each of its rows walks
  its own constraint, and every step masks those rows' logits to the tokens the grammar allows,
  in the same forward as unconstrained rows. A row whose grammar is complete ends with `stop`.
- Scoring requests (prompt log-probs, `echo`) wait in their own queue and run between decoding
  steps, several per forward up to a token budget, on whatever weights they name.
- Requests on the same weights are decoded together, one forward per step; new arrivals are
  prefilled and merged into the running batch's KV cache at the next step (left padding +
  attention mask + explicit position ids), finished or cancelled rows are dropped from it.
- Admission is strict FIFO: a request for other weights at the head of the queue stops further
  admissions, the batch drains, and that request's weights run next — nothing starves.
- A base model is loaded once; LoRA adapters of fine-tuned models are attached to it by name
  (`serve/lora.py`), rows of one batch may each use a different one, and the least recently used
  ones are dropped beyond `max_adapters` or `adapter_memory_mb` (never one a running row uses).
  Full fine-tunes load as their own weights; loaded weights are LRU-evicted beyond `max_models`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tunehouse.serve import grammar as grammars
from tunehouse.serve import scoring
from tunehouse.serve.batch import RunningBatch, new_batch
from tunehouse.serve.grammar import Constraint, Grammar, GrammarCache, Spec
from tunehouse.serve.weights import LoadedWeights
from tunehouse.serve.sampling import SamplingParams, make_generator, next_tokens, text_step, top_logprobs

log = logging.getLogger("tunehouse.serve")


@dataclass(frozen=True)
class ModelRef:
    """What to run: weights (a base model, or a full fine-tune) plus, optionally, a LoRA adapter."""

    name: str  # the name callers use; echoed in responses
    weights: str  # key of the weights to load
    weights_path: Path
    context_length: int
    adapter_path: Path | None = None
    source: str | None = None  # the blob-store folder the weights were copied from (`jobs/<id>`)


@dataclass
class TokenEvent:
    """One generated token of choice `index`: `text` is the new text to show (possibly "" while a
    possible stop sequence or an incomplete character is held back)."""

    index: int
    text: str
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, log-prob), most likely first
    finish_reason: str | None = None  # "eos" | "stop" | "length" on the last event of a choice
    error: str | None = None
    tool_calls: list[dict] | None = None  # calls completed by this token (serve/tool_calls.py)


class Generation:
    """Handle on the n sequences of one request: async-iterate its TokenEvents; `cancel()` (e.g. on
    client disconnect) stops the generation at the next decoding step."""

    def __init__(self, n: int, on_cancel):
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()  # created on the loop's thread (submit)
        self._open = n
        self._on_cancel = on_cancel
        self.cancelled = False

    def put(self, event: TokenEvent) -> None:
        """From the scheduler thread (through the loop), or from a task on the loop itself (the
        llama.cpp backend's streams: straight in, with no wake-up write per token)."""
        if threading.get_ident() == self._loop_thread:
            self.queue.put_nowait(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            self.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self._open == 0:
            raise StopAsyncIteration
        event = await self.queue.get()
        if event.finish_reason or event.error:
            self._open -= 1
        return event

    def cancel(self) -> None:
        if not self.cancelled and self._open:
            self.cancelled = True
            self._on_cancel()


class Engine(ABC):
    """What the API needs from an inference engine."""

    @abstractmethod
    def tokenizer(self, model: ModelRef) -> Any:
        """The model's Hugging Face tokenizer (chat template, prompt encoding, token strings)."""

    @abstractmethod
    def submit(self, model: ModelRef, prompt_ids: list[int], params: SamplingParams, n: int = 1,
               grammar: Grammar | None = None) -> Generation:
        """Queue n sequences continuing `prompt_ids` (choice i samples with seed + i), each held
        to `grammar` when one is given; call from a running event loop."""

    @abstractmethod
    def grammar(self, model: ModelRef, spec: Spec) -> Grammar:
        """`spec` compiled for the model's tokenizer (cached); blocks, so call it off the event
        loop. An unusable schema or pattern raises InvalidInput naming `response_format`."""

    @abstractmethod
    def score(self, model: ModelRef, token_ids: list[int], top: int = 0) -> asyncio.Future[scoring.Scored]:
        """Log-prob of every token of `token_ids` given those before it (and the `top` most likely
        tokens at each position), without generating; call from a running event loop."""

    @abstractmethod
    def forget(self, where: str | Path) -> None:
        """Drop loaded weights and adapters read from at or under `where`: a local folder, or a
        blob-store key (`jobs/<id>`, a deleted job's) matched against each ModelRef's source."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters: max_batch_size, steps, tokens, cancelled, model_loads, adapter_loads, evictions,
        constrained (requests held to a grammar)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the scheduler; pending requests end with an error event."""


# -- TorchEngine ---------------------------------------------------------------------------------
@dataclass(eq=False)
class _Seq:
    gen: Generation
    index: int
    model: ModelRef
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    constraint: Constraint | None = None
    out: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already sent
    finish: str | None = None


@dataclass(eq=False)
class _ScoreJob:
    model: ModelRef
    ids: list[int]
    top: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def resolve(self, result: scoring.Scored | None = None, error: Exception | None = None) -> None:
        def settle():
            if not self.future.done():
                self.future.set_exception(error) if error else self.future.set_result(result)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


class TorchEngine(Engine):
    def __init__(self, *, max_batch_size: int = 32, max_models: int = 2, max_adapters: int = 8,
                 dtype: str = "float32", device: str | None = None, threads: int | None = None,
                 sweep_s: float = 5.0, score_tokens: int = 4096, adapter_memory_mb: float = 1024,
                 cores_shared: Callable[[], bool] | None = None):
        self.max_batch_size, self.max_models, self.max_adapters = max_batch_size, max_models, max_adapters
        self.adapter_budget = int(adapter_memory_mb * 2**20)  # bytes of attached adapters per base
        self.score_tokens = score_tokens  # padded tokens per scoring forward
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # auto: bf16 on a GPU that has it; float32 on a CPU, where bf16 would speed up batched
        # decoding (2x at 16 concurrent requests on AVX512-BF16, bench/serve.py) but put ~0.2
        # nats of rounding on the prompt log-probs that validation loss and the model comparison
        # are computed from.
        if dtype == "auto":
            cuda_bf16 = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
            dtype = "bfloat16" if cuda_bf16 else "float32"
        self.dtype = getattr(torch, dtype)
        # Every core by default (torch's count: the physical cores, or $OMP_NUM_THREADS): decoding
        # is bound by weight reads, and two threads stream them faster than one. While
        # `cores_shared()` (the embedded worker's training child is running beside us) half of
        # them: oversubscribed intra-op threads spin, and on 2 shared cores a 32-token reply took
        # 1.1 s with 2 threads against 0.07 s with 1.
        self.threads = threads or torch.get_num_threads()
        self._cores_shared = cores_shared
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._scoring: deque[_ScoreJob] = deque()
        self._forget: set[str] = set()
        self._sources: dict[str, str] = {}  # local weights/adapter path → the store key it came from
        self._models: OrderedDict[str, LoadedWeights] = OrderedDict()
        self._tokenizers: dict[str, Any] = {}
        self._tokenizer_lock = threading.Lock()
        self.grammars = GrammarCache(threads=self.threads)
        self._batch: RunningBatch | None = None
        self._closed = False
        self._sweep_s, self._swept = sweep_s, time.monotonic()
        self._stats = dict(max_batch_size=0, steps=0, tokens=0, requests=0, cancelled=0, model_loads=0,
                           adapter_loads=0, adapter_evictions=0, model_evictions=0,
                           scored=0, scored_tokens=0, score_forwards=0, constrained=0)
        self._thread = threading.Thread(target=self._run, name="tunehouse-engine", daemon=True)
        self._thread.start()

    # -- interface --------------------------------------------------------------------------------
    def _note(self, model: ModelRef) -> None:
        if model.source:
            with self._cv:
                self._sources[str(model.adapter_path or model.weights_path)] = model.source

    def tokenizer(self, model: ModelRef):
        self._note(model)
        key = str(model.weights_path)
        # One loader at a time: concurrent first requests raced in transformers' lazy import
        # ("cannot import name 'AutoTokenizer'") and would load the same tokenizer twice.
        with self._tokenizer_lock:
            if key not in self._tokenizers:
                from transformers import AutoTokenizer

                self._tokenizers[key] = AutoTokenizer.from_pretrained(model.weights_path)
            return self._tokenizers[key]

    def grammar(self, model: ModelRef, spec: Spec) -> Grammar:
        return self.grammars.compile(str(model.weights_path), self.tokenizer(model), spec)

    def submit(self, model: ModelRef, prompt_ids: list[int], params: SamplingParams, n: int = 1,
               grammar: Grammar | None = None) -> Generation:
        self._note(model)
        gen = Generation(n, on_cancel=self._wake)
        seqs = [_Seq(gen, i, model, list(prompt_ids), params,
                     make_generator(None if params.seed is None else params.seed + i),
                     grammar.start() if grammar else None) for i in range(n)]
        with self._cv:
            if self._closed:
                raise RuntimeError("the inference engine is shut down")
            self._waiting.extend(seqs)
            self._stats["requests"] += 1
            self._stats["constrained"] += grammar is not None
            self._cv.notify()
        return gen

    def score(self, model: ModelRef, token_ids: list[int], top: int = 0) -> asyncio.Future[scoring.Scored]:
        self._note(model)
        loop = asyncio.get_running_loop()
        job = _ScoreJob(model, list(token_ids), top, loop.create_future(), loop)
        with self._cv:
            if self._closed:
                raise RuntimeError("the inference engine is shut down")
            self._scoring.append(job)
            self._cv.notify()
        return job.future

    def forget(self, where: str | Path) -> None:
        with self._cv:
            self._forget.add(str(where))
            self._cv.notify()

    def stats(self) -> dict:
        with self._cv:
            loaded = {k: list(m.adapters) for k, m in self._models.items()}
            adapter_bytes = sum(sum(m.adapter_bytes.values()) for m in self._models.values())
            return dict(self._stats, loaded=loaded, adapter_bytes=adapter_bytes, waiting=len(self._waiting),
                        scoring=len(self._scoring),
                        running=len(self._batch.seqs) if self._batch else 0)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _threads_now(self) -> int:
        shared = self._cores_shared is not None and self._cores_shared()
        return max(1, self.threads // 2) if shared else self.threads

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- scheduler thread -------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        threads = 0
        while True:
            with self._cv:
                while not (self._closed or self._waiting or self._scoring or self._forget
                           or (self._batch and self._batch.seqs)):
                    if not self._cv.wait(timeout=self._sweep_s):
                        self._sweep()
                if self._closed:
                    break
                admitted = self._admit()
                scores = self._take_scores()
            if threads != (want := self._threads_now()):
                torch.set_num_threads(threads := want)
            try:
                self._apply_forget()
                if scores:
                    self._score(scores)
                if admitted:
                    self._prefill(admitted)
                if self._batch and self._batch.seqs:
                    self._step()
            except Exception as exc:  # a failed load or forward fails its requests, not the server
                log.exception("inference step failed")
                failed = (self._batch.seqs if self._batch else []) + admitted
                self._batch = None
                for s in failed:
                    s.gen.put(TokenEvent(s.index, "", -1, error=f"{type(exc).__name__}: {exc}"))
        pending = list(self._waiting) + (self._batch.seqs if self._batch else [])
        for s in pending:
            s.gen.put(TokenEvent(s.index, "", -1, error="the inference engine shut down"))
        for job in self._scoring:
            job.resolve(error=RuntimeError("the inference engine shut down"))

    def _admit(self) -> list[_Seq]:
        """Strict FIFO from the head of the queue, while the request runs on the batch's weights."""
        batch_weights = self._batch.seqs[0].model.weights if self._batch and self._batch.seqs else None
        room = self.max_batch_size - (len(self._batch.seqs) if self._batch else 0)
        out: list[_Seq] = []
        while self._waiting and len(out) < room:
            head = self._waiting[0]
            if head.gen.cancelled:
                self._waiting.popleft()
                self._stats["cancelled"] += head.index == 0  # counted per request
                continue
            weights = batch_weights or head.model.weights
            if head.model.weights != weights:
                break
            batch_weights = weights
            out.append(self._waiting.popleft())
        return out

    def _take_scores(self) -> list[_ScoreJob]:
        """Scoring jobs for one forward (called under the lock): FIFO from the head, same weights,
        until the padded batch would pass `score_tokens` (the first job always goes)."""
        out: list[_ScoreJob] = []
        while self._scoring:
            head = self._scoring[0]
            if head.future.cancelled():
                self._scoring.popleft()
                continue
            width = max([len(head.ids), *(len(j.ids) for j in out)])
            if out and (head.model.weights != out[0].model.weights or width * (len(out) + 1) > self.score_tokens):
                break
            out.append(self._scoring.popleft())
        return out

    def _score(self, jobs: list[_ScoreJob]) -> None:
        try:
            loaded = self._load(jobs[0].model, {j.model.adapter_path for j in jobs if j.model.adapter_path})
            results = loaded.score([str(j.model.adapter_path) if j.model.adapter_path else None for j in jobs],
                                   [j.ids for j in jobs], max(j.top for j in jobs))
        except Exception as exc:  # fails these requests only
            log.exception("scoring on %s failed", jobs[0].model.name)
            for j in jobs:
                j.resolve(error=exc)
            return
        self._stats["scored"] += len(jobs)  # counted before the callers wake up and may read them
        self._stats["score_forwards"] += 1
        self._stats["scored_tokens"] += sum(len(j.ids) for j in jobs)
        for j, r in zip(jobs, results):
            j.resolve(scoring.Scored(r.logprobs, [t[:j.top] for t in r.top] if j.top else []))

    def _sweep(self) -> None:
        """Forget loaded weights and adapters whose files are gone (called under the lock)."""
        self._swept = time.monotonic()
        paths = [p for m in self._models.values() for p in [m.path, *m.adapters]]
        self._forget |= {p for p in paths if not Path(p).exists()}

    def _apply_forget(self) -> None:
        with self._cv:
            if time.monotonic() - self._swept > self._sweep_s:
                self._sweep()
            prefixes, self._forget = self._forget, set()
        if not prefixes:
            return

        def under(path: str | None) -> bool:
            return path is not None and any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)

        def gone(path: str) -> bool:
            return under(path) or under(self._sources.get(path))

        busy = [str(s.model.adapter_path or s.model.weights_path) for s in (self._batch.seqs if self._batch else [])]
        if any(gone(p) for p in busy):  # in flight: its weights are in memory; drop them once it is done
            with self._cv:
                self._forget |= prefixes
            return
        for key, m in list(self._models.items()):
            for path in [a for a in m.adapters if gone(a)]:
                m.detach(path)
                self._stats["adapter_evictions"] += 1
            if gone(m.path):
                del self._models[key]
                self._stats["model_evictions"] += 1
        for path in [t for t in self._tokenizers if gone(t)]:
            del self._tokenizers[path]
        self.grammars.forget(gone)
        with self._cv:
            for path in [p for p in self._sources if gone(p)]:
                del self._sources[path]

    def _load(self, model: ModelRef, adapters: set[Path]) -> LoadedWeights:
        """The weights of `model` (LRU across weights), with `adapters` attached (LRU across adapters)."""
        loaded = self._models.get(model.weights)
        if loaded is None:
            loaded = LoadedWeights(model.weights_path, self.dtype, self.device)
            self._models[model.weights] = loaded
            self._stats["model_loads"] += 1
            busy = self._batch.loaded if self._batch and self._batch.seqs else None
            for key in [k for k, m in self._models.items() if m is not loaded and m is not busy]:
                if len(self._models) <= self.max_models:
                    break
                del self._models[key]
                self._stats["model_evictions"] += 1
        self._models.move_to_end(model.weights)
        in_use = {str(s.model.adapter_path) for s in (self._batch.seqs if self._batch else [])} | {
            str(a) for a in adapters}
        for path in adapters:
            if str(path) not in loaded.adapters:
                loaded.attach(path)
                self._stats["adapter_loads"] += 1
            loaded.adapters.move_to_end(str(path))
        for key in [k for k in loaded.adapters if k not in in_use]:  # least recently used first
            if (len(loaded.adapters) <= self.max_adapters
                    and sum(loaded.adapter_bytes.values()) <= self.adapter_budget):
                break
            loaded.detach(key)
            self._stats["adapter_evictions"] += 1
        return loaded

    def _prefill(self, seqs: list[_Seq]) -> None:
        try:
            loaded = self._load(seqs[0].model, {s.model.adapter_path for s in seqs if s.model.adapter_path})
        except Exception as exc:  # weights that cannot load fail their own requests only
            log.exception("loading %s failed", seqs[0].model.name)
            for s in seqs:
                s.gen.put(TokenEvent(s.index, "", -1, error=f"cannot load {s.model.name}: {exc}"))
            return
        b = self._batch
        if b is None or not b.seqs or b.loaded is not loaded:
            b = self._batch = new_batch(loaded, self.max_batch_size)
        logits = b.add(seqs, [_adapter(s) for s in seqs])
        # Counters move before the tokens are sent: a caller woken by its last token may read them.
        self._stats["max_batch_size"] = max(self._stats["max_batch_size"], len(b.seqs))
        b.last = torch.cat([b.last, self._sample(loaded, seqs, logits)])
        _drop_finished(b)

    def _step(self) -> None:
        b = self._batch
        live = [i for i, s in enumerate(b.seqs) if not s.gen.cancelled]
        if len(live) < len(b.seqs):
            self._stats["cancelled"] += len({id(s.gen) for s in b.seqs if s.gen.cancelled})
            b.keep(live)
            if not live:
                return
        logits = b.step([_adapter(s) for s in b.seqs])
        self._stats["steps"] += 1
        self._stats["max_batch_size"] = max(self._stats["max_batch_size"], len(b.seqs))
        b.last = self._sample(b.loaded, b.seqs, logits)
        _drop_finished(b)

    def _sample(self, loaded: LoadedWeights, seqs: list[_Seq], logits: torch.Tensor) -> torch.Tensor:
        """Pick each row's next token, record it and send its event; returns `[B]` token ids (CPU)."""
        logits = logits.float().cpu()
        params = [s.params for s in seqs]
        constraints = [s.constraint for s in seqs]
        allowed = None
        if any(c is not None for c in constraints):
            allowed = grammars.masks(constraints, logits.shape[-1], loaded.eos, self.grammars.executor)
        tokens = next_tokens(logits, params, [s.generator for s in seqs], [s.prompt for s in seqs],
                             [s.out for s in seqs], allowed)
        k = max((p.logprobs or 0) for p in params)
        want_lp = any(p.logprobs is not None for p in params)
        picked, top_ids, top_lps = top_logprobs(logits, tokens, k) if want_lp else (None, None, None)
        self._stats["tokens"] += len(seqs)
        for i, s in enumerate(seqs):
            lp = top = None
            if s.params.logprobs is not None:
                lp = float(picked[i])
                top = list(zip(top_ids[i, :s.params.logprobs].tolist(), top_lps[i, :s.params.logprobs].tolist()))
            self._advance(loaded, s, int(tokens[i]), lp, top)
        return tokens

    def _advance(self, loaded: LoadedWeights, s: _Seq, token: int, lp: float | None, top) -> None:
        """Append a token, decode, cut at a stop sequence, and send what is safe to show. A
        constrained row ends with `stop` when its grammar is complete (end-of-sequence is only
        allowed then), with `length` when max_tokens cuts the document short."""
        s.out.append(token)
        c = s.constraint
        if c is not None and token not in loaded.eos:
            c.accept(token)
        if c is not None and c.error:  # cannot happen with a sound mask; fail this row alone
            s.finish = "error"
            s.gen.put(TokenEvent(s.index, "", token, error=f"the response_format grammar failed: {c.error}"))
            return
        text = loaded.tokenizer.decode(s.out, skip_special_tokens=True)
        eos = c is None and token in loaded.eos and not s.params.ignore_eos
        complete = c is not None and (token in loaded.eos or c.complete)
        delta, s.emitted, finish = text_step(text, s.emitted, s.params, len(s.out), eos=eos, complete=complete)
        s.finish = finish
        s.gen.put(TokenEvent(s.index, delta, token, lp, top, finish))


def _drop_finished(b: RunningBatch) -> None:
    rows = [i for i, s in enumerate(b.seqs) if s.finish is None]
    if len(rows) < len(b.seqs):
        b.keep(rows)


def _adapter(s: _Seq) -> str | None:
    return str(s.model.adapter_path) if s.model.adapter_path else None
