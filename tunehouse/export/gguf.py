"""A llama-family Hugging Face folder as a GGUF file llama.cpp loads, and a PEFT LoRA adapter as a
GGUF adapter (`llama-cli -m base.gguf --lora adapter.gguf`).

    write_model(merged_dir, "model-q8_0.gguf", "q8_0", progress)
    write_adapter(adapter_dir, config, "adapter-f16.gguf", "f16")

The layout is the one llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py write: llama.*
hyperparameters, the byte-level BPE vocabulary as tokenizer.ggml.* (model "gpt2"), 1-D tensors
kept F32, and the Q/K rows of every head reordered from HF's rotary layout (two halves) to
llama.cpp's (interleaved pairs). Tensors are converted and written one at a time, so memory holds
one tensor, not the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from tunehouse.errors import InvalidInput

Q = gguf.GGMLQuantizationType
# --gguf-type → (2-D tensor type, general.file_type). f32 keeps fp32 weights exact (bench/serve.py
# runs llama.cpp on it to compare fp32 with fp32).
GGUF_TYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
              "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
              "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
              "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# config.json model_type → llama.cpp architecture (the llama graph; others need their own tensors).
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}
_NATIVE = {Q.F32: np.float32, Q.F16: np.float16}  # written as numpy arrays; others as packed bytes


def check_type(gguf_type: str | None) -> str:
    kind = (gguf_type or "f16").lower()
    if kind not in GGUF_TYPES:
        raise InvalidInput(f"gguf_type must be one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}.", param="gguf_type")
    return kind


def adapter_type(gguf_type: str) -> str:
    """The adapter's type beside a model of `gguf_type`: its own for f32/bf16; F16 for f16/q8_0, as
    lora_b's rows are r values long, too short for Q8_0 blocks."""
    return gguf_type if gguf_type in ("f32", "bf16") else "f16"


def check_architecture(config: dict) -> gguf.MODEL_ARCH:
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise InvalidInput(f"GGUF export supports the {', '.join(ARCHITECTURES)} architecture; this model is "
                           f"{kind!r} ({', '.join(config.get('architectures') or [])}). Download checkpoint=merged "
                           "and convert it with llama.cpp's convert_hf_to_gguf.py.", param="checkpoint",
                           code="gguf_unsupported_architecture")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise InvalidInput(f"GGUF export does not write rope scaling {rope.get('rope_type')!r} yet.",
                           param="checkpoint", code="gguf_unsupported_architecture")
    return ARCHITECTURES[kind]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary dimensions as two halves [x0..x(d/2-1), y0..]; llama.cpp's rope
    pairs neighbours (x0, y0, x1, y1, …). Rows (dim 0) are reordered per head; works for 1-D biases."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(shape: tuple[int, ...], wanted: Q) -> Q:
    """Norms and biases stay F32; a row Q8_0's 32-value blocks do not divide falls back to F16
    (both as llama.cpp's converter does)."""
    if len(shape) == 1:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for how this byte-level BPE splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if shape == [("ByteLevel", None, True)]:
        return "gpt-2"
    if shape == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"  # GPT-2's split after every digit on its own
    raise InvalidInput(f"GGUF export knows the GPT-2 and SmolLM byte-level pre-tokenizers; this tokenizer's is "
                       f"{json.dumps(pre)[:200]}.", param="checkpoint", code="gguf_unsupported_tokenizer")


def _hyperparameters(w: gguf.GGUFWriter, c: dict) -> None:
    n_head = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // n_head
    rope_theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(c.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(float(rope_theta))
    w.add_rope_dimension_count(head_dim)
    if head_dim * n_head != c["hidden_size"]:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(c["vocab_size"])


def _tokenizer(w: gguf.GGUFWriter, folder: Path, n_vocab: int) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    if tj["model"]["type"] != "BPE":
        raise InvalidInput(f"GGUF export writes byte-level BPE tokenizers; this one is {tj['model']['type']}.",
                           param="checkpoint", code="gguf_unsupported_tokenizer")
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(n_vocab):  # a config vocab padded past the tokenizer gets unused placeholders
        tok = added.get(i, {}).get("content") or by_id.get(i)
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        types.append(T.UNUSED if tok is None else T.NORMAL if i not in added
                     else T.CONTROL if added[i].get("special") else T.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tj))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab,
                                special_token_types=("bos", "eos", "unk", "pad"))
    # llama.cpp adds BOS to BPE vocabularies unless told otherwise; say what the HF tokenizer does.
    special.add_special_token = {"bos": _adds_bos(tj), "eos": False}
    special.add_to_gguf(w, quiet=True)


def _adds_bos(tokenizer_json: dict) -> bool:
    post = tokenizer_json.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    single = next((s.get("single") for s in steps if s.get("type") == "TemplateProcessing"), None) or []
    return bool(single) and "SpecialToken" in single[0]


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidInput(f"No safetensors weights in {folder.name}.", param="checkpoint")
    return files


def write_model(folder: Path, dest: Path, gguf_type: str = "f16", name: str = "",
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the model in `folder` (config.json, *.safetensors, tokenizer.json) as one GGUF at `dest`.
    `progress(done, total)` is called after each tensor."""
    from safetensors import safe_open

    folder, dest = Path(folder), Path(dest)
    config = json.loads((folder / "config.json").read_text())
    arch = check_architecture(config)
    wanted, file_type = GGUF_TYPES[check_type(gguf_type)]
    n_head, n_layer = config["num_attention_heads"], config["num_hidden_layers"]
    n_kv = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(arch, n_layer)

    # Plan: GGUF name, source tensor, type. Tied embeddings: llama.cpp reuses token_embd, no output.
    plan = []
    for file in _weight_files(folder):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.get("tie_word_embeddings")):
                    continue
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise InvalidInput(f"GGUF export has no llama.cpp name for tensor {key!r}.", param="checkpoint")
                shape = tuple(f.get_slice(key).get_shape())
                plan.append((target, file, key, shape, tensor_type(shape, wanted)))

    w = gguf.GGUFWriter(dest, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name or folder.name)
    _hyperparameters(w, config)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(w, folder, config["vocab_size"])
    for target, _, _, shape, qtype in plan:
        dtype = _NATIVE.get(qtype, np.uint8)
        stored = shape if qtype in _NATIVE else gguf.quant_shape_to_byte_shape(shape, qtype)
        w.add_tensor_info(target, stored, np.dtype(dtype), math.prod(stored) * np.dtype(dtype).itemsize,
                          raw_dtype=None if qtype in _NATIVE else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for done, (target, file, key, shape, qtype) in enumerate(plan, 1):
        with safe_open(file, "pt") as f:  # "pt": bf16 weights have no numpy dtype
            data = f.get_tensor(key).float().numpy()
        if ".attn_q." in target:
            data = permute_qk(data, n_head)
        elif ".attn_k." in target:
            data = permute_qk(data, n_kv)
        w.write_tensor_data(gguf.quants.quantize(data, qtype))
        if progress:
            progress(done, len(plan))
    w.close()
    return dest


def write_adapter(adapter_dir: Path, config: dict, dest: Path, gguf_type: str = "f16", name: str = "") -> Path:
    """Write the PEFT LoRA adapter in `adapter_dir` (for a base model with `config`) as a GGUF
    adapter: general.type=adapter, adapter.type=lora, adapter.lora.alpha, and per adapted weight
    `<llama.cpp weight name>.lora_a` (r × in) and `.lora_b` (out × r), typed by `adapter_type`."""
    from safetensors import safe_open

    adapter_dir, dest = Path(adapter_dir), Path(dest)
    lora = json.loads((adapter_dir / "adapter_config.json").read_text())
    if lora.get("rank_pattern") or lora.get("alpha_pattern"):
        raise InvalidInput("GGUF adapters carry one rank and alpha; this adapter has per-module patterns.",
                           param="checkpoint")
    arch = check_architecture(config)
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    qtype = GGUF_TYPES[adapter_type(check_type(gguf_type))][0]
    # llama.cpp scales by alpha / r; rsLoRA scales by alpha / sqrt(r), i.e. an alpha of alpha·sqrt(r).
    alpha = lora["lora_alpha"] * (math.sqrt(lora["r"]) if lora.get("use_rslora") else 1.0)

    w = gguf.GGUFWriter(dest, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name or adapter_dir.name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        for key in sorted(f.keys()):  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
            base, ab = key.removeprefix("base_model.model."), "a" if ".lora_A." in key else "b"
            target = names.get_name(base.replace(f".lora_{ab.upper()}", ""), try_suffixes=(".weight",))
            if target is None or ".lora_" not in key:
                raise InvalidInput(f"GGUF adapters hold LoRA A/B matrices of llama weights; {key!r} is neither.",
                                   param="checkpoint")
            data = f.get_tensor(key).float().numpy()
            if ab == "b" and ".attn_q." in target:  # B produces the rows the base weight's permute reorders
                data = permute_qk(data, n_head)
            elif ab == "b" and ".attn_k." in target:
                data = permute_qk(data, n_kv)
            w.add_tensor(f"{target}.lora_{ab}", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest
