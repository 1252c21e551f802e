"""Metrics against hand computations on small hand-made logits, and perplexity on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mechedit.metrics import (
    candidate_accuracy,
    logit_diff,
    logits_at,
    mean_nll,
    normalized_logit_diff,
    perplexity,
    target_logprob,
    target_prob,
    top1_correct,
)


@pytest.fixture
def logits():
    """batch 2, pos 3, vocab 4. Row 0 is unpadded (read position 2), row 1 is right-padded after
    position 1 (read position 1); the pad position holds junk that must never be read."""
    out = torch.zeros(2, 3, 4)
    out[0, 2] = torch.tensor([1.0, 2.0, 3.0, 4.0]).log()  # softmax = [.1, .2, .3, .4]
    out[1, 1] = torch.tensor([5.0, 1.0, 3.0, 1.0]).log()  # softmax = [.5, .1, .3, .1]
    out[1, 2] = torch.tensor([100.0, -100.0, 0.0, 0.0])  # padding
    return out


POSITIONS = torch.tensor([2, 1])


def test_logits_at_reads_each_rows_position(logits):
    torch.testing.assert_close(
        logits_at(logits, POSITIONS), torch.stack([logits[0, 2], logits[1, 1]])
    )
    torch.testing.assert_close(logits_at(logits, -1), logits[:, 2])
    with pytest.raises(ValueError, match=r"logits must be \[batch, pos, vocab\]"):
        logits_at(logits[:, 0], POSITIONS)
    with pytest.raises(ValueError, match="out of range"):
        logits_at(logits, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"shape \[batch\]"):
        logits_at(logits, torch.tensor([2, 1, 0]))


def test_logit_diff_by_hand(logits):
    # row 0: log 4 - log 1; row 1: log 5 - log 3
    expected = torch.tensor([math.log(4), math.log(5 / 3)])
    torch.testing.assert_close(logit_diff(logits, [3, 0], [0, 2], POSITIONS), expected)
    # swapping answer and wrong flips the sign
    torch.testing.assert_close(logit_diff(logits, [0, 2], [3, 0], POSITIONS), -expected)
    # reading the last position of a padded row gives a different (wrong) number: positions matter
    assert not torch.allclose(logit_diff(logits, [3, 0], [0, 2], -1), expected)
    with pytest.raises(ValueError, match="answer_ids .* out of range"):
        logit_diff(logits, [4, 0], [0, 2], POSITIONS)


def test_normalized_logit_diff():
    clean, corrupt = torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 3.0])
    torch.testing.assert_close(normalized_logit_diff(corrupt, clean, corrupt), torch.zeros(2))
    torch.testing.assert_close(normalized_logit_diff(clean, clean, corrupt), torch.ones(2))
    torch.testing.assert_close(
        normalized_logit_diff(torch.tensor([0.5, 1.0]), clean, corrupt), torch.tensor([0.5, 0.5])
    )
    assert float(normalized_logit_diff(1.0, 3.0, -1.0)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no signal"):
        normalized_logit_diff(
            torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0])
        )


def test_target_prob_and_logprob_by_hand(logits):
    torch.testing.assert_close(target_prob(logits, [1, 2], POSITIONS), torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(
        target_logprob(logits, torch.tensor([3, 0]), POSITIONS), torch.tensor([0.4, 0.5]).log()
    )
    # a scalar target id is used for every row
    torch.testing.assert_close(target_prob(logits, 2, POSITIONS), torch.tensor([0.3, 0.3]))


def test_top1_correct(logits):
    assert top1_correct(logits, [3, 0], POSITIONS).tolist() == [True, True]
    assert top1_correct(logits, [2, 2], POSITIONS).tolist() == [False, False]
    flat = torch.zeros(1, 1, 4)
    assert top1_correct(flat, [1], 0).tolist() == [False]  # a tie is not a win


def test_candidate_accuracy_renormalises_over_the_candidates(logits):
    # row 0 candidates (0, 2): probs .1, .3 -> .25, .75 ; row 1 candidates (2, 3): .3, .1 -> .75, .25
    result = candidate_accuracy(logits, [[0, 2], [2, 3]], [1, 1], POSITIONS)
    torch.testing.assert_close(result.probs, torch.tensor([[0.25, 0.75], [0.75, 0.25]]))
    torch.testing.assert_close(result.answer_probs, torch.tensor([0.75, 0.25]))
    assert result.correct.tolist() == [True, False]
    assert result.accuracy == 0.5
    # one candidate set for every row, answer index as a scalar
    shared = candidate_accuracy(logits, [1, 2, 3], 2, POSITIONS)
    torch.testing.assert_close(shared.probs, torch.tensor([[2 / 9, 3 / 9, 4 / 9], [0.2, 0.6, 0.2]]))
    assert shared.correct.tolist() == [True, False]
    # ties count as wrong
    tie = candidate_accuracy(logits, [1, 3], 0, POSITIONS)
    assert tie.correct.tolist() == [False, False]
    with pytest.raises(ValueError, match="repeats a token id"):
        candidate_accuracy(logits, [2, 2], 0, POSITIONS)
    with pytest.raises(ValueError, match="answer_index .* out of range"):
        candidate_accuracy(logits, [1, 2], 2, POSITIONS)
    with pytest.raises(ValueError, match="k >= 2"):
        candidate_accuracy(logits, [[1], [2]], 0, POSITIONS)


@settings(max_examples=10, deadline=None)
@given(shift=st.floats(-50, 50), scale=st.floats(0.1, 10))
def test_logit_metrics_invariant_to_a_per_row_shift(shift, scale):
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(3, 2, 6, generator=generator, dtype=torch.float64) * scale
    shifted = base + shift
    pos = torch.tensor([1, 0, 1])
    torch.testing.assert_close(
        logit_diff(shifted, [0, 1, 2], [3, 4, 5], pos), logit_diff(base, [0, 1, 2], [3, 4, 5], pos)
    )
    torch.testing.assert_close(
        target_logprob(shifted, [0, 1, 2], pos), target_logprob(base, [0, 1, 2], pos)
    )
    torch.testing.assert_close(
        candidate_accuracy(shifted, [0, 5], 1, pos).probs,
        candidate_accuracy(base, [0, 5], 1, pos).probs,
    )


# ---------------------------------------------------------------------------------------------
# Perplexity on the tiny model
# ---------------------------------------------------------------------------------------------

TEXTS = ["w1 w2 w3 w4 w5 w6", "w7", "w8 w9 w10", "w11 w12 w13 w14 w15 w16 w17 w18 w19"]


def manual_mean_nll(model, texts, *, prepend_bos=True):
    """One text at a time, no padding: cross-entropy of each next token, pooled over all texts."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            tokens = model.to_tokens(text, prepend_bos=prepend_bos)
            logits = model(tokens)
            total += float(F.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="sum"))
            count += tokens.shape[1] - 1
    return total / count


def test_perplexity_matches_manual_cross_entropy(tiny_bridge):
    expected = manual_mean_nll(tiny_bridge, TEXTS)
    assert mean_nll(tiny_bridge, TEXTS, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny_bridge, TEXTS, batch_size=1) == pytest.approx(
        math.exp(expected), rel=1e-5
    )


def test_perplexity_does_not_depend_on_batch_size(tiny_bridge):
    # batch_size 4 pads three of the four texts; padding must not change the result
    values = [perplexity(tiny_bridge, TEXTS, batch_size=b) for b in (1, 3, 4)]
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert values[2] == pytest.approx(values[0], rel=1e-5)


def test_perplexity_without_bos(tiny_bridge):
    expected = manual_mean_nll(tiny_bridge, TEXTS, prepend_bos=False)
    got = mean_nll(tiny_bridge, TEXTS, batch_size=4, prepend_bos=False)
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="no tokens to score"):
        perplexity(tiny_bridge, ["w1", "w2"], prepend_bos=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        perplexity(tiny_bridge, TEXTS, batch_size=0)
