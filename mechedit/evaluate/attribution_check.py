"""How far to trust an attribution estimate: exact patching of its top cells and a random sample.

AtP* (Kramár et al. 2024) recommends verifying a gradient estimate on the task at hand: patch
exactly the ``top_k`` cells by absolute estimate plus ``n_random`` others drawn at random (seeded),
and compare. ``verify_attribution`` does that with ``mechedit.locate.activation_patching`` on the
same pairs, direction, metric and granularity as the estimate, and reports over the checked cells:

- Pearson and Spearman correlation of estimate and exact effect;
- recall of the exact top-k: of the ``top_k`` checked cells with the largest exact |effect|, the
  share that the estimate also ranked in its top ``top_k`` (cells outside the check are unknown,
  so this is a recall within the checked set);
- relative L1 error ``sum |estimate - exact| / sum |exact|``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechedit.components import Component
from mechedit.locate.activation_patching import PatchingMetric, activation_patching
from mechedit.prompts import PromptPair, TokenizedPairs
from mechedit.scores import Scores

__all__ = ["AttributionCheck", "verify_attribution"]


@dataclass(frozen=True)
class AttributionCheck:
    """The verification of one site's estimate; ``estimate``/``exact`` are per checked cell."""

    site: str
    components: tuple[Component, ...]
    estimate: Tensor
    exact: Tensor
    n_top: int
    pearson: float
    spearman: float
    top_k_recall: float
    relative_l1: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site, "n_checked": len(self.components), "n_top": self.n_top,
            "pearson": self.pearson, "spearman": self.spearman,
            "top_k_recall": self.top_k_recall, "relative_l1": self.relative_l1,
        }


def _ranks(x: Tensor) -> Tensor:
    return x.argsort().argsort().double()


def _pearson(x: Tensor, y: Tensor) -> float:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1])


def verify_attribution(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    scores: Scores,
    *,
    top_k: int = 20,
    n_random: int = 20,
    seed: int = 0,
    metric: str | PatchingMetric | None = None,
    progress: bool = False,
) -> AttributionCheck:
    """Exactly patch the estimate's ``top_k`` cells and ``n_random`` random others; compare.

    ``scores``: an averaged estimate (no ``pair`` axis) from ``attribution_patching`` (or any
    locator whose config names ``direction``, ``metric`` and ``per_position`` as exact patching
    does). ``metric``: the callable, when the estimate used a custom one.
    """
    if "pair" in scores.axes:
        raise ValueError("verify an averaged estimate: call the locator without per_pair")
    config = scores.config
    name = config.get("metric", "logit_diff")
    if name == "custom" and metric is None:
        raise ValueError("the estimate used a custom metric: pass the same callable as metric=")
    if top_k < 1 or n_random < 0:
        raise ValueError(f"top_k must be >= 1 and n_random >= 0, got {top_k} and {n_random}")
    values = scores.values.flatten()
    finite = (~values.isnan()).nonzero()[:, 0]
    order = finite[values[finite].abs().argsort(descending=True)]
    top = order[:top_k]
    rest = order[top_k:]
    generator = torch.Generator().manual_seed(seed)
    sample = rest[torch.randperm(len(rest), generator=generator)[:n_random]]
    chosen = torch.cat([top, sample])
    index = [tuple(int(i) for i in torch.unravel_index(c, scores.shape)) for c in chosen]
    components = tuple(scores.component_at(*i) for i in index)
    per_position = "pos" in scores.axes
    exact_scores = activation_patching(
        model, pairs, site=scores.site, metric=metric or name,
        direction=config.get("direction", "denoising"), per_position=per_position,
        components=list(components), progress=progress,
    )
    exact = torch.stack([exact_scores.values[i] for i in index]).double()
    estimate = values[chosen].double()
    n_top = min(top_k, len(chosen))
    exact_top = set(exact.abs().argsort(descending=True)[:n_top].tolist())
    estimate_top = set(range(n_top))  # the first n_top checked cells are the estimate's top
    return AttributionCheck(
        site=scores.site,
        components=components,
        estimate=estimate,
        exact=exact,
        n_top=n_top,
        pearson=_pearson(estimate, exact),
        spearman=_pearson(_ranks(estimate), _ranks(exact)),
        top_k_recall=len(exact_top & estimate_top) / n_top,
        relative_l1=float((estimate - exact).abs().sum() / exact.abs().sum().clamp(min=1e-12)),
    )
