"""Do several localisations of one behaviour agree, and does each find a known answer?

Locators score different sites (neurons, ``mlp_out`` per layer, layer x position cells), so they
are compared on the finest level they share:

- **component level**, when every ``Scores`` has the same site and shape: top-k sets of cells and
  the rank correlation over all cells;
- **layer level** otherwise: each ``Scores`` becomes a profile over layers, the sum (or max) of
  ``|score|`` over every other axis (a neuron map's layer mass, a causal-tracing grid's layer row).

Agreement is about *where*, so cells are ranked by ``|score|``: a strongly negative component is
as located as a strongly positive one (``by="value"`` ranks signed values instead).

``planted_recovery`` asks each method where ``factworld-planted``'s planted layer ranks in its
layer profile (1 = first), with the share of its ``|score|`` mass that sits there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float

from mechedit.scores import Scores

Level = Literal["auto", "component", "layer"]


def layer_profile(scores: Scores, *, op: Literal["abs_sum", "abs_max"] = "abs_sum") -> Float[torch.Tensor, " n_layers"]:
    """``[n_layers]``: ``|score|`` summed (``abs_sum``) or maximised (``abs_max``) over every axis but ``layer``.

    Raises a ``ValueError`` for scores without a ``layer`` axis (e.g. embedding scores).
    """
    if "layer" not in scores.axes:
        raise ValueError(f"{scores.method} scores on {scores.site!r} have no 'layer' axis (axes {scores.axes}); "
                         "layer-level agreement needs one")
    if op not in ("abs_sum", "abs_max"):
        raise ValueError(f"op must be 'abs_sum' or 'abs_max', got {op!r}")
    values = scores.values.abs().movedim(scores.axes.index("layer"), 0)
    values = values.reshape(values.shape[0], -1)
    return values.sum(1) if op == "abs_sum" else values.max(1).values


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    return torch.tensor(pd.Series(x.double().numpy()).rank(method="average").to_numpy())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equal-length vectors (NaN when either is constant)."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float("nan") if denominator == 0 else float((ra @ rb).item() / denominator)


@dataclass(frozen=True)
class Agreement:
    """Pairwise agreement of several localisations.

    ``jaccard[i, j]``: |top_i ∩ top_j| / |top_i ∪ top_j| of the methods' top-``k`` cells;
    ``spearman[i, j]``: rank correlation over all cells (``level="component"``) or layers.
    ``top``: each method's top-``k`` cell labels, best first (``"L3"`` at layer level, the
    component's name at component level).
    """

    methods: tuple[str, ...]
    level: Literal["component", "layer"]
    k: int
    jaccard: Float[torch.Tensor, "m m"]
    spearman: Float[torch.Tensor, "m m"]
    top: Mapping[str, tuple[str, ...]]

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(Jaccard, Spearman) as method x method DataFrames."""
        names = list(self.methods)
        return (pd.DataFrame(self.jaccard.numpy(), index=names, columns=names),
                pd.DataFrame(self.spearman.numpy(), index=names, columns=names))


def _cell_label(scores: Scores, flat: int) -> str:
    """The component a flat cell index scores (``str(component)``), or the index when the axes name none."""
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), scores.shape)]
    try:
        return str(scores.component_at(*index))
    except ValueError:
        return str(tuple(index))


def _same_cells(scores: Mapping[str, Scores]) -> bool:
    first = next(iter(scores.values()))
    return all(s.site == first.site and s.axes == first.axes and s.shape == first.shape for s in scores.values())


def localization_agreement(
    scores: Mapping[str, Scores],
    *,
    k: int = 10,
    level: Level = "auto",
    by: Literal["abs", "value"] = "abs",
    op: Literal["abs_sum", "abs_max"] = "abs_sum",
    same_model: bool = True,
) -> Agreement:
    """Top-``k`` Jaccard and Spearman matrices of ``{method name: Scores}`` (two or more).

    ``level="auto"`` compares cells when all scores share site and shape, else layer profiles
    (``layer_profile`` with ``op``). ``k`` is clipped to the number of cells compared; at layer
    level a small ``k`` (1-3) is the meaningful one. Scores whose provenance names different
    weights are refused unless ``same_model=False`` (e.g. comparing a model with its edit on
    purpose).
    """
    if len(scores) < 2:
        raise ValueError(f"give at least two localisations to compare, got {len(scores)}")
    weights = {name: s.provenance.weights_hash for name, s in scores.items() if s.provenance is not None}
    if same_model and len(set(weights.values())) > 1:
        raise ValueError(
            f"these scores come from different models (weights hash per localisation: {weights}); "
            "compare localisations of one model, or pass same_model=False if that is the point"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if by not in ("abs", "value"):
        raise ValueError(f"by must be 'abs' or 'value', got {by!r}")
    if level == "auto":
        level = "component" if _same_cells(scores) else "layer"
    if level == "component":
        if not _same_cells(scores):
            raise ValueError("component-level agreement needs scores of one site and shape; use level='layer'")
        vectors = {name: s.values.flatten().double() for name, s in scores.items()}
        label = lambda i: _cell_label(next(iter(scores.values())), i)  # noqa: E731
        if by == "abs":
            vectors = {name: v.abs() for name, v in vectors.items()}
    elif level == "layer":
        n_layers = {name: s.values.shape[s.axes.index("layer")] if "layer" in s.axes else None for name, s in scores.items()}
        vectors = {name: layer_profile(s, op=op).double() for name, s in scores.items()}
        if len(set(n_layers.values())) != 1:
            raise ValueError(f"the scores cover different numbers of layers: {n_layers}")
        label = lambda i: f"L{i}"  # noqa: E731
    else:
        raise ValueError(f"level must be 'auto', 'component' or 'layer', got {level!r}")
    names = tuple(scores)
    n = next(iter(vectors.values())).numel()
    k = min(k, n)
    tops = {name: v.topk(k).indices for name, v in vectors.items()}
    m = len(names)
    jaccard, rho = torch.eye(m, dtype=torch.float64), torch.eye(m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            a, b = set(tops[names[i]].tolist()), set(tops[names[j]].tolist())
            jaccard[i, j] = jaccard[j, i] = len(a & b) / len(a | b)
            rho[i, j] = rho[j, i] = spearman(vectors[names[i]], vectors[names[j]])
    return Agreement(
        methods=names,
        level=level,
        k=k,
        jaccard=jaccard,
        spearman=rho,
        top={name: tuple(label(int(i)) for i in t) for name, t in tops.items()},
    )


def planted_recovery(
    scores: Mapping[str, Scores], *, layer: int, op: Literal["abs_sum", "abs_max"] = "abs_sum"
) -> pd.DataFrame:
    """Per method: where ``layer`` ranks in its layer profile, and the profile's share there.

    Columns: ``method``, ``rank`` (1 = the method puts ``layer`` first), ``top_layer``,
    ``share`` (``layer``'s part of the profile's total, 0-1), ``n_layers``, ``recovered`` (``rank == 1``).
    """
    rows = []
    for name, s in scores.items():
        profile = layer_profile(s, op=op)
        if not 0 <= layer < profile.numel():
            raise ValueError(f"layer {layer} out of range for {name}'s {profile.numel()} layers")
        order = profile.argsort(descending=True).tolist()
        total = profile.sum().item()
        rows.append({
            "method": name,
            "rank": order.index(layer) + 1,
            "top_layer": order[0],
            "share": profile[layer].item() / total if total > 0 else float("nan"),
            "n_layers": profile.numel(),
        })
    frame = pd.DataFrame(rows)
    frame["recovered"] = frame["rank"] == 1
    return frame
