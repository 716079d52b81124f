"""Dataset rows → `input_ids` + `labels` (-100 where no loss is taken), pure.

Formats (api-reference §6.2): conversation (`messages`), instruction (`prompt`/`completion`),
text (`text`) and pre-tokenised Parquet rows (`input_ids`, optional `labels`/`attention_mask`).
`labels` follow the Hugging Face convention: aligned with `input_ids` (label i is token i, the
shift to next-token targets happens in collation), -100 = not trained.

Masks are built by construction, never by searching token ids: a conversation is rendered with
the model's own chat template (through data/tools.py, which also lays out `tools`, tool calls,
tool results and reasoning, the same way inference does) one message at a time, each rendering a
string prefix of the next, so every message's text span — and so its token span — is known
exactly. Pieces are tokenized one by one and concatenated. An assistant turn splits into header
(`<|im_start|>assistant\\n`, never trained unless train_on_inputs is true) and body: content,
reasoning and tool calls, then the footer (`<|im_end|>\\n`), trained up to and including the EOS
token, the newline after it not. `weight: 0` on a message of any role excludes all of its tokens.

Truncation: the first `max_seq_length` tokens are kept, the rest dropped (`truncated=True`); an
example whose trained tokens all fall beyond the limit keeps 0 trained tokens and is skipped by
the recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunehouse.data import tools as tools_format

IGNORE = -100


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained_tokens(self) -> int:
        """Tokens that receive a loss: labelled positions after the first (token 0 has no
        context to be predicted from, so its label, if any, is never a target)."""
        return sum(label != IGNORE for label in self.labels[1:])


def detect_format(row: dict[str, Any]) -> str:
    """"text", "conversation", "instruction" or "tokenized" (checked in the together order)."""
    if "text" in row:
        return "text"
    if "messages" in row:
        return "conversation"
    if "prompt" in row and "completion" in row:
        return "instruction"
    if "input_ids" in row:
        return "tokenized"
    raise ValueError(f"cannot detect the format of a row with keys {sorted(row)}")


def resolve_train_on_inputs(value: bool | str, fmt: str) -> bool:
    """`"auto"` → False for conversation/instruction data, True for text and tokenized rows."""
    if value == "auto":
        return fmt in ("text", "tokenized")
    return bool(value)


def pad_token_id(tokenizer) -> int:
    """A pad id that is never the EOS id (SmolLM2 ships pad == eos == <|im_end|>).

    Labels of padding are -100 anyway, but a pad equal to EOS invites collators that mask by
    `input_ids == pad` to silently un-train every EOS; a distinct id rules that out.
    """
    eos = tokenizer.eos_token_id
    candidates = [tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                  tokenizer.convert_tokens_to_ids("<pad>"), tokenizer.unk_token_id,
                  tokenizer.bos_token_id, 0, 1]
    for cand in candidates:
        if isinstance(cand, int) and cand >= 0 and cand != eos:
            return cand
    raise ValueError("no pad id distinct from the EOS id")


def tokenize_row(row: dict[str, Any], tokenizer, *, train_on_inputs: bool | str,
                 max_seq_length: int) -> Tokenized:
    """Tokenize one row of any supported format; see the module docstring for the rules."""
    fmt = detect_format(row)
    on_inputs = resolve_train_on_inputs(train_on_inputs, fmt)
    if fmt == "tokenized":
        ids, labels = _pretokenized(row)
    elif fmt == "text":
        # Nothing in a text row is a prompt: all of it (and its EOS) is trained.
        ids, labels = _pieces_to_ids(tokenizer, [(row["text"], True)], add_bos=True, add_eos=True)
    elif fmt == "instruction" and tokenizer.chat_template:
        ids, labels = _conversation(tokenizer, [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]}], on_inputs)
    elif fmt == "instruction":
        ids, labels = _pieces_to_ids(
            tokenizer, [(row["prompt"], on_inputs), (row["completion"], True)],
            add_bos=True, add_eos=True)
    else:
        ids, labels = _conversation(tokenizer, row["messages"], on_inputs, row.get("tools"))
    truncated = len(ids) > max_seq_length
    return Tokenized(ids[:max_seq_length], labels[:max_seq_length], truncated)


def tokenize_conversation(tokenizer, messages: list[dict], *, train_on_inputs: bool = False,
                          tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation, untruncated: the rules of the module docstring."""
    return _conversation(tokenizer, messages, train_on_inputs, tools)


def read_rows(path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped) or a Parquet file."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_packed(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A pre-tokenised row whose `position_ids` restart at 0 holds several packed sequences:
    one row per sequence, so that each is trained on its own (the packer then isolates them
    with its block-diagonal attention; position ids alone would not, DESIGN.md). Other rows
    come back as they are; the checker refuses position_ids that do not count 0, 1, 2, …"""
    positions = row.get("position_ids")
    if positions is None:
        return [row]
    starts = [i for i, p in enumerate(positions) if int(p) == 0] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    bounds = list(zip(starts, starts[1:] + [len(positions)]))
    columns = [k for k in ("input_ids", "labels", "attention_mask") if row.get(k) is not None]
    return [{k: list(row[k][a:b]) for k in columns} for a, b in bounds]


def _pretokenized(row: dict[str, Any]) -> tuple[list[int], list[int]]:
    ids = [int(t) for t in row["input_ids"]]
    labels = row.get("labels")
    labels = ids if labels is None else [int(t) for t in labels]
    if len(labels) != len(ids):
        raise ValueError(f"labels has {len(labels)} entries, input_ids {len(ids)}")
    mask = row.get("attention_mask")
    if mask is not None:  # drop padding stored with the row
        keep = [i for i, m in enumerate(mask) if m]
        ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
    return ids, labels


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _adds_bos(tokenizer) -> bool:
    """Whether plain encoding prepends BOS (Llama-style); ChatML tokenizers like SmolLM2's don't."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    return len(with_special) > len(_encode(tokenizer, "a")) and with_special[0] == bos


def _pieces_to_ids(tokenizer, pieces: Sequence[tuple[str, bool]], *, add_bos: bool,
                   add_eos: bool) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = _encode(tokenizer, text)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if add_bos and _adds_bos(tokenizer) and not (ids and ids[0] == bos):
        ids, labels = [bos] + ids, [IGNORE] + labels
    if add_eos and eos is not None and not (ids and ids[-1] == eos):
        ids, labels = ids + [eos], labels + [eos]
    return ids, labels


def _conversation(tokenizer, messages: list[dict], train_on_inputs: bool, tools: list[dict] | None = None):
    """Spans of the rendered conversation, each marked trained or not, then tokenized.

    The conversation is rendered (data/tools.py, the same rendering inference uses) at the end of
    every *unit*: an assistant message alone, or a run of consecutive other messages. Each
    rendering must extend the previous one; a run is split further into its messages where the
    template renders them incrementally too, else it is one span, trained only if all of its
    messages are (Qwen-style templates share one user turn among consecutive tool results and
    close it only after the last).

    Trained: an assistant message's text after its header, up to and including the first EOS
    (tool-call text and reasoning included); with train_on_inputs also its header, the text after
    that EOS and every other message. A message with weight 0 is never trained, whatever its role.
    The chat template decides BOS: HF's `apply_chat_template` adds no special tokens beyond the
    template's own, and neither do we, so a template that writes `{{ bos_token }}` gives one BOS.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, trained: bool) -> None:
        piece = _encode(tokenizer, text)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE] * len(piece))

    def render(upto: int, generation_prompt: bool = False) -> str:
        return tools_format.render(tokenizer, messages[:upto], tools, generation_prompt=generation_prompt)

    prev = ""
    for start, end in _units(messages):
        full = render(end)
        if not full.startswith(prev):
            raise ValueError("the chat template does not render conversations incrementally "
                             f"(message {start} changes the text of earlier messages)")
        message = messages[start]
        weighted = message.get("weight", 1) != 0
        if message["role"] == "assistant":
            header, body = _split_header(tokenizer, messages, start, prev, full, tools)
            body_ids = _encode(tokenizer, body)
            cut = body_ids.index(eos) + 1 if eos in body_ids else len(body_ids)
            add(header, weighted and train_on_inputs)
            ids.extend(body_ids)
            labels.extend(body_ids[:cut] if weighted else [IGNORE] * cut)
            labels.extend(body_ids[cut:] if weighted and train_on_inputs else [IGNORE] * (len(body_ids) - cut))
        else:
            for text, trained in _input_spans(messages, start, end, prev, full, render, train_on_inputs):
                add(text, trained)
        prev = full
    return ids, labels


def _units(messages: list[dict]) -> list[tuple[int, int]]:
    """[start, end) index ranges: each assistant message alone, each run of other messages."""
    units: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" and units and messages[units[-1][0]]["role"] != "assistant":
            units[-1] = (units[-1][0], i + 1)
        else:
            units.append((i, i + 1))
    return units


def _input_spans(messages, start: int, end: int, prev: str, full: str, render, train_on_inputs: bool):
    """(text, trained) per message of a run of non-assistant messages, or one span for the run
    when the template does not render its messages one by one as prefixes."""
    def trained(m: dict) -> bool:
        return train_on_inputs and m.get("weight", 1) != 0

    spans, at = [], prev
    for k in range(start, end):
        text = full if k == end - 1 else render(k + 1)
        if not (text.startswith(at) and full.startswith(text)):
            return [(full[len(prev):], all(trained(m) for m in messages[start:end]))]
        spans.append((text[len(at):], trained(messages[k])))
        at = text
    return spans


def _split_header(tokenizer, messages: list[dict], i: int, prev: str, full: str, tools):
    """Split assistant message i's new text into (header, body = content + footer)."""
    new = full[len(prev):]
    with_header = tools_format.render(tokenizer, messages[:i], tools, generation_prompt=True)
    if with_header.startswith(prev) and full.startswith(with_header):
        return with_header[len(prev):], full[len(with_header):]
    # A template whose generation prompt differs from its rendered header: find the body's text.
    support = tools_format.template_support(tokenizer)
    content = tools_format.template_inputs([messages[i]], None, support)[0][0]["content"]
    at = new.rfind(content) if content else -1
    if at < 0:
        raise ValueError(f"cannot find where assistant message {i} starts in the chat template's output")
    return new[:at], new[at:]
