"""Pure sampling: how the next token is chosen from a batch of logits, and where text stops.

Every function takes a batch (`[B, V]` logits, one row per sequence) and per-row parameters, so
rows with different settings share one call. The order is vLLM's and HF's:

    raw logits ─▶ logit bias (OpenAI) ─▶ allowed-token mask (grammar, `serve/grammar.py`)
               ─▶ repetition penalty (HF) ─▶ presence/frequency penalties (OpenAI)
               ─▶ temperature ─▶ top-k ─▶ top-p ─▶ min-p ─▶ sample (seeded, per row) | argmax (temperature 0)

The mask comes after the bias, so no bias can bring back a token the grammar forbids, and before
the truncations, so top-k/top-p/min-p choose among allowed tokens only. Reported
log-probabilities are those of the raw model distribution (vLLM's default), so they do not depend
on the sampling settings, the bias or the grammar. Stop sequences are matched on the decoded text; the stop text
itself is never returned.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's settings; field names are the OpenAI/Together request names."""

    max_tokens: int = 16
    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 = off."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """HF: a logit of a token already in prompt or output is divided by it (multiplied if < 0)."""
    presence_penalty: float = 0.0
    """OpenAI: subtracted once from each token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI: subtracted per occurrence of each token already generated."""
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    """None = no log-probs; k ≥ 0 = the chosen token's log-prob plus the k most likely alternatives."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks: a fixed number of tokens)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """OpenAI: (token id, bias) pairs added to the raw logits; ±100 bans or forces a token."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def make_generator(seed: int | None) -> torch.Generator:
    """A per-sequence generator: the same seed gives the same draws whatever else is in the batch."""
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63) if seed is None else seed)
    return g


# -- penalties -----------------------------------------------------------------------------------
def token_counts(rows: list[list[int]], vocab_size: int) -> torch.Tensor:
    """`[B, V]` float counts of each token id in each row."""
    counts = torch.zeros(len(rows), vocab_size)
    for i, ids in enumerate(rows):
        if ids:
            counts[i].index_add_(0, torch.tensor(ids), torch.ones(len(ids)))
    return counts


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF semantics: for tokens with `seen > 0`, positive logits are divided by the penalty and
    negative ones multiplied, so a penalty > 1 always makes a seen token less likely.
    `penalty` is `[B]`; 1.0 leaves a row unchanged."""
    p = penalty[:, None]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen > 0, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI semantics over the generated tokens: `logit − count·frequency − [count > 0]·presence`."""
    return logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]


def apply_logit_bias(logits: torch.Tensor, biases: list[tuple[tuple[int, float], ...]]) -> torch.Tensor:
    """Add each row's (token id, bias) pairs to its logits (OpenAI's `logit_bias`)."""
    rows = [i for i, b in enumerate(biases) for _ in b]
    if not rows:
        return logits
    cols = [t for b in biases for t, _ in b]
    values = torch.tensor([v for b in biases for _, v in b], dtype=logits.dtype)
    return logits.index_put((torch.tensor(rows), torch.tensor(cols)), values, accumulate=True)


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """−inf wherever `allowed` (`[B, V]` bool, or None: all) is False."""
    return logits if allowed is None else logits.masked_fill(~allowed, NEG_INF)


# -- truncation ----------------------------------------------------------------------------------
def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; greedy rows (0) are left as they are."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / t[:, None]


def apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (ties at the k-th value are kept); k = 0 keeps all."""
    vocab = logits.shape[-1]
    k = torch.where((k > 0) & (k < vocab), k, torch.full_like(k, vocab))
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (always at
    least the top one); p = 1 keeps all."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly above each token
    drop_sorted = before >= p[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` × the top token's probability."""
    probs = logits.softmax(-1)
    threshold = probs.max(-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, NEG_INF)


# -- one step for a batch ------------------------------------------------------------------------
def _column(params: list[SamplingParams], name: str, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([getattr(p, name) for p in params], dtype=dtype)


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                prompts: list[list[int]] | None = None, outputs: list[list[int]] | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Choose one token per row. `logits` `[B, V]` (float32); `prompts`/`outputs` are each row's
    token ids so far (needed only when a row uses a penalty); `allowed` `[B, V]` bool masks the
    tokens a row's grammar forbids (every row must allow at least one). Returns `[B]` token ids."""
    logits = apply_allowed(apply_logit_bias(logits.float(), [p.logit_bias for p in params]), allowed)
    if any(p.uses_penalties for p in params):
        assert prompts is not None and outputs is not None
        vocab = logits.shape[-1]
        generated = token_counts(outputs, vocab)
        if any(p.repetition_penalty != 1 for p in params):
            seen = generated + token_counts(prompts, vocab)
            logits = apply_repetition_penalty(logits, seen, _column(params, "repetition_penalty"))
        logits = apply_presence_frequency(logits, generated, _column(params, "presence_penalty"),
                                          _column(params, "frequency_penalty"))
    chosen = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return chosen
    rows, ps = logits[sampled], [params[i] for i in sampled]
    rows = apply_temperature(rows, _column(ps, "temperature"))
    if any(p.top_k > 0 for p in ps):
        rows = apply_top_k(rows, _column(ps, "top_k", torch.long))
    if any(p.top_p < 1 for p in ps):
        rows = apply_top_p(rows, _column(ps, "top_p"))
    if any(p.min_p > 0 for p in ps):
        rows = apply_min_p(rows, _column(ps, "min_p"))
    probs = rows.softmax(-1)
    for j, i in enumerate(sampled):
        chosen[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return chosen


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-distribution log-probs: the chosen tokens' `[B]`, and the k most likely ids and their
    log-probs `[B, k]` (k may be 0)."""
    lp = logits.float().log_softmax(-1)
    picked = lp.gather(1, chosen[:, None])[:, 0]
    values, ids = lp.topk(k, dim=-1)
    return picked, ids, values


# -- stop sequences ------------------------------------------------------------------------------
def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index in `text` where the earliest stop sequence begins (searching from `start`), or None."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` might be the beginning of a stop sequence: a stream
    must hold them back until the next token decides."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def text_step(text: str, emitted: int, params: SamplingParams, n_out: int, *, eos: bool = False,
              complete: bool = False) -> tuple[str, int, str | None]:
    """One choice after its newest token: `text` is its whole decoded output, `emitted` the
    characters already sent, `n_out` its tokens. Returns (new text to send, characters now sent,
    finish reason or None). In order: the end-of-sequence token (`eos`), a stop sequence (the text
    is cut where it begins), a complete grammar (`complete`), max_tokens. While unfinished, a
    possible start of a stop sequence and an incomplete character (U+FFFD) are held back."""
    finish = None
    if eos:
        finish = "eos"
    elif params.stop and (cut := find_stop(text, params.stop)) is not None:
        text, finish = text[:cut], "stop"
    elif complete:
        finish = "stop"
    elif n_out >= params.max_tokens:
        finish = "length"
    end = len(text)
    if finish is None:
        end -= max(held_back(text, params.stop), 1 if text.endswith("\ufffd") else 0)
    return text[emitted:end], max(emitted, end), finish
