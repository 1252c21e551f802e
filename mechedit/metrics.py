"""Metrics on next-token predictions: one function each, batched, formula and direction stated.

Logit-based metrics take ``logits [batch, pos, vocab]`` plus ``positions [batch]``, the index
whose logits predict the answer, i.e. each prompt's last real token (``last_positions`` of a
tokenised batch). Per-row positions are what make right-padded batches correct; a single int
(e.g. ``-1``) is accepted for batches without padding. Every metric returns one value per row
(``[batch]``); average it yourself so that the aggregation is visible where it is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechedit.tokens import tokenize_prompts

__all__ = [
    "CandidateAccuracy",
    "candidate_accuracy",
    "logit_diff",
    "logits_at",
    "mean_nll",
    "normalized_logit_diff",
    "perplexity",
    "target_logprob",
    "target_prob",
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
    device = getattr(getattr(model, "cfg", None), "device", None) or "cpu"
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenize_prompts(
                model,
                texts[start : start + batch_size],
                prepend_bos=prepend_bos,
                padding_side="right",  # real positions then see exactly the unpadded context
            )
            tokens = batch.tokens.to(device)
            logits = model(tokens)
            scored = batch.attention_mask[:, 1:].to(logits.device)
            total += float(
                F.cross_entropy(
                    logits[:, :-1][scored].float(), tokens[:, 1:][scored], reduction="sum"
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
