"""Preference rows → prompt, chosen and rejected token ids, truncation, pair batches; pure.

A row (api-reference §6.2, preference format):

    {"input": {"messages": [...]},                          the prompt conversation
     "preferred_output": [{"role": "assistant", "content": ...}],
     "non_preferred_output": [{"role": "assistant", "content": ...}]}

Tokens: the prompt is the input (and its `tools`) rendered by the chat template with the generation
prompt (`…<|im_start|>assistant\\n`); a completion is the assistant content (its reasoning and
tool calls included, data/tools.py) plus the end-of-turn EOS,
tokenized exactly as SFT tokenizes (and trains) an assistant turn (`tokenize_conversation`).

Truncation policy — each side (prompt + its completion) must fit `max_seq_length`:
  1. the prompt is cut from the LEFT (its oldest tokens go first) until the longer side fits,
     but never below min(prompt length, max_seq_length // 2) tokens;
  2. then a completion still too long is cut from the RIGHT (its end, EOS included, goes).
A pair that lost any token counts as truncated (the recipe reports how many).

Batches: all sides of a micro-batch's pairs (prompt+chosen, prompt+rejected) go through ONE
forward pass: one side per row, or packed several to a row of ≤ max_seq_length tokens, each side
a segment of the block-diagonal mask of `packing.collate` (position ids alone do not isolate
segments, DESIGN.md). Rows stay ≤ max_seq_length, so attention costs what it costs in SFT;
putting a pair's two sides in one row would double its length and quadruple attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunehouse.data.packing import Batch, collate, pack
from tunehouse.data.tokenize import IGNORE, Tokenized, tokenize_conversation


@dataclass(frozen=True)
class Pair:
    prompt: list[int]
    chosen: list[int]
    """Preferred completion ids (content + EOS unless truncated away)."""
    rejected: list[int]
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        """Tokens of both sides (the prompt counted twice, as it is run twice)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    def sides(self) -> list[Tokenized]:
        """[prompt+chosen, prompt+rejected], labels on the completion tokens only."""
        skip = [IGNORE] * len(self.prompt)
        return [Tokenized(self.prompt + c, skip + c) for c in (self.chosen, self.rejected)]


def tokenize_pair(row: dict[str, Any], tokenizer, *, max_seq_length: int) -> Pair:
    """One preference row → a `Pair`, truncated by the policy of the module docstring."""
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in row["input"]["messages"]]
    tools = row["input"].get("tools")
    sides = [_prompt_and_completion(tokenizer, messages, row[key][0], tools)
             for key in ("preferred_output", "non_preferred_output")]
    (prompt, chosen), (other, rejected) = sides
    if prompt != other:
        raise ValueError("the chat template renders the prompt differently for the two outputs")
    return truncate_pair(prompt, chosen, rejected, max_seq_length)


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int],
                  max_seq_length: int) -> Pair:
    """Apply the truncation policy: prompt from the left first (keeping ≥ half the limit or all
    of it), then each completion from the right."""
    longest = max(len(chosen), len(rejected))
    keep = max(max_seq_length - longest, min(len(prompt), max_seq_length // 2))
    cut_prompt = prompt[max(0, len(prompt) - keep):]
    room = max_seq_length - len(cut_prompt)
    pair = Pair(cut_prompt, chosen[:room], rejected[:room])
    truncated = (len(pair.prompt), len(pair.chosen), len(pair.rejected)) != (
        len(prompt), len(chosen), len(rejected))
    return Pair(pair.prompt, pair.chosen, pair.rejected, truncated)


def _prompt_and_completion(tokenizer, messages: list[dict], answer: dict, tools: list[dict] | None):
    """Split the SFT tokenisation of messages + answer into (prompt, trained answer tokens).

    The answer's trained span is the last run of labelled tokens (content + EOS); everything
    before it is the prompt, ending with the assistant header; the untrained newline after EOS
    is dropped.
    """
    reply = {k: v for k, v in answer.items() if k != "weight"} | {"role": "assistant"}
    ids, labels = tokenize_conversation(tokenizer, messages + [reply], tools=tools)
    end = len(labels)
    while end and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE:
        start -= 1
    if start == end or start == 0:
        raise ValueError("the chat template gives the answer no trained tokens or no prompt")
    return ids[:start], ids[start:end]


@dataclass
class PairBatch:
    """A micro-batch of pairs ready for one forward pass.

    `segment[i]` says which sequence the i-th trained position (row-major order of
    `batch.targets != -100`, the order `losses.trained_logits` returns) belongs to:
    2·k for pair k's chosen side, 2·k + 1 for its rejected side.
    """

    batch: Batch
    segment: torch.Tensor        # [N] long
    chosen_lengths: torch.Tensor   # [P] completion tokens, float
    rejected_lengths: torch.Tensor  # [P]
    num_pairs: int


def collate_pairs(pairs: Sequence[Pair], pad_id: int, mask_dtype: torch.dtype | None = torch.float32,
                  *, row_tokens: int | None = None) -> PairBatch:
    """The 2·P sides of P pairs as one batch (one forward pass): one side per row, right-padded
    (concatenated along the batch), or (row_tokens given) sides packed by `packing.pack` into
    rows of at most row_tokens tokens, each side its own segment. Side 2k+s stays sequence 2k+s
    whatever row it lands in."""
    sides = [side for pair in pairs for side in pair.sides()]
    groups = pack(sides, row_tokens) if row_tokens else [[j] for j in range(len(sides))]
    batch = collate([[sides[j] for j in group] for group in groups], pad_id, mask_dtype)
    owner = torch.full(batch.targets.shape, -1, dtype=torch.long)
    for r, group in enumerate(groups):
        start = 0
        for j in group:
            owner[r, start:start + sides[j].num_tokens] = j
            start += sides[j].num_tokens
    segment = owner[batch.targets != IGNORE]
    lengths = torch.bincount(segment, minlength=len(sides)).float()
    return PairBatch(batch, segment, lengths[0::2], lengths[1::2], len(pairs))
