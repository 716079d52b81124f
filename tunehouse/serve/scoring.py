"""Prompt log-probabilities ("echo"): log p(token_t | tokens_<t) for every token of given
sequences, in one forward without generating. Used for validation loss and perplexity through
the chat API (`echo: true, logprobs: k, max_tokens: 0`).

The LM head runs on chunks of positions rather than the whole [B, T, V] logits at once: with a
49k vocabulary a 600-token conversation's full logits are 120 MB in fp32 per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

HEAD_CHUNK = 512  # positions per LM-head call


@dataclass
class Scored:
    """Per token of the sequence: its log-prob given the tokens before it (None for the first,
    which nothing precedes) and, when asked, the k most likely (token id, log-prob) there."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]]] = field(default_factory=list)


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention mask [B, T]) with each row at the left and padding after it."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def head_logprobs(causal_lm, hidden: torch.Tensor, targets: torch.Tensor,
                  top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(targets) from hidden states [N, H] → ([N], top ids [N, k], top log-probs [N, k]),
    applying the head HEAD_CHUNK positions at a time (and the model's logit soft-capping, if any)."""
    head = causal_lm.get_output_embeddings()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if hidden.shape[0] == 0:  # every row is one token: nothing predicts anything
        return targets.new_zeros(0, dtype=torch.float), targets.new_zeros(0, top), targets.new_zeros(
            0, top, dtype=torch.float)
    picked, ids, values = [], [], []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head(hidden[start:start + HEAD_CHUNK]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        lp = logits.log_softmax(-1)
        picked.append(lp.gather(-1, targets[start:start + HEAD_CHUNK, None])[:, 0])
        v, i = lp.topk(top, dim=-1)
        ids.append(i)
        values.append(v)
    return torch.cat(picked), torch.cat(ids), torch.cat(values)


@torch.no_grad()
def score(causal_lm, rows: list[list[int]], *, top: int = 0, pad_id: int = 0) -> list[Scored]:
    """Score each row (token ids); `causal_lm` is a transformers causal LM (LoRA layers injected
    in place run as part of its decoder)."""
    device = causal_lm.device
    ids, mask = right_padded(rows, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = causal_lm.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     position_ids=positions.to(device), use_cache=False).last_hidden_state
    # Position t predicts token t+1: keep the predicting positions of real tokens only.
    predicts = mask[:, 1:].bool()
    targets = ids[:, 1:][predicts].to(device)
    picked, top_ids, top_lps = head_logprobs(causal_lm, hidden[:, :-1][predicts.to(device)], targets, top)
    picked, top_ids, top_lps = picked.cpu().tolist(), top_ids.cpu().tolist(), top_lps.cpu().tolist()
    out, at = [], 0
    for r in rows:
        n = len(r) - 1
        lps = [None, *picked[at:at + n]]
        tops = [[], *[list(zip(i, v)) for i, v in zip(top_ids[at:at + n], top_lps[at:at + n])]] if top else []
        out.append(Scored(lps, tops))
        at += n
    return out
