"""Tiny, hermetic causal LM + real BPE tokenizer for tests, docs and demos.

`build_tiny_model(dest)` writes an ordinary Hugging Face folder (config, safetensors weights,
tokenizer files with a ChatML chat template) that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load. Nothing is downloaded: the byte-level BPE tokenizer is
trained in-process on the small built-in corpus below, and the 2-layer Llama is initialised from a
seed, so the same seed gives the same bytes on every machine.

    python -c "from pathlib import Path; from tunehouse.models.tiny import build_tiny_model; \
print(build_tiny_model(Path('/tmp/tiny')))"
"""

from __future__ import annotations

from pathlib import Path

from tunehouse.atomic import atomic_dir

TINY_MODEL_NAME = "tunehouse/tiny-llama"
VOCAB_SIZE = 768
INIT_RANGE = 0.2

BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# Same ids as SmolLM2 (0, 1, 2); eos ends a turn, pad is distinct from eos on purpose.
SPECIAL_TOKENS = [PAD, BOS, EOS]

# SmolLM2-Instruct's template (ChatML, default system prompt when the first message is not
# "system"), with a shorter default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
You are a helpful assistant. The user asks a question and the assistant gives a short answer.
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.
Hello, how are you today? I am fine, thank you. Can you help me with my homework? Of course I can.
The sun rises in the east and sets in the west. Water boils at one hundred degrees Celsius.
Machine learning models learn patterns from data. Fine-tuning adapts a pretrained model to a task.
Please write a short poem about the sea. The sea is blue, the waves are high, the gulls fly by.
Translate this sentence into French. Summarise the following text in one sentence.
The cat sat on the mat. The dog ran in the park. Birds sing in the morning and owls hunt at night.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. Colours: red, green, blue, yellow, black, white.
system user assistant question answer model data token train learning rate batch step epoch loss
She said that they would come back tomorrow, but nobody knew when they would arrive.
There are seven days in a week and twelve months in a year. Time flies like an arrow.
Good morning! Good night! Thanks a lot. You're welcome. Let's go. It's a nice day, isn't it?
"""


def _train_tokenizer():
    """Byte-level BPE trained on `_CORPUS` (deterministic), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _CORPUS.splitlines() * 4  # repetition only sharpens merge counts; order is fixed
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def _build_model(tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=True,  # as SmolLM2
        # 0.02 (the default) keeps frozen-head logits within ±0.2 of uniform, so a LoRA adapter
        # could barely move the loss; a wider init gives the tiny model a pretrained-like range.
        initializer_range=INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._name_or_path = TINY_MODEL_NAME
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _is_built(dest: Path) -> bool:
    return all((dest / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def build_tiny_model(dest: Path, seed: int = 0) -> Path:
    """Write the tiny model + tokenizer to `dest` (once; an existing build is reused) and return it.

    The folder is written beside `dest` under a temporary name and renamed into place, so a killed
    process never leaves a half-built model that later calls would mistake for a cached one.
    """
    dest = Path(dest)
    if _is_built(dest):
        return dest
    with atomic_dir(dest) as tmp:  # replaces an empty or partial folder left by someone else
        tokenizer = _train_tokenizer()
        model = _build_model(tokenizer, seed)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest


def random_lora_adapter(base_dir: Path, dest: Path, rank: int = 8, seed: int = 0, scale: float = 0.5) -> Path:
    """Write a PEFT LoRA adapter for the model in `base_dir` on all linear layers, with B set to
    random values (PEFT initialises B to zero, which would leave the outputs unchanged), for tests
    and benchmarks of adapter serving."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale / rank)
    peft_model.save_pretrained(dest)
    return Path(dest)
