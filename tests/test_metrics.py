"""Metrics against hand computations on small hand-made logits, and perplexity on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mechedit.metrics import (
    IGNORE_INDEX,
    candidate_accuracy,
    continuation_logprobs,
    kl_divergence,
    logit_diff,
    logits_at,
    mean_kl_divergence,
    mean_nll,
    next_token_labels,
    normalized_logit_diff,
    perplexity,
    score_continuations,
    target_logprob,
    target_prob,
    token_cross_entropy,
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


# ---------------------------------------------------------------------------------------------
# Cross-entropy with labels
# ---------------------------------------------------------------------------------------------


def test_next_token_labels_skip_padding_on_either_side():
    tokens = torch.tensor([[1, 2, 3, 0], [0, 0, 4, 5]])
    right = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert next_token_labels(tokens, right).tolist() == [[2, 3, -100], [0, -100, -100]]
    left = torch.tensor([[True, True, True, True], [False, False, True, True]])
    # row 1: position 1 is a pad, so the first real token (4) is not predicted from it
    assert next_token_labels(tokens, left).tolist() == [[2, 3, 0], [-100, -100, 5]]
    assert next_token_labels(tokens).tolist() == [[2, 3, 0], [0, 4, 5]]
    with pytest.raises(ValueError, match="attention_mask must be a bool tensor"):
        next_token_labels(tokens, right.long())


def test_token_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 3.0, 1.0]]).log()[None]  # [1, 2, 4]
    labels = torch.tensor([[2, IGNORE_INDEX]])
    ce = token_cross_entropy(logits, labels)
    torch.testing.assert_close(ce, torch.tensor([[-math.log(0.3), 0.0]]))
    labels = torch.tensor([[2, 0]])
    torch.testing.assert_close(
        token_cross_entropy(logits, labels, reduction="mean"),
        torch.tensor(-(math.log(0.3) + math.log(0.5)) / 2),
    )
    torch.testing.assert_close(
        token_cross_entropy(logits, labels, reduction="sum"),
        torch.tensor(-(math.log(0.3) + math.log(0.5))),
    )


def test_token_cross_entropy_equals_torch_and_the_zoo_training_loss():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    labels[0, 4] = labels[2, 1] = IGNORE_INDEX
    flat_logits, flat_labels = logits.reshape(-1, 11), labels.reshape(-1)
    for reduction in ("none", "sum", "mean"):
        expected = F.cross_entropy(flat_logits, flat_labels, reduction=reduction)
        got = token_cross_entropy(logits, labels, reduction=reduction)
        assert torch.equal(got.reshape(-1) if reduction == "none" else got, expected), reduction
    # the zoo trained with this exact expression: the metric must give the same bits
    pad = 0
    ids = torch.randint(1, 11, (3, 6), generator=generator)
    ids[1, 4:] = ids[2, 2:] = pad
    step_logits = torch.randn(3, 6, 11, generator=generator)[:, :-1]
    old = F.cross_entropy(
        step_logits.reshape(-1, 11),
        ids[:, 1:].masked_fill(ids[:, 1:] == pad, -100).reshape(-1),
        ignore_index=-100,
    )
    new = token_cross_entropy(step_logits, next_token_labels(ids, ids != pad), reduction="mean")
    assert torch.equal(new, old)
    # half precision is scored in float32
    assert token_cross_entropy(logits.half(), labels).dtype == torch.float32


def test_token_cross_entropy_errors():
    logits = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="labels must match logits without the vocabulary"):
        token_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels \[4\] out of range"):
        token_cross_entropy(logits, torch.tensor([[0, 1, 4], [0, 0, 0]]))
    with pytest.raises(ValueError, match="no label to score"):
        token_cross_entropy(logits, torch.full((2, 3), IGNORE_INDEX), reduction="mean")
    with pytest.raises(ValueError, match="integer tensor"):
        token_cross_entropy(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="reduction must be"):
        token_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), reduction="avg")


# ---------------------------------------------------------------------------------------------
# Continuation log-probabilities
# ---------------------------------------------------------------------------------------------


def test_continuation_logprobs_by_hand():
    # row 0: [BOS, p, c0, c1] continuation at 2..3 ; row 1: [BOS, c0, pad, pad] at 1..1
    probs = torch.full((2, 4, 4), 0.25)
    probs[0, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # predicts row 0's c0 = token 3 -> 0.4
    probs[0, 2] = torch.tensor([0.5, 0.1, 0.3, 0.1])  # predicts row 0's c1 = token 2 -> 0.3
    probs[1, 0] = torch.tensor([0.7, 0.1, 0.1, 0.1])  # BOS predicts row 1's c0 = token 0 -> 0.7
    logits = probs.log()
    logits[1, 1:] = torch.tensor([100.0, -100.0, 0.0, 0.0])  # padding junk, never read
    tokens = torch.tensor([[1, 2, 3, 2], [1, 0, 3, 3]])
    out = continuation_logprobs(logits, tokens, [2, 1], [2, 1])
    expected = torch.tensor([[0.4, 0.3], [0.7, 1.0]]).log()
    torch.testing.assert_close(out.token_logprobs, expected)  # log 1 = 0 past the end
    assert out.mask.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(out.total, torch.tensor([math.log(0.12), math.log(0.7)]))
    torch.testing.assert_close(out.mean, torch.tensor([math.log(0.12) / 2, math.log(0.7)]))
    assert out.lengths.tolist() == [2, 1]
    # the summed log-probability is minus the cross-entropy of the same tokens
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 1:3], labels[1, 0] = tokens[0, 2:4], tokens[1, 1]
    torch.testing.assert_close(
        out.total, -token_cross_entropy(logits, labels, reduction="none").sum(-1)
    )
    # differentiable: d total / d logits at a predicting position is onehot - softmax
    leaf = logits.clone().requires_grad_(True)
    continuation_logprobs(leaf, tokens, [2, 1], [2, 1]).total.sum().backward()
    torch.testing.assert_close(leaf.grad[0, 1], F.one_hot(torch.tensor(3), 4) - probs[0, 1])
    assert leaf.grad[1, 1:].abs().sum() == 0  # padding gets no gradient
    with pytest.raises(ValueError, match="start at >= 1"):
        continuation_logprobs(logits, tokens, [0, 1], [2, 1])
    with pytest.raises(ValueError, match="end within 4 positions"):
        continuation_logprobs(logits, tokens, [3, 1], [2, 1])


TEXT_PAIRS = [("w1 w2", "w3 w4 w5"), ("w6", "w7"), ("", "w8 w9"), ("w10 w11 w12 w13", "w14 w15")]


def _unpadded_logprobs(model, prompt, continuation):
    """One pair alone, through the bridge's own to_tokens: log p of each continuation token."""
    n_prompt = model.to_tokens(prompt).shape[1] if prompt else 1  # BOS alone for an empty prompt
    tokens = model.to_tokens(f"{prompt} {continuation}".strip())
    with torch.no_grad():
        logprobs = model(tokens)[0].log_softmax(-1)
    return torch.stack([logprobs[t - 1, tokens[0, t]] for t in range(n_prompt, tokens.shape[1])])


def test_score_continuations_matches_unpadded_runs(tiny_bridge):
    prompts, continuations = zip(*TEXT_PAIRS)
    scored = score_continuations(tiny_bridge, list(prompts), list(continuations), batch_size=3)
    assert scored.lengths.tolist() == [3, 1, 2, 2]
    for row, (prompt, continuation) in enumerate(TEXT_PAIRS):
        expected = _unpadded_logprobs(tiny_bridge, prompt, continuation)
        n = len(expected)
        torch.testing.assert_close(scored.token_logprobs[row, :n], expected, atol=1e-5, rtol=1e-5)
        assert (scored.token_logprobs[row, n:] == 0).all()
    one_by_one = score_continuations(tiny_bridge, list(prompts), list(continuations), batch_size=1)
    torch.testing.assert_close(one_by_one.total, scored.total, atol=1e-5, rtol=1e-5)
    # an empty prompt scores the whole text given BOS: minus its summed next-token loss
    alone = score_continuations(tiny_bridge, [""], ["w8 w9"])
    expected = -mean_nll(tiny_bridge, ["w8 w9"]) * 2
    assert alone.total.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="empty and no BOS"):
        score_continuations(tiny_bridge, [""], ["w8"], prepend_bos=False)


def test_zoo_continuation_logprobs_call_the_metric(tiny_bridge):
    from mechedit.zoo.measure import Encoder
    from mechedit.zoo.measure import continuation_logprobs as zoo_continuation_logprobs

    prompts, continuations = zip(*TEXT_PAIRS)
    zoo_lp, zoo_mask = zoo_continuation_logprobs(
        tiny_bridge,
        Encoder(tiny_bridge.tokenizer),
        list(prompts),
        list(continuations),
        batch_size=2,
    )
    scored = score_continuations(tiny_bridge, list(prompts), list(continuations), batch_size=4)
    assert torch.equal(zoo_mask, scored.mask)
    torch.testing.assert_close(zoo_lp, scored.token_logprobs, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# KL divergence to a reference
# ---------------------------------------------------------------------------------------------


def test_kl_divergence_by_hand_and_against_torch():
    edited = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()[None]  # [1, 2, 2]
    reference = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()[None]
    kl = kl_divergence(edited, reference)
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    torch.testing.assert_close(kl, torch.tensor([[by_hand, 0.0]]))
    # direction: the other way round weighs by the reference's probabilities, and differs
    other = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    torch.testing.assert_close(kl_divergence(reference, edited), torch.tensor([[other, 0.0]]))
    assert by_hand != pytest.approx(other)

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 7, 13, generator=generator).unbind(0)
    expected = F.kl_div(
        b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(kl_divergence(a, b), expected)
    assert (kl_divergence(a, b) > 0).all() and kl_divergence(a, a).abs().max() < 1e-6
    # a token the edited model rules out (logit -inf) contributes 0, not NaN
    banned = a.clone()
    banned[..., 0] = float("-inf")
    assert torch.isfinite(kl_divergence(banned, b)).all()
    with pytest.raises(ValueError, match="must have one shape"):
        kl_divergence(a, b[..., :12])


def test_mean_kl_divergence_over_a_mask():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 2, 3, 5, generator=generator).unbind(0)
    # a padding position where the two disagree completely (KL ~ 100 nats), left out by the mask
    a[1, 2] = torch.tensor([50.0, -50.0, -50.0, -50.0, -50.0])
    b[1, 2] = torch.tensor([-50.0, 50.0, -50.0, -50.0, -50.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    per_position = kl_divergence(a, b)
    expected = per_position[mask].sum() / 5
    torch.testing.assert_close(mean_kl_divergence(a, b, mask), expected)
    torch.testing.assert_close(mean_kl_divergence(a, b), per_position.mean())
    assert mean_kl_divergence(a, b) > 10 * mean_kl_divergence(a, b, mask)
    with pytest.raises(ValueError, match="selects no position"):
        mean_kl_divergence(a, b, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        mean_kl_divergence(a, b, mask.long())
