"""A lean decoding forward for llama-family models (Llama, Mistral, Qwen2: RMSNorm, rotary
positions, grouped-query attention, SwiGLU), over a slot KV cache, with per-row LoRA.

Why not the transformers forward: on a CPU, decoding a small model is bound by weight reads and
Python dispatch, not FLOPs. Per step the transformers path rebuilt a 4-D mask, concatenated every
layer's KV cache to grow it by one column, and ran q/k/v and gate/up as separate matmuls (SmolLM2-
135M, 1 thread, fp32: 10 tokens/s for one request). Here:

- q/k/v share one weight matrix, gate/up another (the transformers modules keep *views* of these,
  so scoring and the LoRA wrappers see the same memory), so a layer is four matmuls;
- the KV cache is preallocated per row slot ([layers, slots, kv heads, T, head dim], grown by
  doubling) and a step writes one column per row in place: rows have their own lengths, so rows
  that joined late need no left padding and no cache is ever copied to extend it;
- decode attention is two batched matmuls over the grouped heads ([B, kv, group, T]: no
  repeat of K/V per query head) under a length mask;
- prompts of newly admitted rows are prefilled together as one packed sequence with a
  block-diagonal causal mask (one forward however many prompts, no padding);
- LoRA adapters are fused the same way: A of q/k/v concatenated, B block-diagonal, so an adapted
  layer adds two small matmuls per fused projection; rows of a batch may use different adapters.

`supports(config)` says which models this runs; others use the transformers forward
(serve/batch.py `PaddedBatch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODEL_TYPES = {"llama", "mistral", "qwen2"}


def supports(config) -> str | None:
    """None if `config` is a model this decoder runs exactly, else why not."""
    kind = getattr(config, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"model_type {kind!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", kind == "mistral"):
        return "sliding-window attention"
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
        return f"rope_type {rope.get('rope_type', rope.get('type'))!r} (depends on the sequence length)"
    return None


@dataclass
class _Layer:  # projection weights stored transposed, [in, out]: see _transposed
    qkv: torch.Tensor  # [hidden, q + 2·kv dims]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # [hidden, 2·intermediate]
    down: torch.Tensor
    norm_in: torch.Tensor
    norm_post: torch.Tensor


def _transposed(linears) -> torch.Tensor:
    """One [in, Σ out] weight for `linears`, each left holding a (transposed) view of its columns,
    so the memory is shared with the transformers modules, which still compute x Wᵀ from it.

    [in, out] because a one-row product x·W streams that layout faster: SmolLM2-135M's 3072×576
    gate/up on this CPU, fp32, one thread: 400 µs in [in, out] against 700 µs in [out, in]."""
    fused = torch.cat([m.weight.data.t() for m in linears], 1).contiguous()
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = fused[:, start:start + rows].t()
        start += rows
    return fused


def _base(module):
    return getattr(module, "base", module)  # a serve/lora.py LoraLinear wraps its base layer


class KVCache:
    """Keys and values of the rows in slots 0..n-1: `k[layer, slot, kv head, position, dim]`;
    `lens[slot]` positions are filled. Slots and positions grow by doubling (up to `slots` and
    `limit`) as rows join and lengthen, so memory follows the batch actually running; an emptied
    cache lets its memory go."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, dtype, device, limit: int):
        self.layers, self.slots, self.kv_heads, self.head_dim = layers, slots, kv_heads, head_dim
        self.dtype, self.device, self.limit = dtype, device, limit
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)
        self.n = 0
        self._alloc(0, 0)

    def _alloc(self, rows: int, length: int) -> None:
        shape = (self.layers, rows, self.kv_heads, length, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def reserve(self, rows: int, length: int) -> None:
        """Room for `rows` slots of `length` positions."""
        if length > self.limit:
            raise ValueError(f"{length} tokens exceed the model's context length ({self.limit})")
        have_rows, have_len = self.k.shape[1], self.k.shape[3]
        if rows <= have_rows and length <= have_len:
            return
        old_k, old_v = self.k, self.v
        self._alloc(have_rows if rows <= have_rows else min(self.slots, max(rows, 2 * have_rows)),
                    have_len if length <= have_len else min(self.limit, max(length, 2 * have_len, 64)))
        self.k[:, :self.n, :, :have_len] = old_k[:, :self.n]
        self.v[:, :self.n, :, :have_len] = old_v[:, :self.n]

    def keep(self, rows: list[int]) -> None:
        """Keep only the slots `rows` (ascending), moved down to 0..len(rows)-1."""
        t = int(self.lens[:self.n].max()) if self.n else 0
        for i, r in enumerate(rows):
            if i != r:
                self.k[:, i, :, :t] = self.k[:, r, :, :t]
                self.v[:, i, :, :t] = self.v[:, r, :, :t]
                self.lens[i] = self.lens[r]
        self.n = len(rows)
        self.lens[self.n:] = 0
        if not rows:
            self._alloc(0, 0)


class LlamaDecoder:
    """Decoding forward over a transformers llama-family model's weights (shared, not copied)."""

    def __init__(self, model):
        cfg = model.config
        self.model = model
        inner = model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.context = getattr(cfg, "max_position_embeddings", 2048)
        self.head = _transposed([model.lm_head])  # tied embeddings become a view of it too
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.rotary = inner.rotary_emb
        self.dtype, self.device = self.head.dtype, self.head.device
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = [_base(a.q_proj), _base(a.k_proj), _base(a.v_proj)]
            bias = torch.cat([p.bias.data for p in qkv]) if qkv[0].bias is not None else None
            o = _base(a.o_proj)
            self.layers.append(_Layer(_transposed(qkv), bias, _transposed([o]), None if o.bias is None else o.bias.data,
                                      _transposed([_base(m.gate_proj), _base(m.up_proj)]),
                                      _transposed([_base(m.down_proj)]),
                                      layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data))
        self.widths = (self.heads * self.head_dim, self.kv_heads * self.head_dim)
        self.adapters: dict[str, list[dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._cos = self._sin = torch.zeros(0)

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str) -> None:
        """Fuse adapter `name` (attached by serve/lora.py to the wrapped projections) per layer."""
        fused = []
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            fused.append({k: ab for k, ab in (("qkv", _fuse_lora([a.q_proj, a.k_proj, a.v_proj], name)),
                                              ("o", _fuse_lora([a.o_proj], name)),
                                              ("gate_up", _fuse_lora([m.gate_proj, m.up_proj], name)),
                                              ("down", _fuse_lora([m.down_proj], name))) if ab is not None})
        self.adapters[name] = fused

    def remove_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)

    def new_cache(self, slots: int) -> KVCache:
        return KVCache(len(self.layers), slots, self.kv_heads, self.head_dim, self.dtype, self.device, self.context)

    # -- forward ----------------------------------------------------------------------------------
    def prefill(self, cache: KVCache, prompts: list[list[int]], slots: list[list[int]],
                routes: list[str | None]) -> torch.Tensor:
        """Run `prompts` (packed into one sequence), write each one's keys/values into its slots
        (a prompt with n choices fills n slots) and return the last position's logits [P, vocab].
        Slots must be the next free ones: `cache.n` grows to cover them."""
        dev = self.device
        lengths = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], device=dev)
        positions = torch.cat([torch.arange(n, device=dev) for n in lengths])
        seg = torch.repeat_interleave(torch.arange(len(prompts), device=dev), torch.tensor(lengths, device=dev))
        mask = None
        if len(prompts) > 1:  # block-diagonal causal: each prompt sees only its own earlier tokens
            mask = (seg[:, None] == seg[None, :]) & (positions[:, None] >= positions[None, :])
        cache.reserve(1 + max(s for row in slots for s in row), max(lengths))
        cache.n = max(cache.n, 1 + max(s for row in slots for s in row))
        rows = _routes([r for r, n in zip(routes, lengths) for _ in range(n)], dev)
        cos, sin = self._rope(positions)
        x = F.embedding(ids, self.embed)
        starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        for i, (layer, lora) in enumerate(zip(self.layers, self._lora_layers(rows))):
            q, k, v = self._qkv(x, layer, lora, rows, cos, sin)
            for p, row_slots in enumerate(slots):
                a, b = starts[p], starts[p + 1]
                for s in row_slots:
                    cache.k[i, s, :, :b - a] = k[a:b].transpose(0, 1)
                    cache.v[i, s, :, :b - a] = v[a:b].transpose(0, 1)
            attn = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                  v.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=self.kv_heads != self.heads)
            x = self._rest(x, attn[0].transpose(0, 1).reshape(len(ids), -1), layer, lora, rows)
        for p, row_slots in enumerate(slots):
            cache.lens[row_slots] = lengths[p]
        last = torch.tensor(starts[1:], device=dev) - 1
        return self._logits(x[last])

    def decode(self, cache: KVCache, tokens: torch.Tensor, routes: list[str | None]) -> torch.Tensor:
        """One step for slots 0..B-1 (B = len(tokens)): append each row's token at its own length
        and return the next-token logits [B, vocab]."""
        b = len(tokens)
        pos = cache.lens[:b].clone()
        t = int(pos.max()) + 1
        cache.reserve(b, t)
        rows = _routes(routes, self.device)
        cos, sin = self._rope(pos)
        slot = torch.arange(b, device=self.device)
        # Position j of row r is visible if j ≤ pos[r]; masked scores get -inf before the softmax.
        hidden = torch.arange(t, device=self.device)[None, :] > pos[:, None]
        bias = torch.zeros(b, 1, 1, t, dtype=torch.float32, device=self.device)
        bias.masked_fill_(hidden[:, None, None], -torch.inf)
        group, scale = self.heads // self.kv_heads, self.head_dim ** -0.5
        x = F.embedding(tokens.to(self.device), self.embed)
        for i, (layer, lora) in enumerate(zip(self.layers, self._lora_layers(rows))):
            q, k, v = self._qkv(x, layer, lora, rows, cos, sin)
            keys, values = cache.k[i], cache.v[i]
            keys[slot, :, pos] = k
            values[slot, :, pos] = v
            q = q.view(b, self.kv_heads, group, self.head_dim)
            scores = torch.matmul(q, keys[:b, :, :t].transpose(-1, -2)).float().mul_(scale).add_(bias)
            probs = torch.softmax(scores, -1).to(self.dtype)
            attn = torch.matmul(probs, values[:b, :, :t]).reshape(b, -1)
            x = self._rest(x, attn, layer, lora, rows)
        cache.lens[:b] = pos + 1
        return self._logits(x)

    # -- pieces -----------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for `positions` ([N, 1, head dim]), from the model's own rotary module (so
        its scaling variant and attention factor apply); the table grows as positions do."""
        need = int(positions.max()) + 1
        if need > len(self._cos):
            n = min(max(need, 2 * len(self._cos), 256), max(need, self.context))
            cos, sin = self.rotary(self.embed[:1].float(), torch.arange(n, device=self.device)[None])
            self._cos, self._sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        return self._cos[positions][:, None], self._sin[positions][:, None]

    def _qkv(self, x, layer: _Layer, lora, rows, cos, sin):
        h = F.rms_norm(x, (x.shape[-1],), layer.norm_in, self.eps)
        qkv = _linear(h, layer.qkv, layer.qkv_bias, lora and lora.get("qkv"), rows)
        n, (wq, wk) = len(x), self.widths
        qk = qkv[:, :wq + wk].view(n, self.heads + self.kv_heads, self.head_dim)
        half = self.head_dim // 2
        rotated = torch.cat([-qk[..., half:], qk[..., :half]], -1)
        qk = qk * cos + rotated * sin
        return (qk[:, :self.heads], qk[:, self.heads:],
                qkv[:, wq + wk:].view(n, self.kv_heads, self.head_dim))

    def _rest(self, x, attn, layer: _Layer, lora, rows):
        x = x + _linear(attn, layer.o, layer.o_bias, lora and lora.get("o"), rows)
        h = F.rms_norm(x, (x.shape[-1],), layer.norm_post, self.eps)
        gate, up = _linear(h, layer.gate_up, None, lora and lora.get("gate_up"), rows).chunk(2, -1)
        return x + _linear(F.silu(gate) * up, layer.down, None, lora and lora.get("down"), rows)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.norm, self.eps) @ self.head

    def _lora_layers(self, rows):
        """Per layer: None (no adapter rows), or {name: that layer's fused pairs} for the routes."""
        if rows is None:
            return [None] * len(self.layers)
        names = [rows] if isinstance(rows, str) else [n for n, _ in rows]
        known = [n for n in names if n in self.adapters]
        if not known:
            return [None] * len(self.layers)
        return [{part: {n: self.adapters[n][i][part] for n in known if part in self.adapters[n][i]}
                 for part in ("qkv", "o", "gate_up", "down")} for i in range(len(self.layers))]


def _routes(routes: list[str | None], device):
    """The rows' adapters as one name (every row), None (no row), or [(name, row indices)]."""
    if len(set(routes)) == 1:
        return routes[0]
    by: dict[str, list[int]] = {}
    for i, r in enumerate(routes):
        if r is not None:
            by.setdefault(r, []).append(i)
    return [(n, torch.tensor(r, device=device)) for n, r in by.items()]


def _linear(x, weight, bias, pairs, rows):
    """x W (+ b) for a transposed weight [in, out], plus each routed adapter's (x A)(s B) on its rows."""
    out = x @ weight if bias is None else torch.addmm(bias, x, weight)
    if not pairs:
        return out
    if isinstance(rows, str):
        a, b = pairs[rows] if rows in pairs else (None, None)
        if a is None:
            return out
        if a.dtype == x.dtype:
            return out.addmm_(x @ a, b)
        return out.add_(((x.to(a.dtype) @ a) @ b).to(out.dtype))
    for name, idx in rows:
        if name in pairs:
            a, b = pairs[name]
            out.index_add_(0, idx, ((x[idx].to(a.dtype) @ a) @ b).to(out.dtype))
    return out


def _fuse_lora(modules, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Adapter `name` of the projections `modules` (serve/lora.py LoraLinear or plain) as one
    (A [in, Σr], B [Σr, Σ out]) pair: A's side by side, B block-diagonal (zero where a projection
    has no adapter). None when none of them has it.

    fp32 whatever the base's dtype: a bf16 base then adds an fp32-computed delta (no bf16 rounding
    inside the small product), and oneDNN's bf16 matmuls of rank-8 shapes cost more than MKL's
    fp32 ones (SmolLM2, 16 rows, one adapter: 99 vs 122 ms of CPU per step, base 94-105)."""
    pairs = [getattr(m, "adapters", {}).get(name) for m in modules]
    if all(p is None for p in pairs):
        return None
    outs = [_base(m).weight.shape[0] for m in modules]  # [out, in] views
    ranks = [0 if p is None else p[0].shape[1] for p in pairs]
    ref = next(p for p in pairs if p is not None)[0]
    a = torch.cat([p[0] for p in pairs if p is not None], 1)
    b = ref.new_zeros(sum(ranks), sum(outs))
    r0 = c0 = 0
    for p, r, o in zip(pairs, ranks, outs):
        if p is not None:
            b[r0:r0 + r, c0:c0 + o] = p[1]
        r0, c0 = r0 + r, c0 + o
    return a.float(), b.float()
