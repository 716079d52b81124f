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

Batches: all pairs of a micro-batch go through ONE forward pass, and each pair's prompt is run
once for both of its sides (prompt sharing):

    tokens     prompt p₀…p_{P-1} | chosen c₀…c_{C-1}   | rejected r₀…r_{R-1}
    positions  0 … P-1           | P … P+C-1           | P … P+R-1     (restart at P: a branch)
    sees       itself, causal    | prompt + chosen ≤ t | prompt + rejected ≤ t (never chosen)

so every token has exactly the keys, values and rotary positions it has in its own side run
alone: the same log-probs as two separate sides, with the prompt's layers computed once instead of
twice (a third of the tokens of the bench's pairs). The last prompt position predicts both c₀ and
r₀, so the trained positions are an index into the rows (`PairBatch.index`, one position listed
twice) rather than a [B, T] target tensor. Attention reads this layout from `position_ids`
(train/attention.py), or from the additive mask of `packing.block_causal_mask` given the position
ids (position ids alone do not isolate segments, DESIGN.md). Rows: one pair per row (padded), or
with `row_tokens` pairs packed into rows of at most max(row_tokens, longest pair) tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunehouse.data.packing import block_causal_mask, pack
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
        """Tokens of both sides as two sequences (the prompt counted twice; batches run it once)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def run_tokens(self) -> int:
        """Tokens of its run in a batch: the prompt once, then both completions."""
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

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
    """A micro-batch of pairs ready for one forward pass (layout: the module docstring).

    The N trained positions: `index` (flat into the [B, T] rows, row-major), `targets` (the
    token each predicts) and `segment` (2·k for pair k's chosen side, 2·k + 1 for its rejected
    side), ordered by segment then position. A prompt's last position is listed once per side.
    """

    input_ids: torch.Tensor        # [B, T] long, pad_id after each row's pairs
    position_ids: torch.Tensor     # [B, T] long (padding: 0, 1, … as its own segment)
    attention_mask: torch.Tensor | None  # [B, 1, T, T] additive, or None (packed attention)
    index: torch.Tensor            # [N] long
    targets: torch.Tensor          # [N] long
    segment: torch.Tensor          # [N] long
    chosen_lengths: torch.Tensor   # [P] completion tokens, float
    rejected_lengths: torch.Tensor  # [P]
    num_pairs: int
    num_tokens: int
    """Real (non-pad) tokens run: each prompt once."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs


def collate_pairs(pairs: Sequence[Pair], pad_id: int, mask_dtype: torch.dtype | None = torch.float32,
                  *, row_tokens: int | None = None) -> PairBatch:
    """P pairs as one batch (one forward pass), each pair prompt + chosen + rejected with its
    prompt shared: one pair per row, right-padded, or (row_tokens given) pairs packed by
    `packing.pack` into rows of at most max(row_tokens, longest pair) tokens. No attention mask
    when mask_dtype is None (the model runs train/attention.py's packed attention)."""
    runs = [Tokenized(p.prompt + p.chosen + p.rejected, []) for p in pairs]
    if row_tokens:
        groups = pack(runs, max(row_tokens, max(p.run_tokens for p in pairs)))
    else:
        groups = [[k] for k in range(len(pairs))]
    width = max(sum(pairs[k].run_tokens for k in group) for group in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    owner = torch.full((len(groups), width), -1, dtype=torch.long)  # pair per token, -1 = padding
    index, targets = [None] * (2 * len(pairs)), [None] * (2 * len(pairs))
    for r, group in enumerate(groups):
        start = 0
        for k in group:
            pair, p, c = pairs[k], len(pairs[k].prompt), len(pairs[k].chosen)
            n = pair.run_tokens
            input_ids[r, start:start + n] = torch.tensor(runs[k].input_ids, dtype=torch.long)
            position_ids[r, start:start + p + c] = torch.arange(p + c)
            position_ids[r, start + p + c:start + n] = torch.arange(p, p + len(pair.rejected))
            owner[r, start:start + n] = k
            at = r * width + start  # flat position of the prompt's first token
            # chosen: positions p-1 … p+c-2 predict c₀ … c_{C-1}; rejected: p-1, then its own
            index[2 * k] = torch.arange(at + p - 1, at + p + c - 1)
            index[2 * k + 1] = torch.cat([torch.tensor([at + p - 1]),
                                          torch.arange(at + p + c, at + n - 1)])
            targets[2 * k], targets[2 * k + 1] = torch.tensor(pair.chosen), torch.tensor(pair.rejected)
            start += n
        position_ids[r, start:] = torch.arange(width - start)
    lengths = torch.tensor([float(len(t)) for t in targets])
    segment = torch.repeat_interleave(torch.arange(2 * len(pairs)), lengths.long())
    mask = None if mask_dtype is None else block_causal_mask(owner, mask_dtype, position_ids)
    return PairBatch(input_ids, position_ids, mask, torch.cat(index), torch.cat(targets).long(), segment,
                     lengths[0::2], lengths[1::2], len(pairs), num_tokens=int((owner >= 0).sum()))
