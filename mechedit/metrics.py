"""Metrics on a model's predictions: one function each, batched, formula, sign and units stated.

Two families:

- **Next-token metrics** take ``logits [batch, pos, vocab]`` plus ``positions [batch]``, the
  index whose logits predict the answer, i.e. each prompt's last real token (``last_positions`` of
  a tokenised batch). Per-row positions are what make right-padded batches correct; a single int
  (e.g. ``-1``) is accepted for batches without padding. Each returns one value per row
  (``[batch]``); average it yourself so that the aggregation is visible where it is used.
- **Sequence metrics** score every token of a sequence: the teacher-forced log-probability of a
  multi-token continuation (``continuation_logprobs``; ``score_continuations`` tokenises and runs
  the model), per-token cross-entropy with labels (``token_cross_entropy``, HF's
  ``ignore_index=-100`` convention) and the KL divergence of an edited model's predictions from a
  reference model's (``kl_divergence`` per position, ``mean_kl_divergence`` over a mask). They
  return per-token values plus what to aggregate them with.

Log-probabilities, cross-entropies and KL divergences are in nats (natural log). Half-precision
logits are upcast to float32 before any softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechedit.tokens import tokenize_continuations, tokenize_prompts

__all__ = [
    "IGNORE_INDEX",
    "PAIR_METRICS",
    "PairMetric",
    "pair_metric",
    "CandidateAccuracy",
    "ContinuationLogprobs",
    "candidate_accuracy",
    "continuation_logprobs",
    "kl_divergence",
    "logit_diff",
    "logits_at",
    "mean_kl_divergence",
    "mean_nll",
    "next_token_labels",
    "normalized_logit_diff",
    "perplexity",
    "score_continuations",
    "target_logprob",
    "target_prob",
    "token_cross_entropy",
    "top1_correct",
]

IdsLike = Tensor | Sequence[int] | int


def _ids(values: IdsLike, *, batch: int, name: str, device: torch.device) -> Int[Tensor, " batch"]:
    """Token ids or indices as a ``[batch]`` long tensor; a scalar is broadcast to every row."""
    t = torch.as_tensor(values, device=device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integer ids, got dtype {t.dtype}")
    t = t.long()
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape [batch]=({batch},), got {tuple(t.shape)}")
    return t


def logits_at(
    logits: Float[Tensor, "batch pos vocab"], positions: Int[Tensor, " batch"] | Sequence[int] | int
) -> Float[Tensor, "batch vocab"]:
    """The logits at one position per row: ``out[b] = logits[b, positions[b]]``.

    ``positions`` may be negative (Python-style, from the end of each row's padded length).
    Raises ``ValueError`` for logits that are not 3-D or positions out of range.
    """
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"logits must be [batch, pos, vocab], got {shape}; pass the model's full output"
        )
    batch, n_pos, _ = logits.shape
    pos = _ids(positions, batch=batch, name="positions", device=logits.device)
    if batch and (pos.min() < -n_pos or pos.max() >= n_pos):
        raise ValueError(f"positions {pos.tolist()} out of range for {n_pos} positions")
    pos = pos % n_pos
    return logits[torch.arange(batch, device=logits.device), pos]


def _gather(rows: Float[Tensor, "batch vocab"], ids: IdsLike, name: str) -> Float[Tensor, " batch"]:
    idx = _ids(ids, batch=rows.shape[0], name=name, device=rows.device)
    if rows.shape[0] and (idx.min() < 0 or idx.max() >= rows.shape[1]):
        raise ValueError(f"{name} {idx.tolist()} out of range for a vocabulary of {rows.shape[1]}")
    return rows.gather(1, idx[:, None])[:, 0]


def logit_diff(
    logits: Float[Tensor, "batch pos vocab"],
    answer_ids: Int[Tensor, " batch"] | Sequence[int] | int,
    wrong_ids: Int[Tensor, " batch"] | Sequence[int] | int,
    positions: Int[Tensor, " batch"] | Sequence[int] | int,
) -> Float[Tensor, " batch"]:
    """Logit difference ``logits[b, p_b, answer_b] - logits[b, p_b, wrong_b]`` (raw logits, nats).

    Positive: the model prefers the answer over the wrong answer; larger is more confident.
    """
    rows = logits_at(logits, positions)
    return _gather(rows, answer_ids, "answer_ids") - _gather(rows, wrong_ids, "wrong_ids")


def normalized_logit_diff(
    patched: Float[Tensor, "*batch"] | float,
    clean: Float[Tensor, "*batch"] | float,
    corrupt: Float[Tensor, "*batch"] | float,
    *,
    eps: float = 1e-6,
) -> Float[Tensor, "*batch"]:
    """``(patched - corrupt) / (clean - corrupt)``: 0 at the corrupt baseline, 1 at clean.

    Inputs are logit differences (``logit_diff`` outputs or their means), broadcast together.
    Above 1 the patch overshoots clean; below 0 it pushes past corrupt.

    Raises:
        ValueError: ``|clean - corrupt| <= eps`` anywhere: that clean/corrupt pair carries no
            signal to normalise by (drop it or average over pairs first).
    """
    patched, clean, corrupt = (
        x if isinstance(x, Tensor) else torch.tensor(float(x)) for x in (patched, clean, corrupt)
    )
    gap = clean - corrupt
    flat = gap.reshape(-1)
    bad = (flat.abs() <= eps).nonzero()
    if len(bad):
        raise ValueError(
            f"clean and corrupt logit differences are equal (|clean - corrupt| <= {eps}) at "
            f"flat index {bad[0, 0].item()}: the pair gives no signal. Drop such pairs or "
            "normalise batch means instead."
        )
    return (patched - corrupt) / gap


def target_logprob(
    logits: Float[Tensor, "batch pos vocab"],
    target_ids: Int[Tensor, " batch"] | Sequence[int] | int,
    positions: Int[Tensor, " batch"] | Sequence[int] | int,
) -> Float[Tensor, " batch"]:
    """``log softmax(logits[b, p_b])[target_b]`` over the whole vocabulary, in nats (<= 0).

    Higher (closer to 0) means the model puts more mass on the target.
    """
    return _gather(logits_at(logits, positions).log_softmax(-1), target_ids, "target_ids")


def target_prob(
    logits: Float[Tensor, "batch pos vocab"],
    target_ids: Int[Tensor, " batch"] | Sequence[int] | int,
    positions: Int[Tensor, " batch"] | Sequence[int] | int,
) -> Float[Tensor, " batch"]:
    """``softmax(logits[b, p_b])[target_b]`` over the whole vocabulary, in [0, 1]; higher = surer."""
    return target_logprob(logits, target_ids, positions).exp()


def top1_correct(
    logits: Float[Tensor, "batch pos vocab"],
    target_ids: Int[Tensor, " batch"] | Sequence[int] | int,
    positions: Int[Tensor, " batch"] | Sequence[int] | int,
) -> Bool[Tensor, " batch"]:
    """True where the target's logit is strictly above every other token's (greedy next token).

    A tie counts as wrong, so a model with flat logits gets no credit.
    """
    rows = logits_at(logits, positions)
    idx = _ids(target_ids, batch=rows.shape[0], name="target_ids", device=rows.device)
    target = _gather(rows, idx, "target_ids")
    others = rows.scatter(1, idx[:, None], float("-inf"))
    return target > others.max(-1).values


@dataclass(frozen=True)
class CandidateAccuracy:
    """Accuracy over a candidate set (one row per prompt).

    Attributes:
        correct: ``Bool[batch]``, True where the answer's logit is strictly the highest among the
            row's candidates (ties count as wrong).
        probs: ``Float[batch, k]``, softmax over the candidates' logits only (rows sum to 1).
        answer_probs: ``Float[batch]``, the answer's column of ``probs``.
    """

    correct: Bool[Tensor, " batch"]
    probs: Float[Tensor, "batch k"]
    answer_probs: Float[Tensor, " batch"]

    def __post_init__(self) -> None:
        batch = self.correct.shape
        if (
            self.probs.ndim != 2
            or self.probs.shape[:1] != batch
            or self.answer_probs.shape != batch
        ):
            raise ValueError(
                "CandidateAccuracy needs correct [batch], probs [batch, k], answer_probs [batch]"
            )

    @property
    def accuracy(self) -> float:
        """Fraction of rows answered correctly, in [0, 1] (NaN for an empty batch)."""
        return float(self.correct.float().mean()) if self.correct.numel() else float("nan")


def candidate_accuracy(
    logits: Float[Tensor, "batch pos vocab"],
    candidate_ids: Int[Tensor, "batch k"] | Sequence[Sequence[int]] | Sequence[int],
    answer_index: Int[Tensor, " batch"] | Sequence[int] | int,
    positions: Int[Tensor, " batch"] | Sequence[int] | int,
) -> CandidateAccuracy:
    """Accuracy of choosing the answer among ``k`` candidates, softmax renormalised over them.

    ``probs[b] = softmax(logits[b, p_b, candidate_ids[b]])`` (the rest of the vocabulary is
    ignored); ``correct[b]`` is True when ``candidate_ids[b, answer_index[b]]`` has the strictly
    highest logit of its row. ``candidate_ids`` may be ``[k]`` to use one set for every row.
    Higher is better for both.
    """
    rows = logits_at(logits, positions)
    batch, vocab = rows.shape
    cands = torch.as_tensor(candidate_ids, device=rows.device)
    if cands.is_floating_point():
        raise ValueError(f"candidate_ids must be integer ids, got dtype {cands.dtype}")
    cands = cands.long()
    if cands.ndim == 1:
        cands = cands.expand(batch, -1)
    if cands.ndim != 2 or cands.shape[0] != batch or cands.shape[1] < 2:
        raise ValueError(
            f"candidate_ids must be [batch, k] or [k] with k >= 2, got {tuple(cands.shape)}"
        )
    if batch and (cands.min() < 0 or cands.max() >= vocab):
        raise ValueError(f"candidate_ids out of range for a vocabulary of {vocab}")
    sorted_ids = cands.sort(-1).values
    if (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any():
        raise ValueError(
            "a row of candidate_ids repeats a token id; candidates must be distinct tokens"
        )
    k = cands.shape[1]
    idx = _ids(answer_index, batch=batch, name="answer_index", device=rows.device)
    if batch and (idx.min() < 0 or idx.max() >= k):
        raise ValueError(f"answer_index {idx.tolist()} out of range for {k} candidates")
    cand_logits = rows.gather(1, cands)
    answer = cand_logits.gather(1, idx[:, None])[:, 0]
    others = cand_logits.scatter(1, idx[:, None], float("-inf"))
    probs = cand_logits.softmax(-1)
    return CandidateAccuracy(
        correct=answer > others.max(-1).values,
        probs=probs,
        answer_probs=probs.gather(1, idx[:, None])[:, 0],
    )


def mean_nll(
    model: Any, texts: Sequence[str], *, batch_size: int = 8, prepend_bos: bool | None = None
) -> float:
    """Token-level mean negative log-likelihood of ``texts`` under ``model``, in nats per token.

    ``sum over texts and t of -log p(x[t+1] | x[..t]) / number of such terms``: pooled over every
    predicted real token of every text (a long text weighs more than a short one), excluding
    padding and the first token of each text, which nothing predicts (with BOS prepended that is
    BOS, so the first word *is* scored, given BOS). Lower is better. Batches are right-padded and
    padding is never scored, so the value does not depend on ``batch_size``.

    Raises:
        ValueError: no texts, no token to score (e.g. one-word texts with ``prepend_bos=False``),
            or a text longer than the model's context.
    """
    if isinstance(texts, str):
        raise ValueError(f"pass a list of texts, not one string: [{texts!r}]")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenize_prompts(
                model,
                texts[start : start + batch_size],
                prepend_bos=prepend_bos,
                padding_side="right",  # real positions then see exactly the unpadded context
            )
            tokens = batch.tokens  # on the model's device
            logits = model(tokens)
            scored = batch.attention_mask[:, 1:].to(logits.device)
            # Selecting the scored rows first keeps the sum independent of how much padding
            # a batch carries (bit for bit: the zoo's recorded perplexities depend on it).
            total += float(
                token_cross_entropy(
                    logits[:, :-1][scored], tokens[:, 1:][scored].to(logits.device), reduction="sum"
                )
            )
            count += int(scored.sum())
    if count == 0:
        raise ValueError(
            "no tokens to score: pass at least one text of two or more tokens (BOS counts)"
        )
    return total / count


def perplexity(
    model: Any, texts: Sequence[str], *, batch_size: int = 8, prepend_bos: bool | None = None
) -> float:
    """Perplexity ``exp(mean_nll(model, texts))``: >= 1, lower is better (1 = certain).

    See ``mean_nll`` for which tokens count. ``prepend_bos=None`` follows the model's
    ``cfg.default_prepend_bos`` as ``model.to_tokens`` does.
    """
    return math.exp(mean_nll(model, texts, batch_size=batch_size, prepend_bos=prepend_bos))


# --------------------------------------------------------------------------------------------
# Sequence metrics: cross-entropy with labels, continuation log-probabilities, KL to a reference
# --------------------------------------------------------------------------------------------

IGNORE_INDEX = -100
"""The label that marks a position as not scored, as in Hugging Face and ``F.cross_entropy``."""


def _float_logits(logits: Tensor) -> Tensor:
    """Half-precision logits upcast to float32 (a softmax in fp16 loses the tail); others as-is."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _check_logits(logits: Any, name: str, *, min_ndim: int = 2) -> None:
    if not isinstance(logits, Tensor) or logits.ndim < min_ndim or not logits.is_floating_point():
        what = (
            f"{tuple(logits.shape)} {logits.dtype}"
            if isinstance(logits, Tensor)
            else type(logits).__name__
        )
        raise ValueError(
            f"{name} must be a floating tensor [..., vocab] with >= {min_ndim} axes, got {what}"
        )


def next_token_labels(
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Bool[Tensor, "batch pos"] | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> Int[Tensor, "batch pos_minus_1"]:
    """Next-token labels aligned with ``logits[:, :-1]``: ``labels[b, t] = tokens[b, t + 1]``.

    A label is ``ignore_index`` unless both the predicting token ``t`` and the predicted token
    ``t + 1`` are real (``attention_mask`` True), so padding is never scored on either side,
    under right or left padding. Without a mask every label is kept.

    These labels are already shifted: pair them with ``logits[:, :-1]`` in
    ``token_cross_entropy``. (Hugging Face's ``model(input_ids, labels=...)`` takes unshifted
    labels and shifts them inside the model.)
    """
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        raise ValueError("tokens must be an integer [batch, pos] tensor")
    labels = tokens[:, 1:].long()
    if attention_mask is None:
        return labels.clone()
    if attention_mask.shape != tokens.shape or attention_mask.dtype != torch.bool:
        raise ValueError(
            f"attention_mask must be a bool tensor of the tokens' shape {tuple(tokens.shape)}, "
            f"got {attention_mask.dtype} {tuple(attention_mask.shape)}"
        )
    scored = attention_mask[:, 1:] & attention_mask[:, :-1]
    return labels.masked_fill(~scored.to(labels.device), ignore_index)


def token_cross_entropy(
    logits: Float[Tensor, "*pos vocab"],
    labels: Int[Tensor, "*pos"],
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Float[Tensor, "*pos"] | Float[Tensor, ""]:
    """Cross-entropy of each label under the logits at the same index, in nats.

    ``ce[i] = -log softmax(logits[i])[labels[i]]`` (>= 0; 0 = certain of the label; lower is
    better), and ``ce[i] = 0`` where ``labels[i] == ignore_index``. ``logits[i]`` scores
    ``labels[i]``: no shift happens here (for next-token prediction use ``logits[:, :-1]`` with
    ``next_token_labels``). Equal to ``F.cross_entropy`` with the same ``ignore_index``.

    Args:
        logits: ``[*pos, vocab]``, e.g. ``[batch, pos, vocab]``.
        labels: ``[*pos]`` token ids or ``ignore_index``.
        reduction: ``"none"`` (the ``[*pos]`` tensor), ``"sum"`` over scored labels, or
            ``"mean"``: that sum divided by the number of scored labels (pooled over every
            scored token, as Hugging Face's language-model loss).

    Raises:
        ValueError: mismatched shapes, non-integer labels, a label outside the vocabulary, or
            ``reduction="mean"`` with no label to score (the mean would be NaN).
    """
    _check_logits(logits, "logits")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("labels must be an integer tensor of token ids (or ignore_index)")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but logits {tuple(logits.shape)}: labels "
            "must match logits without the vocabulary axis (for next-token labels pass "
            "logits[:, :-1] with next_token_labels(tokens))"
        )
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    vocab = logits.shape[-1]
    scored = labels != ignore_index
    if ((labels < 0) | (labels >= vocab))[scored].any():
        bad = labels[scored & ((labels < 0) | (labels >= vocab))]
        raise ValueError(
            f"labels {bad[:5].tolist()} out of range for a vocabulary of {vocab} (use "
            f"{ignore_index} for positions not to score)"
        )
    if reduction == "mean" and not scored.any():
        raise ValueError(f"no label to score: every label is ignore_index ({ignore_index})")
    ce = F.cross_entropy(
        _float_logits(logits).reshape(-1, vocab),
        labels.long().reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return ce.reshape(labels.shape) if reduction == "none" else ce


@dataclass(frozen=True)
class ContinuationLogprobs:
    """Teacher-forced log-probabilities of continuations, token by token (nats).

    Attributes:
        token_logprobs: ``Float[batch, k]``, ``log p(c_j | prompt, c_<j)`` for continuation token
            ``j`` of each row (<= 0; higher = more expected); exactly 0 past a row's end. ``k`` is
            the longest continuation.
        mask: ``Bool[batch, k]``, True at real continuation tokens.
    """

    token_logprobs: Float[Tensor, "batch k"]
    mask: Bool[Tensor, "batch k"]

    def __post_init__(self) -> None:
        if self.token_logprobs.ndim != 2 or self.mask.shape != self.token_logprobs.shape:
            raise ValueError("ContinuationLogprobs needs token_logprobs and mask of one [batch, k]")

    @property
    def total(self) -> Float[Tensor, " batch"]:
        """``Float[batch]``: ``sum_j token_logprobs[b, j]`` = ``log p(continuation | prompt)``
        (<= 0, nats). Longer continuations score lower; compare equal lengths or use ``mean``."""
        return self.token_logprobs.sum(-1)

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """``Int[batch]``: tokens in each continuation."""
        return self.mask.sum(-1)

    @property
    def mean(self) -> Float[Tensor, " batch"]:
        """``Float[batch]``: ``total / lengths``, nats per token; ``exp(mean)`` is the
        geometric-mean probability of the continuation's tokens."""
        return self.total / self.lengths


def continuation_logprobs(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    starts: Int[Tensor, " batch"] | Sequence[int],
    lengths: Int[Tensor, " batch"] | Sequence[int],
) -> ContinuationLogprobs:
    """Log-probability of each continuation token given everything before it (teacher forcing).

    ``token_logprobs[b, j] = log softmax(logits[b, starts[b] + j - 1])[tokens[b, starts[b] + j]]``
    for ``j < lengths[b]``: continuation token ``j`` sits at position ``starts[b] + j`` and is
    predicted by the logits one position earlier, so ``starts[b] >= 1`` (with a BOS-first row
    and an empty prompt, ``starts[b] == 1``: BOS predicts the first token). ``logits`` are the
    model's output for ``tokens`` in one forward pass; padding anywhere outside the spans is
    never read. ``total`` of the result is ``log p(continuation | prompt)``.

    Build the inputs with ``mechedit.tokens.tokenize_continuations`` (its
    ``continuation_starts``/``continuation_lengths``), or let ``score_continuations`` do all of
    it. Differentiable with respect to ``logits``.

    Raises:
        ValueError: mismatched shapes, or a span that starts at 0, is empty, or runs past ``pos``.
    """
    _check_logits(logits, "logits", min_ndim=3)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, pos, vocab], got {tuple(logits.shape)}")
    batch, n_pos, vocab = logits.shape
    if not isinstance(tokens, Tensor) or tuple(tokens.shape) != (batch, n_pos):
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be [batch, pos] = {(batch, n_pos)}, got {shape}")
    device = logits.device
    starts = _ids(starts, batch=batch, name="starts", device=device)
    lengths = _ids(lengths, batch=batch, name="lengths", device=device)
    if batch and (starts.min() < 1 or lengths.min() < 1 or (starts + lengths).max() > n_pos):
        raise ValueError(
            f"continuation spans (starts {starts.tolist()}, lengths {lengths.tolist()}) must "
            f"start at >= 1, hold >= 1 token and end within {n_pos} positions"
        )
    width = int(lengths.max()) if batch else 0
    offsets = torch.arange(width, device=device)
    mask = offsets < lengths[:, None]  # [batch, k]
    # Past a row's end the clamped index reads a real position; the mask zeroes it afterwards.
    where = (starts[:, None] + offsets).clamp(max=n_pos - 1)  # position of continuation token j
    rows = torch.arange(batch, device=device)[:, None]
    predicting = _float_logits(logits)[rows, where - 1]  # [batch, k, vocab]
    targets = tokens.to(device).long().gather(1, where)
    if batch and (targets[mask].min() < 0 or targets[mask].max() >= vocab):
        raise ValueError(f"tokens out of range for a vocabulary of {vocab}")
    logprobs = predicting.log_softmax(-1).gather(-1, targets.clamp(0, vocab - 1)[..., None])[..., 0]
    return ContinuationLogprobs(logprobs.masked_fill(~mask, 0.0), mask)


def score_continuations(
    model: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    prepend_bos: bool | None = None,
    sep: str = " ",
    batch_size: int = 32,
) -> ContinuationLogprobs:
    """``log p(continuation | prompt)`` under ``model`` for each pair, token by token (no grad).

    Tokenises with ``mechedit.tokens.tokenize_continuations`` (the continuation's tokens in the
    context of its prompt; an empty prompt scores the continuation given BOS alone), right-pads
    ``batch_size`` rows at a time on the model's device, runs the model once per batch and reads
    ``continuation_logprobs``. Padding never changes a value: a right-padded row's real positions
    see exactly the unpadded context.

    BOS: ``prepend_bos=None`` follows ``model.cfg.default_prepend_bos`` as ``model.to_tokens``
    does. With BOS the first continuation token of an empty prompt is scored given BOS; without
    it an empty prompt is an error (nothing would predict that token).

    Runs under ``torch.no_grad()``; for a differentiable objective, call
    ``continuation_logprobs`` on your own forward pass.

    Returns:
        ``ContinuationLogprobs`` with ``token_logprobs [n, k]`` (0 past each row's end), ``mask``,
        and ``total [n]`` = the summed log-probability (nats, <= 0).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(prompts, str) or isinstance(continuations, str):
        raise ValueError("pass lists of prompts and continuations, not single strings")
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    parts = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = tokenize_continuations(
                model,
                prompts[start : start + batch_size],
                continuations[start : start + batch_size],
                prepend_bos=prepend_bos,
                padding_side="right",
                sep=sep,
            )
            out = model(batch.tokens)
            logits = out.logits if hasattr(out, "logits") else out
            parts.append(
                continuation_logprobs(
                    logits, batch.tokens, batch.continuation_starts, batch.continuation_lengths
                )
            )
    if not parts:
        raise ValueError("no prompts to score")
    width = max(p.mask.shape[1] for p in parts)
    return ContinuationLogprobs(
        torch.cat([F.pad(p.token_logprobs, (0, width - p.mask.shape[1])) for p in parts]),
        torch.cat([F.pad(p.mask, (0, width - p.mask.shape[1])) for p in parts]),
    )


def kl_divergence(
    edited_logits: Float[Tensor, "*pos vocab"], reference_logits: Float[Tensor, "*pos vocab"]
) -> Float[Tensor, "*pos"]:
    """``KL(P_edited || P_reference)`` at every position, in nats.

    ``kl[i] = sum_v p_e(v) * (log p_e(v) - log p_r(v))`` with ``p_e = softmax(edited_logits[i])``
    and ``p_r = softmax(reference_logits[i])`` over the whole vocabulary. >= 0 (up to float
    rounding, ~1e-7), 0 exactly when the two next-token distributions agree; larger means the
    edit moved the prediction further. It is an expectation under the *edited* model, so it
    weighs the tokens the edited model now predicts; KL is asymmetric, and
    ``kl_divergence(reference_logits, edited_logits)`` gives ``KL(P_reference || P_edited)``,
    weighted by the reference model's predictions instead. Tokens with ``p_e(v) = 0`` (logit
    ``-inf``) contribute 0. Equal to ``F.kl_div(log p_r, log p_e, log_target=True)`` summed over
    the vocabulary. Differentiable in both arguments.

    Args:
        edited_logits, reference_logits: ``[*pos, vocab]`` of one shape, e.g. the two models'
            ``[batch, pos, vocab]`` outputs for the same tokens.

    Returns:
        ``[*pos]``: one value per position, padding included; average real positions with
        ``mean_kl_divergence``.
    """
    _check_logits(edited_logits, "edited_logits")
    _check_logits(reference_logits, "reference_logits")
    if edited_logits.shape != reference_logits.shape:
        raise ValueError(
            f"edited_logits {tuple(edited_logits.shape)} and reference_logits "
            f"{tuple(reference_logits.shape)} must have one shape (same tokens, same vocabulary)"
        )
    log_p = _float_logits(edited_logits).log_softmax(-1)
    log_q = _float_logits(reference_logits).log_softmax(-1).to(log_p.device)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def mean_kl_divergence(
    edited_logits: Float[Tensor, "*pos vocab"],
    reference_logits: Float[Tensor, "*pos vocab"],
    mask: Bool[Tensor, "*pos"] | None = None,
) -> Float[Tensor, ""]:
    """Mean of ``kl_divergence(edited_logits, reference_logits)`` over the positions in ``mask``.

    ``sum_i mask[i] * kl[i] / sum_i mask[i]`` (nats, >= 0): pooled over positions, so every
    masked position weighs the same and a longer row weighs more. Pass the tokenised batch's
    ``attention_mask`` to leave padding out; ``None`` averages every position.

    Raises:
        ValueError: a mask of the wrong shape or dtype, or one that selects no position.
    """
    kl = kl_divergence(edited_logits, reference_logits)
    if mask is None:
        return kl.mean()
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != kl.shape:
        what = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask)
        raise ValueError(f"mask must be a bool tensor of shape {tuple(kl.shape)}, got {what}")
    mask = mask.to(kl.device)
    if not mask.any():
        raise ValueError("mask selects no position; there is nothing to average")
    return torch.where(mask, kl, torch.zeros_like(kl)).sum() / mask.sum()


# --------------------------------------------------------------------------------------------
# Pair metrics: what patching methods measure on a clean/corrupt pair
# --------------------------------------------------------------------------------------------

#: ``metric(logits [R, vocab], answer_ids [R], wrong_ids [R]) -> [R]``: one value per row, from
#: the logits at each prompt's read position (its last real token).
PairMetric = Callable[[Tensor, Tensor, Tensor], Tensor]


def _pair_logit_diff(logits: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:
    return logits.gather(1, answer[:, None])[:, 0] - logits.gather(1, wrong[:, None])[:, 0]


def _pair_answer_logprob(logits: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:  # noqa: ARG001
    return logits.float().log_softmax(-1).gather(1, answer[:, None])[:, 0]


def _pair_answer_prob(logits: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:  # noqa: ARG001
    return logits.float().softmax(-1).gather(1, answer[:, None])[:, 0]


#: Pair metrics by name: ``logit_diff`` (answer minus wrong-answer logit, nats),
#: ``answer_logprob`` (log-probability of the answer, nats), ``answer_prob`` (its probability).
PAIR_METRICS: dict[str, PairMetric] = {
    "logit_diff": _pair_logit_diff,
    "answer_logprob": _pair_answer_logprob,
    "answer_prob": _pair_answer_prob,
}


def pair_metric(metric: str | PairMetric) -> tuple[str, PairMetric]:
    """``(name, fn)`` for a ``PAIR_METRICS`` name or a callable (named ``"custom"``)."""
    if callable(metric):
        return "custom", metric
    if metric not in PAIR_METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(PAIR_METRICS)} or a callable")
    return metric, PAIR_METRICS[metric]
