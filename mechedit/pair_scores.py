"""Scoring the two sides of contrastive pairs: tokenised sides, a side's score, its parameter gradients.

The shared maths under PCGU's ranking and update (``mechedit.locate.pcgu``, ``mechedit.edit.pcgu``)
and the bias metrics (``mechedit.evaluate.bias``): each of them scores the **advantaged** and the
**disadvantaged** side of ``ContrastivePair`` s the same way.

* **causal LM**: a side's score is the log-probability of the whole sequence, ``sum`` (default) or
  ``mean`` over its tokens, in nats (BOS is context, not scored);
* **masked LM**: the differing span is replaced by the tokenizer's own mask token (one mask per
  span token; both sides must tokenize to the same length there) and a side's score is its span
  tokens' ``logit`` at those masks (PCGU's paper), or their ``logprob``, summed over the span.

``scoring_mode`` picks the mode from the architecture (``MASKED_ARCHITECTURES``);
``tokenize_pair_sides`` builds a ``PairBatch`` (unusable pairs skipped and counted);
``side_scores`` turns a forward's logits into one score per pair, differentiably;
``pair_gradients`` sums d score / d parameter over the pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mechedit.data_pairs import ContrastivePair, differing_span, pair_problem, warn_skipped
from mechedit.gradients import parameter_gradients
from mechedit.hf import architecture
from mechedit.models import model_device
from mechedit.tokens import get_tokenizer, tokenize_prompts

# Architectures scored as masked LMs (the differing span masked); every other one as causal.
MASKED_ARCHITECTURES = frozenset({"BertForMaskedLM"})

SIDES = ("advantaged", "disadvantaged")


@dataclass(frozen=True)
class PairBatch:
    """Tokenised contrastive pairs, ready to score either side.

    Causal mode: ``inputs[side]`` are that side's tokens ``[n, pos]`` (BOS first, right-padded)
    and ``attention[side]`` their real-token masks. Masked mode: both sides share one input (the
    advantaged sentence with its span masked); ``targets[side]`` ``[n, pos]`` holds the side's
    token ids at the span positions (``span`` ``[n, pos]`` True there), 0 elsewhere.
    ``pairs`` are the pairs kept; ``skipped`` counts the others per reason.
    """

    mode: str
    pairs: tuple[ContrastivePair, ...]
    inputs: Mapping[str, Tensor]
    attention: Mapping[str, Tensor]
    span: Tensor | None
    targets: Mapping[str, Tensor] | None
    skipped: Mapping[str, int]

    def __len__(self) -> int:
        return len(self.pairs)

    def rows(self, sl: slice) -> PairBatch:
        """The pairs ``sl`` of this batch (padding columns kept)."""
        return self.take(range(len(self))[sl])

    def take(self, rows: Sequence[int]) -> PairBatch:
        """The pairs at indices ``rows``, in that order (padding columns kept)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        pick = lambda d: None if d is None else {k: v[index.to(v.device)] for k, v in d.items()}  # noqa: E731
        return PairBatch(
            self.mode, tuple(self.pairs[i] for i in index.tolist()), pick(self.inputs), pick(self.attention),
            None if self.span is None else self.span[index.to(self.span.device)], pick(self.targets),
            self.skipped,
        )


def scoring_mode(model: Any, mode: str = "auto") -> str:
    """``"masked"`` or ``"causal"``: ``mode`` itself, or for ``"auto"`` from the architecture."""
    if mode in ("causal", "masked"):
        return mode
    if mode != "auto":
        raise ValueError(f"mode must be 'auto', 'causal' or 'masked', got {mode!r}")
    return "masked" if architecture(model) in MASKED_ARCHITECTURES else "causal"


def tokenize_pair_sides(model: Any, pairs: Sequence[ContrastivePair], mode: str = "auto") -> PairBatch:
    """Tokenise both sides of ``pairs`` for ``mode``; unusable pairs are skipped and counted.

    Skipped (one ``SkippedPairsWarning`` with the counts): identical sides, a difference outside a
    declared span, sides whose tokens are identical, and in masked mode sides whose differing
    spans tokenize to different lengths. Raises ``ValueError`` when no pair is left or the
    tokenizer has no mask token in masked mode.
    """
    if isinstance(pairs, ContrastivePair):
        raise ValueError("pass a list of ContrastivePair, not one pair: [pair]")
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty: give at least one ContrastivePair")
    mode = scoring_mode(model, mode)
    skipped: dict[str, int] = {}
    kept: list[ContrastivePair] = []
    for pair in pairs:
        problem = pair_problem(pair)
        if problem is not None:
            skipped[problem] = skipped.get(problem, 0) + 1
        else:
            kept.append(pair)
    if not kept:
        warn_skipped(skipped, total=len(pairs))
        raise ValueError(f"no usable pair among {len(pairs)}: {skipped}")
    device = model_device(model)
    adv = tokenize_prompts(model, [p.advantaged for p in kept], device="cpu")
    dis = tokenize_prompts(model, [p.disadvantaged for p in kept], device="cpu")
    rows_a = [t[m].tolist() for t, m in zip(adv.tokens, adv.attention_mask)]
    rows_d = [t[m].tolist() for t, m in zip(dis.tokens, dis.attention_mask)]
    spans = [differing_span(a, d) for a, d in zip(rows_a, rows_d)]
    use = []
    for i, (start, end_a, end_d) in enumerate(spans):
        if rows_a[i] == rows_d[i]:
            reason = "identical tokens"
        elif mode == "masked" and end_a - start != end_d - start:
            reason = "span tokenizes to different lengths (masked mode)"
        else:
            use.append(i)
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    warn_skipped(skipped, total=len(pairs))
    if not use:
        raise ValueError(f"no usable pair among {len(pairs)}: {skipped}")
    kept_pairs = tuple(kept[i] for i in use)
    if mode == "causal":
        return PairBatch(
            mode, kept_pairs,
            {"advantaged": adv.tokens[use].to(device), "disadvantaged": dis.tokens[use].to(device)},
            {"advantaged": adv.attention_mask[use].to(device), "disadvantaged": dis.attention_mask[use].to(device)},
            None, None, dict(skipped),
        )
    mask_id = get_tokenizer(model).mask_token_id
    if mask_id is None:
        raise ValueError("masked mode needs a tokenizer with a mask token (tokenizer.mask_token is None)")
    inputs = adv.tokens[use].clone()
    span = torch.zeros_like(inputs, dtype=torch.bool)
    targets = {"advantaged": torch.zeros_like(inputs), "disadvantaged": torch.zeros_like(inputs)}
    for row, i in enumerate(use):
        start, end, _ = spans[i]
        span[row, start:end] = True
        targets["advantaged"][row, start:end] = torch.tensor(rows_a[i][start:end])
        targets["disadvantaged"][row, start:end] = torch.tensor(rows_d[i][start:end])
    inputs[span] = mask_id
    attention = adv.attention_mask[use].to(device)
    return PairBatch(
        mode, kept_pairs, {"advantaged": inputs.to(device), "disadvantaged": inputs.to(device)},
        {"advantaged": attention, "disadvantaged": attention}, span.to(device),
        {k: v.to(device) for k, v in targets.items()}, dict(skipped),
    )


def side_scores(
    logits: Tensor,
    batch: PairBatch,
    side: str,
    *,
    causal_reduction: Literal["sum", "mean"] = "sum",
    masked_score: Literal["logit", "logprob"] = "logit",
) -> Tensor:
    """Each pair's score of ``side`` (``"advantaged"`` / ``"disadvantaged"``), ``[n]``, differentiable.

    ``logits`` ``[n, pos, vocab]`` from the forward of ``batch.inputs[side]``. Causal: summed
    (or mean) log-probability of the side's tokens after BOS, in nats. Masked: summed logit (or
    log-probability) of the side's span tokens at the masks.
    """
    if side not in SIDES:
        raise ValueError(f"side must be 'advantaged' or 'disadvantaged', got {side!r}")
    logits = logits.float()
    if batch.mode == "causal":
        tokens, real = batch.inputs[side], batch.attention[side]
        logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        scored = real[:, 1:].to(logp.dtype)
        total = (logp * scored).sum(-1)
        return total / scored.sum(-1) if causal_reduction == "mean" else total
    values = logits.log_softmax(-1) if masked_score == "logprob" else logits
    picked = values.gather(-1, batch.targets[side][..., None])[..., 0]
    return (picked * batch.span.to(picked.dtype)).sum(-1)


def pair_gradients(
    model: Any,
    batch: PairBatch,
    names: Sequence[str],
    side: str,
    *,
    batch_size: int = 16,
    causal_reduction: Literal["sum", "mean"] = "sum",
    masked_score: Literal["logit", "logprob"] = "logit",
) -> dict[str, Tensor]:
    """d (sum over the pairs of ``side``'s score) / d parameter, per plain HF name in ``names``.

    Each gradient has its parameter's shape (score units per parameter unit); the forward and
    backward passes run ``batch_size`` pairs at a time and their gradients are summed.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    total: dict[str, Tensor] = {}
    for start in range(0, len(batch), batch_size):
        chunk = batch.rows(slice(start, start + batch_size))

        def metric(logits: Tensor, chunk: PairBatch = chunk) -> Tensor:
            return side_scores(
                logits, chunk, side, causal_reduction=causal_reduction, masked_score=masked_score
            ).sum()

        # Padding only needs masking where every position attends to every other (masked LMs).
        attention = chunk.attention[side] if batch.mode == "masked" else None
        grads = parameter_gradients(model, chunk.inputs[side], names, metric, attention_mask=attention)
        for name, g in grads.gradients.items():
            total[name] = g if name not in total else total[name].add_(g)
    return total


__all__ = [
    "MASKED_ARCHITECTURES",
    "SIDES",
    "PairBatch",
    "pair_gradients",
    "scoring_mode",
    "side_scores",
    "tokenize_pair_sides",
]
