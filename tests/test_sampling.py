"""Pure sampling functions against values worked out by hand in each docstring."""

from __future__ import annotations

import math

import torch

from tunehouse.serve import sampling as S
from tunehouse.serve.sampling import SamplingParams

INF = float("-inf")


def probs_logits(*p: float) -> torch.Tensor:
    return torch.tensor([[math.log(x) for x in p]])


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    """[2, -1, 0.5], tokens 0 and 1 seen, penalty 2 → [2/2, -1·2, 0.5 unchanged] = [1, -2, 0.5]."""
    out = S.apply_repetition_penalty(torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[1.0, 3.0, 0.0]]),
                                     torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -2.0, 0.5]]


def test_presence_and_frequency_penalties():
    """counts [2, 1, 0], presence 0.5, frequency 0.25: 1 − 2·0.25 − 0.5 = 0; 1 − 0.25 − 0.5 = 0.25; 1."""
    out = S.apply_presence_frequency(torch.ones(1, 3), torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0.5]),
                                     torch.tensor([0.25]))
    assert out.tolist() == [[0.0, 0.25, 1.0]]


def test_token_counts():
    """Row 0 holds token 2 twice and 0 once; row 1 is empty."""
    assert S.token_counts([[2, 0, 2], []], 3).tolist() == [[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]


def test_temperature_divides_and_leaves_greedy_rows():
    """[2, 4] at 2 → [1, 2]; a temperature-0 row is left as it is."""
    out = S.apply_temperature(torch.tensor([[2.0, 4.0], [2.0, 4.0]]), torch.tensor([2.0, 0.0]))
    assert out.tolist() == [[1.0, 2.0], [2.0, 4.0]]


def test_top_k_per_row():
    """[1, 3, 2]: k=2 keeps 3 and 2; k=0 keeps everything."""
    out = S.apply_top_k(torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]]), torch.tensor([2, 0]))
    assert out.tolist() == [[INF, 3.0, 2.0], [1.0, 3.0, 2.0]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    """probs [0.2, 0.5, 0.3]. Mass strictly above each token in sorted order: 0.5→0, 0.3→0.5, 0.2→0.8.
    p=0.6 drops only 0.2 (0.8 ≥ 0.6); p=0.5 also drops 0.3 (0.5 ≥ 0.5); the top token always stays."""
    logits = probs_logits(0.2, 0.5, 0.3).repeat(3, 1)
    out = S.apply_top_p(logits, torch.tensor([0.6, 0.5, 0.01]))
    kept = (out > INF).tolist()
    assert kept == [[False, True, True], [False, True, False], [False, True, False]]


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    """probs [0.5, 0.3, 0.2], min_p 0.5: threshold 0.25 drops 0.2; min_p 0 keeps all."""
    out = S.apply_min_p(probs_logits(0.5, 0.3, 0.2).repeat(2, 1), torch.tensor([0.5, 0.0]))
    assert (out > INF).tolist() == [[True, True, False], [True, True, True]]


def test_greedy_rows_take_the_argmax_after_penalties():
    """[2, 1.9, 0] with token 0 in the prompt and repetition penalty 2 → [1, 1.9, 0]: token 1."""
    params = [SamplingParams(temperature=0, repetition_penalty=2.0), SamplingParams(temperature=0)]
    logits = torch.tensor([[2.0, 1.9, 0.0], [2.0, 1.9, 0.0]])
    gens = [S.make_generator(0), S.make_generator(0)]
    assert S.next_tokens(logits, params, gens, [[0], [0]], [[], []]).tolist() == [1, 0]


def test_same_seed_same_draws_whatever_else_is_in_the_batch():
    logits = torch.zeros(1, 100)
    p = SamplingParams(temperature=1.0)

    def draws(seed, batch_with_other: bool):
        gens = [S.make_generator(seed), S.make_generator(999)]
        out = []
        for _ in range(20):
            rows = logits.repeat(2, 1) if batch_with_other else logits
            out.append(int(S.next_tokens(rows, [p, p][: len(rows)], gens)[0]))
        return out

    assert draws(5, False) == draws(5, True) == draws(5, False)
    assert draws(5, False) != draws(6, False)


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    gens = [S.make_generator(s) for s in range(1)]
    for _ in range(5):
        assert S.next_tokens(logits, [SamplingParams(temperature=2.0, top_k=1)], gens).tolist() == [1]


def test_top_logprobs_of_the_raw_distribution():
    """probs [0.5, 0.3, 0.2], chosen token 1: log 0.3; top-2 are tokens 0 and 1."""
    picked, ids, values = S.top_logprobs(probs_logits(0.5, 0.3, 0.2), torch.tensor([1]), 2)
    assert math.isclose(float(picked[0]), math.log(0.3), rel_tol=1e-5)
    assert ids.tolist() == [[0, 1]] and torch.allclose(values, torch.log(torch.tensor([[0.5, 0.3]])))
    assert S.top_logprobs(probs_logits(0.5, 0.5), torch.tensor([0]), 0)[1].shape == (1, 0)


def test_find_stop_returns_the_earliest_stop():
    assert S.find_stop("hello world", ("ld", "o w")) == 4
    assert S.find_stop("hello world", ("xyz",)) is None
    assert S.find_stop("hello", ("",)) is None


def test_held_back_is_the_longest_suffix_that_could_start_a_stop():
    assert S.held_back("abc", ("cde",)) == 1
    assert S.held_back("abcd", ("cdx", "dzz")) == 2
    assert S.held_back("abc", ("xyz",)) == 0
    assert S.held_back("abc", ("c",)) == 0  # a one-character stop is either found or not
    assert S.held_back("", ("abc",)) == 0


def test_logit_bias_adds_per_row_and_accumulates_nothing_else():
    """Row 0: +1.5 on token 2 → [0, 0, 1.5]; row 1: −100 on token 0 and +2 on 1 → [−100, 2, 0]."""
    out = S.apply_logit_bias(torch.zeros(2, 3), [((2, 1.5),), ((0, -100.0), (1, 2.0))])
    assert out.tolist() == [[0.0, 0.0, 1.5], [-100.0, 2.0, 0.0]]
    same = torch.zeros(1, 3)
    assert S.apply_logit_bias(same, [()]) is same


def test_bias_then_mask_then_greedy():
    """Logits [3, 1, 2]; +5 on token 1 makes it 6, the top; a mask forbidding 1 leaves [3, −inf, 2]
    → token 0. A −100 bias on token 0 of a free row moves greedy to token 2."""
    logits = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0]])
    params = [SamplingParams(temperature=0, logit_bias=((1, 5.0),)), SamplingParams(temperature=0, logit_bias=((0, -100.0),))]
    allowed = torch.tensor([[True, False, True], [True, True, True]])
    assert S.next_tokens(logits, params, [None, None]).tolist() == [1, 2]
    assert S.next_tokens(logits, params, [None, None], allowed=allowed).tolist() == [0, 2]


def test_masked_tokens_are_never_sampled():
    """Only token 2 allowed: every draw at temperature 1, even with top-p 0.5, is token 2."""
    g = S.make_generator(0)
    params = [SamplingParams(temperature=1.0, top_p=0.5)]
    allowed = torch.tensor([[False, False, True, False]])
    draws = {int(S.next_tokens(torch.tensor([[5.0, 4.0, 0.0, 3.0]]), params, [g], allowed=allowed)[0])
             for _ in range(20)}
    assert draws == {2}


def test_text_step_holds_back_a_possible_stop_then_cuts_at_it():
    """stop "END": "abcE" may be its start, so "abc" goes out and "E" waits; "abcEN" still waits;
    "abcEND!" cuts at index 3: nothing more is sent and the choice ends with `stop`."""
    p = SamplingParams(max_tokens=10, stop=("END",))
    assert S.text_step("abcE", 0, p, 1) == ("abc", 3, None)
    assert S.text_step("abcEN", 3, p, 2) == ("", 3, None)
    assert S.text_step("abcEND!", 3, p, 3) == ("", 3, "stop")


def test_text_step_finish_order_eos_stop_grammar_length():
    """eos wins over everything and sends the rest; then a stop sequence; then a complete grammar;
    max_tokens last. An incomplete character (U+FFFD at the end) is held back until finished."""
    p = SamplingParams(max_tokens=2, stop=("x",))
    assert S.text_step("abx", 0, p, 2, eos=True) == ("abx", 3, "eos")
    assert S.text_step("abx", 0, p, 2, complete=True) == ("ab", 2, "stop")
    assert S.text_step("ab", 0, p, 2, complete=True) == ("ab", 2, "stop")
    assert S.text_step("ab", 0, p, 2) == ("ab", 2, "length")
    assert S.text_step("ab\ufffd", 0, SamplingParams(max_tokens=5), 1) == ("ab", 2, None)
