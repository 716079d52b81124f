"""DPO-family losses: hand-worked answers on 3-element tensors, then TRL 1.16 on the tiny model.

Hand-worked numbers (β = 0.5 unless said), three pairs:

    π_c = [-4, -6, -3]   π_r = [-6, -5, -9]   ρ_c = ρ_r = [-5, -5, -5]
    L_c = [ 2,  1,  4]   L_r = [ 1,  2,  4]
    Δc = π_c − ρ_c = [1, -1, 2]          Δr = π_r − ρ_r = [-1, 0, -4]

DPO: h = β(Δc − Δr) = 0.5·[2, -1, 6] = [1, -0.5, 3]; loss = log(1 + e^−h)
     = [log(1+e^−1), log(1+e^0.5), log(1+e^−3)] = [0.31326, 0.97408, 0.04859].
     rewards/chosen = βΔc = [0.5, -0.5, 1] (mean 1/3); rewards/rejected = [-0.5, 0, -2] (mean -5/6);
     margins [1, -0.5, 3] (mean 7/6); accuracies [1, 0, 1] → 2/3; logps/chosen mean -13/3,
     logps/rejected mean -20/3; kl/estimate = mean((Δc/L_c + Δr/L_r)/2)
     = mean([(0.5 − 1)/2, (−1 + 0)/2, (0.5 − 1)/2]) = mean([-0.25, -0.5, -0.25]) = -1/3.
Length-normalised: Δc/L_c = [0.5, -1, 0.5], Δr/L_r = [-1, 0, -1]; h = 0.5·[1.5, -1, 1.5]
     = [0.75, -0.5, 0.75]; loss = [log(1+e^−0.75), log(1+e^0.5), log(1+e^−0.75)];
     rewards/chosen = [0.25, -0.5, 0.25].
Reference-free: ρ = 0, so h = β(π_c − π_r) = 0.5·[2, -1, 6]: the DPO losses again (here ρ_c = ρ_r).
RPO (α = 0.5): NLL = −π_c/L_c = [2, 6, 0.75]; loss = DPO + [1, 3, 0.375].
SimPO (β = 0.5, γ = 0.25): π_c/L_c = [-2, -6, -0.75], π_r/L_r = [-6, -2.5, -2.25];
     h = 0.5·[4, -3.5, 1.5] − 0.25 = [1.75, -2, 0.5]; loss = [log(1+e^−1.75), log(1+e^2),
     log(1+e^−0.5)]; rewards/chosen = [-1, -3, -0.375], rewards/rejected = [-3, -1.25, -1.125].
token_kl: p = softmax([0, 0]) = [½, ½], q = softmax([0, ln 3]) = [¼, ¾]:
     KL = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3); a second position with p = q gives 0; a third one is
     masked out. Mean over the 2 kept positions = ¼ ln(4/3).
"""

from __future__ import annotations

import math
import tempfile
from types import SimpleNamespace

import pytest
import torch
from train_fixtures import tiny_model_dir, tiny_tokenizer  # noqa: F401  (fixtures)

from tunehouse.data.preference import collate_pairs, tokenize_pair
from tunehouse.train.losses import (
    dpo_loss,
    preference_loss,
    rpo_nll,
    segment_logps,
    simpo_loss,
    token_kl,
    trained_logits,
)

PC = torch.tensor([-4.0, -6.0, -3.0])
PR = torch.tensor([-6.0, -5.0, -9.0])
RC = RR = torch.tensor([-5.0, -5.0, -5.0])
LC = torch.tensor([2.0, 1.0, 4.0])
LR = torch.tensor([1.0, 2.0, 4.0])


def softplus(x: float) -> float:
    """log(1 + e^x) = −log σ(−x)."""
    return math.log1p(math.exp(x))


def test_dpo_by_hand():
    losses, m = dpo_loss(PC, PR, RC, RR, LC, LR, beta=0.5)
    assert losses.tolist() == pytest.approx([softplus(-1), softplus(0.5), softplus(-3)], rel=1e-6)
    assert m == pytest.approx({"rewards/chosen": 1 / 3, "rewards/rejected": -5 / 6,
                               "rewards/margins": 7 / 6, "rewards/accuracies": 2 / 3,
                               "logps/chosen": -13 / 3, "logps/rejected": -20 / 3,
                               "kl/estimate": -1 / 3}, rel=1e-6)


def test_length_normalised_dpo_by_hand():
    losses, m = dpo_loss(PC, PR, RC, RR, LC, LR, beta=0.5, normalize_by_length=True)
    assert losses.tolist() == pytest.approx([softplus(-0.75), softplus(0.5), softplus(-0.75)],
                                            rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.0, abs=1e-7)  # mean of [0.25, -0.5, 0.25]
    assert m["rewards/rejected"] == pytest.approx(-1.0 / 3, rel=1e-6)  # 0.5·[-1, 0, -1]


def test_reference_free_dpo_by_hand():
    losses, m = dpo_loss(PC, PR, None, None, LC, LR, beta=0.5)
    assert losses.tolist() == pytest.approx([softplus(-1), softplus(0.5), softplus(-3)], rel=1e-6)
    assert "kl/estimate" not in m and m["rewards/chosen"] == pytest.approx(0.5 * -13 / 3)


def test_rpo_by_hand():
    assert rpo_nll(PC, LC).tolist() == [2.0, 6.0, 0.75]
    losses, _ = preference_loss(PC, PR, RC, RR, LC, LR, beta=0.5, normalize_by_length=False,
                                reference_free=False, rpo_alpha=0.5, simpo_gamma=0.0)
    want = [softplus(-1) + 1, softplus(0.5) + 3, softplus(-3) + 0.375]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)


def test_simpo_by_hand():
    losses, m = simpo_loss(PC, PR, LC, LR, beta=0.5, gamma=0.25)
    assert losses.tolist() == pytest.approx([softplus(-1.75), softplus(2), softplus(-0.5)],
                                            rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx((-1 - 3 - 0.375) / 3, rel=1e-6)
    assert m["rewards/rejected"] == pytest.approx((-3 - 1.25 - 1.125) / 3, rel=1e-6)
    assert m["rewards/accuracies"] == pytest.approx(2 / 3) and "kl/estimate" not in m
    # preference_loss picks SimPO whenever simpo_gamma > 0 and ignores any reference passed
    same, _ = preference_loss(PC, PR, RC, RR, LC, LR, beta=0.5, normalize_by_length=True,
                              reference_free=True, rpo_alpha=0.0, simpo_gamma=0.25)
    assert torch.equal(same, losses)


def test_token_kl_by_hand():
    policy = torch.tensor([[0.0, 0.0], [1.0, 2.0], [5.0, -5.0]])
    reference = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0], [-5.0, 5.0]])
    mask = torch.tensor([True, True, False])
    assert token_kl(policy, reference, mask).item() == pytest.approx(math.log(4 / 3) / 4, rel=1e-6)
    assert token_kl(policy, policy, torch.ones(3, dtype=torch.bool)).item() == 0.0


# -- against TRL 1.16, same tiny model and batch ------------------------------------------------

ROWS = [({"role": "user", "content": "What colour is the sky?"}, "Blue.", "The sky is green."),
        ({"role": "user", "content": "Say hello."}, "Hello! How are you today?", "No."),
        ({"role": "user", "content": "Name a bird."}, "An owl.", "A cat sat on the mat.")]


@pytest.fixture(scope="module")
def tiny_pairs(tiny_model_dir, tiny_tokenizer):  # noqa: F811
    """Policy (the tiny model, perturbed), reference (the tiny model), three pairs of unequal
    completion lengths, and our per-sequence log-prob sums from the packed
    path (collate_pairs → trained_logits → segment_logps), sides packed into rows."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pairs = [tokenize_pair({"input": {"messages": [q]},
                            "preferred_output": [{"role": "assistant", "content": c}],
                            "non_preferred_output": [{"role": "assistant", "content": r}]},
                           tiny_tokenizer, max_seq_length=128) for q, c, r in ROWS]
    batch = collate_pairs(pairs, pad_id=0, row_tokens=256)
    logps = []
    with torch.no_grad():
        for model in (policy, reference):
            logits, targets = trained_logits(model, batch.model_inputs(), batch.targets, batch.index)
            logps.append(segment_logps(logits, targets, batch.segment, 2 * len(pairs)))
    (pol, ref) = logps
    ours = SimpleNamespace(pc=pol[0::2], pr=pol[1::2], rc=ref[0::2], rr=ref[1::2],
                           lc=batch.chosen_lengths, lr=batch.rejected_lengths)
    assert len(set(ours.lc.tolist())) == 3  # unequal lengths: normalisations can differ
    return policy, reference, pairs, ours


def trl_dpo(tiny_pairs, tokenizer, **args):
    """TRL's DPOTrainer._compute_loss on the same pairs (its own padded forward of both
    models) → (loss, logged metrics)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference, pairs, _ = tiny_pairs
    dummy = Dataset.from_list([{"prompt": [ROWS[0][0]],
                                "chosen": [{"role": "assistant", "content": "a"}],
                                "rejected": [{"role": "assistant", "content": "b"}]}])
    trainer = DPOTrainer(model=policy, ref_model=reference, train_dataset=dummy,
                         processing_class=tokenizer,
                         args=DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True,
                                        precompute_ref_log_probs=False, max_length=None,
                                        bf16=False, **args))  # its CPU default autocasts
    sides = [p.sides()[0] for p in pairs] + [p.sides()[1] for p in pairs]  # [chosen…, rejected…]
    width = max(s.num_tokens for s in sides)
    inputs = {k: torch.zeros(len(sides), width, dtype=torch.long)
              for k in ("input_ids", "attention_mask", "completion_mask")}
    for i, side in enumerate(sides):
        n = side.num_tokens
        inputs["input_ids"][i, :n] = torch.tensor(side.input_ids)
        inputs["attention_mask"][i, :n] = 1
        inputs["completion_mask"][i, :n] = torch.tensor([lab != -100 for lab in side.labels])
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # model is in eval mode
    return loss.item(), logged


METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected"]


def test_dpo_equals_trl_sigmoid(tiny_pairs, tiny_tokenizer):  # noqa: F811
    o = tiny_pairs[3]
    losses, m = dpo_loss(o.pc, o.pr, o.rc, o.rr, o.lc, o.lr, beta=0.1)
    trl_loss, trl_m = trl_dpo(tiny_pairs, tiny_tokenizer, beta=0.1, loss_type=["sigmoid"])
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-5)
    assert [m[k] for k in METRICS] == pytest.approx([trl_m[k] for k in METRICS], abs=1e-4)


def test_length_normalised_dpo_equals_trl_sigmoid_norm(tiny_pairs, tiny_tokenizer):  # noqa: F811
    """TRL's `sigmoid_norm` divides each log-ratio by its completion length as we do. (Its logged
    rewards stay un-normalised β·(π − ρ); ours are the normalised ones that enter the loss.)"""
    o = tiny_pairs[3]
    losses, _ = dpo_loss(o.pc, o.pr, o.rc, o.rr, o.lc, o.lr, beta=0.1, normalize_by_length=True)
    trl_loss, _ = trl_dpo(tiny_pairs, tiny_tokenizer, beta=0.1, loss_type=["sigmoid_norm"])
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-5)


def test_rpo_against_trl_sigmoid_plus_sft(tiny_pairs, tiny_tokenizer):  # noqa: F811
    """TRL writes RPO as loss_type ["sigmoid", "sft"] with weights [1, α]. Normalisation differs:
    TRL's "sft" term is the mean NLL over ALL preferred tokens of the batch (token-weighted,
    Σ−π_c / ΣL_c); ours is each pair's mean per-token NLL (−π_c/L_c), averaged over pairs
    (pair-weighted, like every other term, so a step's loss does not depend on which pairs share
    a micro-batch). Equal when the preferred completions have equal lengths; here they do not."""
    o, alpha = tiny_pairs[3], 0.5
    losses, _ = preference_loss(o.pc, o.pr, o.rc, o.rr, o.lc, o.lr, beta=0.1,
                                normalize_by_length=False, reference_free=False,
                                rpo_alpha=alpha, simpo_gamma=0.0)
    trl_loss, _ = trl_dpo(tiny_pairs, tiny_tokenizer, beta=0.1, loss_type=["sigmoid", "sft"],
                          loss_weights=[1.0, alpha])
    dpo = dpo_loss(o.pc, o.pr, o.rc, o.rr, o.lc, o.lr, beta=0.1)[0].mean()
    token_weighted = (-o.pc.sum() / o.lc.sum()).item()
    assert trl_loss == pytest.approx(dpo.item() + alpha * token_weighted, abs=1e-5)
    pair_weighted = rpo_nll(o.pc, o.lc).mean().item()
    assert losses.mean().item() == pytest.approx(dpo.item() + alpha * pair_weighted, abs=1e-6)
    assert abs(losses.mean().item() - trl_loss) > 1e-3  # the documented difference is real


def test_simpo_equals_trl_cpo_simpo(tiny_pairs):
    """CPOTrainer(loss_type="simpo", cpo_alpha=0).cpo_loss takes average log-probs (its
    `get_batch_logps(average_log_prob=True)` = π/L) and computes −log σ(β(Δ) − γ) as
    −log σ(β(Δ − γ/β)): the same number. Called unbound on our sums divided by our lengths."""
    from trl.experimental.cpo import CPOTrainer

    o, beta, gamma = tiny_pairs[3], 2.0, 0.5
    losses, m = simpo_loss(o.pc, o.pr, o.lc, o.lr, beta=beta, gamma=gamma)
    trainer = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type="simpo",
                              label_smoothing=0.0, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, chosen, rejected = CPOTrainer.cpo_loss(trainer, o.pc / o.lc, o.pr / o.lr)
    assert losses.tolist() == pytest.approx(trl_losses.tolist(), abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-6)


def test_shared_prompt_equals_each_side_run_alone(tiny_pairs):
    """One forward per batch with each pair's prompt shared by its two sides (position ids
    restarting at P for the rejected side) gives the log-probs of each side run alone, one per
    row, under the explicit mask and under train/attention.py's packed attention, whether the
    pairs share a row or not."""
    from tunehouse.train import attention
    from tunehouse.train.head import linear_log_softmax_gather

    policy, _, pairs, ours = tiny_pairs
    alone = []
    with torch.no_grad():
        for pair in pairs:
            for completion in (pair.chosen, pair.rejected):
                ids = torch.tensor([pair.prompt + completion])
                logits = policy(input_ids=ids).logits[0, len(pair.prompt) - 1:-1]
                alone.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).sum())
    alone = torch.stack(alone)
    assert torch.allclose(torch.stack([ours.pc, ours.pr], 1).flatten(), alone, atol=1e-5)  # mask, rows

    packed = type(policy).from_pretrained(policy.name_or_path).eval()
    packed.load_state_dict(policy.state_dict())
    assert attention.enable(packed)
    for row_tokens in (None, 10_000):  # a pair per row (padded); all pairs in one row
        batch = collate_pairs(pairs, pad_id=0, mask_dtype=None, row_tokens=row_tokens)
        assert batch.input_ids.shape[0] == (len(pairs) if row_tokens is None else 1)
        with torch.no_grad():
            logits, targets = trained_logits(packed, batch.model_inputs(), batch.targets, batch.index)
            fused, _ = linear_log_softmax_gather(
                packed.get_decoder()(**batch.model_inputs()).last_hidden_state.flatten(0, 1)[batch.index],
                packed.get_output_embeddings().weight, batch.targets)
        assert torch.allclose(segment_logps(logits, targets, batch.segment, 2 * len(pairs)), alone, atol=1e-5)
        sums = torch.zeros(2 * len(pairs)).index_add(0, batch.segment, fused)
        assert torch.allclose(sums, alone, atol=1e-5)
