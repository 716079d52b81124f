"""GGUF export (`checkpoint=gguf`, `tunehouse ft download --gguf`): one LoRA job on the tiny llama,
trained by the embedded worker of a live server; its GGUF downloads loaded back by transformers
(`gguf_file=`) and compared with the merged safetensors model the plain download gives.

Tolerances on next-token logits (the tiny model's logits span about ±5; its 0.2 init range makes
rounding errors larger than a pretrained model's): f16 0.02, bf16 0.15, q8_0 0.6, and the same
argmax for f16. Measured on 2026-11-30 over 3 chats: transformers f16 0.006, bf16 0.071, q8_0 0.32.
llama.cpp (the llama-server `make llama-server` builds; next-token log-probs of its 20 most likely
tokens): f16 0.0076, q8_0 0.118 (it also rounds activations to 8 bits), base f16 + LoRA GGUF
adapter 0.0099; f32 (model, and base + f32 adapter) 0.0000 with an f32 KV cache and flash attention
off (0.0066 with it on: it rounds through f16 on a CPU; 0.004 with llama.cpp's default f16 KV).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import torch
from together import Together

from conftest import ROOT, _serve, bin_path
from jobs_support import untar_zst, wait_for, write_chat
from train_fixtures import tiny_model_dir, tiny_tokenizer  # noqa: F401  (fixtures)
from tunehouse.errors import InvalidInput
from tunehouse.export.bundle import write_bundle
from tunehouse.export.gguf import adapter_type, permute_qk, pre_tokenizer_name, write_model
from tunehouse.export.modelfile import CHATML_TEMPLATE, default_system, modelfile
from tunehouse.settings import Settings

TINY = "tunehouse/tiny-llama"
LORA_R, LORA_ALPHA = 8, 16
TOLERANCE = {"f32": 1e-4, "f16": 0.02, "bf16": 0.15, "q8_0": 0.6}
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Say red then blue."}, {"role": "assistant", "content": "red blue"},
     {"role": "user", "content": "Say sun then moon."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a bird."}],
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model_cache):
    """(live server, the completed LoRA job, its merged model folder, its adapter folder)."""
    tmp = tmp_path_factory.mktemp("gguf")
    live, bg = _serve(Settings(home=tmp / "home", model_cache=model_cache, embedded_worker=True))
    c = Together(base_url=live.url, api_key=live.key, max_retries=0)
    train = c.files.upload(write_chat(tmp / "train.jsonl", 16))
    job = c.fine_tuning.create(training_file=train.id, model=TINY, lora=True, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                               suffix="gguf", n_epochs=2, batch_size=4, learning_rate=3e-3)
    done = wait_for(c, job.id)
    assert done.status == "completed", [e.message for e in c.fine_tuning.list_events(job.id).data]
    folders = {}
    for kind in ("merged", "adapter"):
        got = _get(live, job.id, checkpoint=kind)
        untar_zst(got.content, tmp / kind)
        folders[kind] = tmp / kind / kind
    yield live, done, folders["merged"], folders["adapter"]
    bg.stop()


def _get(live, job_id: str, headers: dict | None = None, **params) -> httpx.Response:
    return httpx.get(f"{live.url}/v1/finetune/download", params={"ft_id": job_id, **params},
                     headers={"Authorization": f"Bearer {live.key}", **(headers or {})}, timeout=120)


def _next_token_logits(model, tokenizer) -> torch.Tensor:
    rows = []
    for chat in CHATS:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            rows.append(model(ids["input_ids"]).logits[0, -1])
    return torch.stack(rows)


def _compare(merged: Path, folder: Path, gguf_file: str, same_argmax: bool = False) -> float:
    """Max |logit difference| at the next token over CHATS (near-ties in the random tiny model can
    flip the argmax under bf16/q8_0 rounding, so only f16 asserts it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    ref = _next_token_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tokenizer)
    got = _next_token_logits(AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32),
                             tokenizer)
    assert not same_argmax or torch.equal(got.argmax(-1), ref.argmax(-1))
    print(f"{gguf_file}: max |logit diff| {(got - ref).abs().max().item():.4f} (logits up to {ref.abs().max():.2f})")
    return (got - ref).abs().max().item()


def test_cli_download_gguf_folder_runs_in_transformers(finished, tmp_path):
    """End to end: `ft download --gguf` → an unpacked folder with the f16 model, the LoRA adapter
    and the Modelfile; the model gives the merged model's next-token logits, and its tokenizer
    encodes a chat as the original does."""
    from transformers import AutoTokenizer

    live, job, merged, _ = finished
    env = dict(os.environ, TUNEHOUSE_BASE_URL=live.url, TUNEHOUSE_API_KEY=live.key, COLUMNS="200", NO_COLOR="1")
    out = subprocess.run([bin_path("tunehouse"), "ft", "download", job.id, "--gguf", "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "out" / f"{job.model_output_name.replace('/', '--')}-f16"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [folder.name]  # the tar is gone
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "adapter-f16.gguf", "model-f16.gguf"]
    assert f"ollama create {folder.name.lower()} -f {folder / 'Modelfile'}" in out.stdout
    assert _compare(merged, folder, "model-f16.gguf", same_argmax=True) < TOLERANCE["f16"]

    original = AutoTokenizer.from_pretrained(merged)
    loaded = AutoTokenizer.from_pretrained(folder, gguf_file="model-f16.gguf")
    for chat in CHATS:
        text = original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
        assert loaded(text)["input_ids"] == original(text)["input_ids"]

    modelfile_text = (folder / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf\n" in modelfile_text
    assert 'PARAMETER stop "<|im_end|>"' in modelfile_text and 'PARAMETER stop "<|im_start|>"' in modelfile_text
    assert 'SYSTEM """You are a helpful assistant."""' in modelfile_text
    assert "{{ .System }}" in modelfile_text and "{{ .Content }}" in modelfile_text


@pytest.mark.parametrize("kind", ["q8_0", "bf16", "f32"])
def test_api_gguf_types_are_cached_and_served_with_ranges(finished, tmp_path, kind):
    live, job, merged, _ = finished
    probe = _get(live, job.id, {"Range": "bytes=0-1"}, checkpoint="gguf", gguf_type=kind)
    assert probe.status_code == 206, probe.text
    total = int(probe.headers["content-range"].rsplit("/", 1)[1])
    name = f"{job.model_output_name.replace('/', '--')}-{kind}"
    assert probe.headers["content-disposition"] == f'attachment; filename="{name}.tar"'
    body = _get(live, job.id, checkpoint="gguf", gguf_type=kind).content
    assert len(body) == total
    assert _get(live, job.id, {"Range": "bytes=100-"}, checkpoint="gguf", gguf_type=kind).content == body[100:]
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        tar.extractall(tmp_path, filter="data")
    adapter = f"adapter-{adapter_type(kind)}.gguf"
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["Modelfile", adapter, f"model-{kind}.gguf"]
    reader = gguf.GGUFReader(tmp_path / name / f"model-{kind}.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper() and types["output_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert _compare(merged, tmp_path / name, f"model-{kind}.gguf") < TOLERANCE[kind]


def test_metadata_is_what_llama_cpp_reads(finished, tmp_path):
    live, job, merged, _ = finished
    with tarfile.open(fileobj=io.BytesIO(_get(live, job.id, checkpoint="gguf").content)) as tar:
        tar.extractall(tmp_path, filter="data")
    (path,) = tmp_path.glob("*/model-f16.gguf")
    fields = gguf.GGUFReader(path).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    config = json.loads((merged / "config.json").read_text())
    assert value("general.architecture") == "llama" and value("general.file_type") == 1
    assert (value("llama.context_length"), value("llama.embedding_length"), value("llama.block_count"),
            value("llama.feed_forward_length"), value("llama.attention.head_count"),
            value("llama.attention.head_count_kv"), value("llama.vocab_size")) == (
        2048, 64, 2, 128, 4, 2, config["vocab_size"])
    assert value("llama.rope.freq_base") == 10000.0 and value("llama.attention.layer_norm_rms_epsilon") == \
        pytest.approx(1e-6)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert len(value("tokenizer.ggml.tokens")) == config["vocab_size"] and value("tokenizer.ggml.merges")
    assert value("tokenizer.ggml.token_type")[:3] == [3, 3, 3]  # the special tokens are CONTROL
    assert (value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id"),
            value("tokenizer.ggml.padding_token_id"), value("tokenizer.ggml.add_bos_token")) == (1, 2, 0, False)
    assert "<|im_start|>" in value("tokenizer.chat_template")


def test_lora_adapter_gguf_has_llama_cpp_tensors_and_alpha(finished, tiny_model_dir, tmp_path):  # noqa: F811
    """Every adapted weight has `.lora_a` (r × in) and `.lora_b` (out × r), and base + alpha/r·B·A
    equals the merged weight in llama.cpp's row order (B's rows permuted like the base's)."""
    from safetensors.torch import load_file

    live, job, merged, adapter = finished
    with tarfile.open(fileobj=io.BytesIO(_get(live, job.id, checkpoint="gguf").content)) as tar:
        tar.extractall(tmp_path, filter="data")
    (path,) = tmp_path.glob("*/adapter-f16.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == LORA_ALPHA
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    modules = {"attn_q": (64, 64), "attn_k": (64, 32), "attn_v": (64, 32), "attn_output": (64, 64),
               "ffn_gate": (64, 128), "ffn_up": (64, 128), "ffn_down": (128, 64)}  # (in, out)
    assert sorted(tensors) == sorted(f"blk.{i}.{m}.weight.lora_{ab}" for i in range(2) for m in modules
                                     for ab in "ab")
    for i in range(2):
        for m, (n_in, n_out) in modules.items():
            assert tensors[f"blk.{i}.{m}.weight.lora_a"].shape == (LORA_R, n_in)
            assert tensors[f"blk.{i}.{m}.weight.lora_b"].shape == (n_out, LORA_R)
    base, merged_w = load_file(tiny_model_dir / "model.safetensors"), load_file(merged / "model.safetensors")
    for m, hf, n_head in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)):
        a, b = tensors[f"blk.1.{m}.weight.lora_a"], tensors[f"blk.1.{m}.weight.lora_b"]
        key = f"model.layers.1.self_attn.{hf}.weight"
        rebuilt = permute_qk(base[key].numpy(), n_head) + LORA_ALPHA / LORA_R * b @ a
        np.testing.assert_allclose(rebuilt, permute_qk(merged_w[key].numpy(), n_head), atol=2e-3)


def test_refusals_say_what_to_change(finished, tmp_path):
    live, job, merged, _ = finished
    bad = _get(live, job.id, checkpoint="gguf", gguf_type="q4_k")
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "gguf_type must be one of f32, f16, bf16, q8_0; got 'q4_k'."
    assert _get(live, job.id, checkpoint="gguf", checkpoint_step=1).json()["error"]["param"] == "checkpoint_step"
    assert _get(live, job.id, gguf_type="q8_0").json()["error"]["message"] == "gguf_type goes with checkpoint=gguf."

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(InvalidInput, match=r"this model is 'gpt2' \(GPT2LMHeadModel\)"):
        write_bundle(other, None, tmp_path, "f16")
    assert not list(tmp_path.glob("*.gguf"))


def test_modelfile_for_other_templates_leaves_the_template_to_ollama():
    text = modelfile("model-q8_0.gguf", "{{ bos_token }}[INST] {{ messages }} [/INST]", "</s>")
    assert text.splitlines()[1:] == [
        "FROM ./model-q8_0.gguf",
        "# Not a ChatML template: Ollama takes the chat template from the GGUF's metadata.",
        'PARAMETER stop "</s>"',
    ]


def test_pre_tokenizer_names_and_refusal():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"  # SmolLM2 as published on the hub
    with pytest.raises(InvalidInput, match="knows the GPT-2 and SmolLM byte-level pre-tokenizers"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


GO = shutil.which("go") or next(iter(Path("/usr/lib").glob("go-1.*/bin/go")), None)
# Ollama fills a TEMPLATE with .System (the chat's system messages, else the Modelfile's SYSTEM) and .Messages.
RENDER_GO = """package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role string `json:"role"`; Content string `json:"content"` }
type Data struct { System string; Messages []Message }
func main() {
    var d Data
    json.Unmarshal([]byte(os.Args[2]), &d)
    template.Must(template.New("m").Parse(os.Args[1])).Execute(os.Stdout, d)
}
"""


@pytest.mark.skipif(GO is None, reason="no Go toolchain (Debian: golang-1.19-go) to render Ollama's template")
def test_ollama_template_renders_as_the_jinja_template(tiny_tokenizer, tmp_path):  # noqa: F811
    (tmp_path / "render.go").write_text(RENDER_GO)
    env = {"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "cache"), "GO111MODULE": "off", "PATH": os.environ["PATH"]}
    subprocess.run([str(GO), "build", "-o", "render", "render.go"], cwd=tmp_path, env=env, check=True, timeout=120)
    default = default_system(tiny_tokenizer.chat_template)
    for chat in CHATS + [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}]]:
        system = "\n\n".join(m["content"] for m in chat if m["role"] == "system") or default
        data = {"System": system, "Messages": [{"role": "system", "content": system}] + chat}
        go = subprocess.run([str(tmp_path / "render"), CHATML_TEMPLATE, json.dumps(data)], capture_output=True,
                            text=True, check=True)
        assert go.stdout == tiny_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def _llama_server_next_token(binary, model: Path, lora: Path | None, kind: str, ids: list[list[int]], texts: list[str]):
    """Through llama-server (the binary `make llama-server` builds): for each prompt, the 20 most
    likely next tokens' log-probs {id: log-prob} (n_probs: the raw distribution), and how it
    tokenizes each text (special tokens parsed)."""
    from tunehouse.serve.llama_server import LlamaServer

    with LlamaServer(binary, model, threads=1, slots=1, ctx=256, loras=[lora] if lora else [],
                     cache_type="f32" if kind == "f32" else None, flash_attn="off" if kind == "f32" else "auto",
                     prompt_cache=False) as srv:
        rows, tokens = [], []
        for prompt in ids:
            r = httpx.post(f"{srv.url}/completion", timeout=60, json={
                "prompt": prompt, "n_predict": 1, "n_probs": 20, "temperature": 0, "cache_prompt": False,
                "lora": srv.lora_scales(0 if lora else None)}).json()
            rows.append({t["id"]: t["logprob"] for t in r["completion_probabilities"][0]["top_logprobs"]})
        for text in texts:
            r = httpx.post(f"{srv.url}/tokenize", timeout=60, json={"content": text, "add_special": False,
                                                                   "parse_special": True}).json()
            tokens.append(r["tokens"])
    return rows, tokens


def test_llama_cpp_loads_the_exports(finished, tiny_model_dir, tmp_path, llama_server):  # noqa: F811
    """llama.cpp itself: the f16, q8_0 and f32 models, and base + the LoRA GGUF adapter, give the merged
    model's next-token log-probs (its 20 most likely tokens; tolerances as for the logits, doubled:
    a log-prob carries the error of its logit and of the normaliser) and tokenize chats as HF does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    live, job, merged, _ = finished
    for kind in ("f16", "q8_0", "f32"):
        with tarfile.open(fileobj=io.BytesIO(_get(live, job.id, checkpoint="gguf", gguf_type=kind).content)) as tar:
            tar.extractall(tmp_path, filter="data")
    (f16,), (q8,), (f32,), (adapter,), (adapter32,) = (list(tmp_path.glob(n)) for n in (
        "*/model-f16.gguf", "*/model-q8_0.gguf", "*/model-f32.gguf", "*-f16/adapter-f16.gguf", "*-f32/adapter-f32.gguf"))
    base = write_model(tiny_model_dir, tmp_path / "base-f16.gguf", "f16")
    base32 = write_model(tiny_model_dir, tmp_path / "base-f32.gguf", "f32")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    ref = _next_token_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tokenizer)
    ref = ref.log_softmax(-1)
    cases = [(f16, None, "f16"), (q8, None, "q8_0"), (base, adapter, "f16"), (f32, None, "f32"), (base32, adapter32, "f32")]
    for model, lora, kind in cases:
        rows, tokens = _llama_server_next_token(llama_server, model, lora, kind, ids, texts)
        diff = max(abs(lp - ref[i, t].item()) for i, row in enumerate(rows) for t, lp in row.items())
        print(f"llama.cpp {model.name}{' + ' + lora.name if lora else ''}: max |log-prob diff| {diff:.4f}")
        assert diff < 2 * TOLERANCE[kind] and tokens == ids
        if kind in ("f16", "f32"):  # the same most likely token
            assert [max(row, key=row.get) for row in rows] == ref.argmax(-1).tolist()
