"""Loss masks of data/tokenize.py against hand-built expectations on the tiny ChatML tokenizer."""

from __future__ import annotations

import copy

import pytest
from train_fixtures import tiny_model_dir, tiny_tokenizer  # noqa: F401  (fixtures)

from tunehouse.data.tokenize import (
    IGNORE,
    detect_format,
    pad_token_id,
    resolve_train_on_inputs,
    tokenize_row,
)

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
CHAT = [{"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How are you?"},
        {"role": "user", "content": "Fine, thanks."},
        {"role": "assistant", "content": "Good to hear."}]


def expected(tok, pieces):
    """ids and labels from (text, trained) pieces, each encoded alone."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def run(tok, row, train_on_inputs="auto", max_seq_length=512):
    return tokenize_row(row, tok, train_on_inputs=train_on_inputs, max_seq_length=max_seq_length)


def test_conversation_trains_assistant_content_and_eos_only(tiny_tokenizer):
    tok = tiny_tokenizer
    got = run(tok, {"messages": CHAT}, train_on_inputs=False)
    ids, labels = expected(tok, [
        (SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello! How are you?<|im_end|>", True), ("\n", False),
        ("<|im_start|>user\nFine, thanks.<|im_end|>\n<|im_start|>assistant\n", False),
        ("Good to hear.<|im_end|>", True), ("\n", False)])
    assert got.input_ids == ids
    assert got.labels == labels
    # built piece by piece, yet identical to encoding the whole rendered conversation
    whole = tok.apply_chat_template(CHAT, tokenize=False)
    assert got.input_ids == tok(whole, add_special_tokens=False)["input_ids"]
    assert got.num_tokens == len(ids)
    assert got.num_trained_tokens == sum(label != IGNORE for label in labels)
    assert not got.truncated


def test_every_assistant_eos_is_trained_and_header_is_not(tiny_tokenizer):
    tok = tiny_tokenizer
    got = run(tok, {"messages": CHAT}, train_on_inputs=False)
    eos = tok.eos_token_id
    eos_at = [i for i, t in enumerate(got.input_ids) if t == eos]
    trained_eos = [i for i in eos_at if got.labels[i] == eos]
    assert len(eos_at) == 5 and len(trained_eos) == 2  # system, 2 user, 2 assistant turns
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for i in range(len(got.input_ids) - len(header)):
        if got.input_ids[i:i + len(header)] == header:
            assert got.labels[i:i + len(header)] == [IGNORE] * len(header)


def test_weight_zero_excludes_that_assistant_message(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = copy.deepcopy(CHAT)
    messages[1]["weight"] = 0
    got = run(tok, {"messages": messages}, train_on_inputs=False)
    ids, labels = expected(tok, [
        (SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
         "Hello! How are you?<|im_end|>\n"
         "<|im_start|>user\nFine, thanks.<|im_end|>\n<|im_start|>assistant\n", False),
        ("Good to hear.<|im_end|>", True), ("\n", False)])
    assert (got.input_ids, got.labels) == (ids, labels)


def test_train_on_inputs_true_trains_everything_and_auto_is_false_for_chat(tiny_tokenizer):
    tok = tiny_tokenizer
    everything = run(tok, {"messages": CHAT}, train_on_inputs=True)
    assert everything.labels == everything.input_ids
    assert run(tok, {"messages": CHAT}, "auto") == run(tok, {"messages": CHAT}, False)
    assert resolve_train_on_inputs("auto", "conversation") is False
    assert resolve_train_on_inputs("auto", "instruction") is False
    assert resolve_train_on_inputs("auto", "text") is True
    assert resolve_train_on_inputs(True, "conversation") is True


def test_instruction_uses_the_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    got = run(tok, {"prompt": "What is two plus two?", "completion": "Four."})
    ids, labels = expected(tok, [
        (SYSTEM + "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
         False), ("Four.<|im_end|>", True), ("\n", False)])
    assert (got.input_ids, got.labels) == (ids, labels)


def test_instruction_without_template_is_prompt_completion_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    got = run(tok, {"prompt": "Two plus two is", "completion": " four."})
    ids, labels = expected(tok, [("Two plus two is", False), (" four.", True)])
    assert got.input_ids == ids + [tok.eos_token_id]
    assert got.labels == labels + [tok.eos_token_id]


def test_text_is_all_trained_plus_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    got = run(tok, {"text": "The cat sat on the mat."})
    ids = tok("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    assert got.input_ids == ids + [tok.eos_token_id]
    assert got.labels == got.input_ids
    assert got.num_trained_tokens == len(ids)  # token 0 has no context: never a target


def test_pretokenized_rows_keep_their_labels(tiny_tokenizer):
    row = {"input_ids": [5, 6, 7, 8, 0], "labels": [-100, -100, 7, 8, -100],
           "attention_mask": [1, 1, 1, 1, 0]}
    got = run(tiny_tokenizer, row)
    assert detect_format(row) == "tokenized"
    assert (got.input_ids, got.labels) == ([5, 6, 7, 8], [-100, -100, 7, 8])
    unlabelled = run(tiny_tokenizer, {"input_ids": [5, 6, 7]})
    assert unlabelled.labels == [5, 6, 7]


def test_truncation_keeps_the_first_tokens(tiny_tokenizer):
    full = run(tiny_tokenizer, {"messages": CHAT}, train_on_inputs=False)
    cut = run(tiny_tokenizer, {"messages": CHAT}, train_on_inputs=False, max_seq_length=20)
    assert cut.truncated and cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]


def test_no_doubled_bos_when_template_and_tokenizer_both_add_it(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token = "<|endoftext|>"  # Llama-style: a BOS distinct from the turn marker
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    assert tok("hi")["input_ids"][0] == bos  # this tokenizer adds BOS on plain encoding
    chat = run(tok, {"messages": CHAT}).input_ids
    text = run(tok, {"text": "The cat sat."}).input_ids
    for ids in (chat, text):
        assert ids[0] == bos and ids[1] != bos
    assert run(tiny_tokenizer, {"text": "The cat sat."}).input_ids[0] not in (bos, 1)  # ChatML


def test_pad_id_is_never_the_eos_id(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    assert pad_token_id(tok) == tok.pad_token_id != tok.eos_token_id
    tok.pad_token = tok.eos_token  # as SmolLM2 ships
    assert pad_token_id(tok) != tok.eos_token_id


def test_unknown_format_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="cannot detect"):
        run(tiny_tokenizer, {"question": "?"})
