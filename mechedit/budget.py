"""Circuits of equal parameter budget: compare localisations at the same size.

A localisation that edits more weights is not a fair rival of one that edits fewer. Mechanistic
Unlearning (Guo et al. 2024) therefore grows the output-tracing baselines (causal tracing,
attribution patching) by score until they hold as many parameters as the fact-lookup circuit.

* ``circuit_size(model, circuit)``: how many parameter entries the circuit covers, counted from
  ``mechedit.hf.circuit_parameters`` masks (a head's q/k/v/o slices, a neuron's in/out slices, a
  whole ``mlp`` / ``attn`` block's weights and biases, norms not included; shared entries once).
* ``grow_to_budget(scores, model, n_params=...)``: rank a locator's components by ``|score|``
  and add them, best first, until the circuit's size reaches the budget.

Sites map to trainable components as edits use them: ``mlp_out`` / ``mlp`` layer ``l`` ->
``Component("mlp", l)``, ``attn_out`` / ``attn`` -> ``Component("attn", l)``, ``head`` -> the
head, ``neuron`` / ``neuron_pre`` -> ``Component("neuron", l, neuron=j)``. A ``pos`` axis (causal
tracing's ``layer x pos``, per-position attribution patching) is reduced by the largest
``|score|`` over positions: a weight acts at every position, so a component counts as important
where it matters most. Residual-stream sites have no parameters of their own and are refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

from mechedit.circuit import Circuit
from mechedit.components import Component, is_int
from mechedit.hf import circuit_parameters
from mechedit.provenance import Provenance
from mechedit.scores import Scores

__all__ = ["TRAINABLE_SITES", "circuit_size", "grow_to_budget"]

#: Scores site -> the site of the trainable component its cells become.
TRAINABLE_SITES = {
    "mlp_out": "mlp", "mlp": "mlp", "attn_out": "attn", "attn": "attn",
    "head": "head", "neuron": "neuron", "neuron_pre": "neuron",
}


def _check_same_model(thing: Any, model: Any, what: str) -> None:
    # Hand-made circuits and scores carry no provenance: nothing to compare them with.
    if getattr(thing, "provenance", None) is not None:
        thing.check_model(model, strict=True)


def circuit_size(model: Any, circuit: Circuit | Iterable[Component]) -> int:
    """The number of parameter entries ``circuit`` covers in ``model`` (an int >= 0).

    Raises ``ModelMismatchError`` for a ``Circuit`` computed on other weights, and
    ``ValueError`` for components out of range or without parameters (residual sites).
    """
    if isinstance(circuit, Circuit):
        _check_same_model(circuit, model, "circuit")
    masks = circuit_parameters(model, circuit)
    return int(sum(int(m.sum()) for m in masks.values()))


def _component_scores(scores: Scores) -> tuple[torch.Tensor, tuple[str, ...], str]:
    """``|scores|`` with ``pos`` reduced by its max, the remaining axes, the trainable site."""
    if scores.site not in TRAINABLE_SITES:
        raise ValueError(
            f"scores on site {scores.site!r} name no trainable component; grow_to_budget takes "
            f"scores on {', '.join(TRAINABLE_SITES)} (e.g. causal tracing's mlp / attn, "
            "attribution patching's mlp_out / attn_out / head / neuron)"
        )
    values, axes = scores.values.detach().float().abs().cpu(), scores.axes
    if "pos" in axes:
        dim = axes.index("pos")
        # NaN (a position a prompt does not have) must not win the max
        all_nan = torch.isnan(values).all(dim)
        values = values.nan_to_num(nan=-1.0).amax(dim).masked_fill(all_nan, float("nan"))
        axes = axes[:dim] + axes[dim + 1 :]
    site = TRAINABLE_SITES[scores.site]
    want = ("layer",) + (("head",) if site == "head" else ("neuron",) if site == "neuron" else ())
    if axes != want:
        extra = [a for a in axes if a not in want]
        hint = f"; reduce {extra[0]!r} first, e.g. scores.reduce({extra[0]!r}, op='mean')" if extra else ""
        raise ValueError(f"grow_to_budget needs {scores.site} scores over axes {want} (plus 'pos'), got {scores.axes}{hint}")
    return values, axes, site


def grow_to_budget(
    scores: Scores,
    model: Any,
    *,
    n_params: int,
    rule: Literal["at_least", "nearest"] = "at_least",
    description: str = "",
) -> Circuit:
    """The circuit of ``scores``' top components by ``|score|`` with about ``n_params`` parameters.

    Components are added best first (ties in tensor order; NaN cells never). ``rule``:

    * ``"at_least"`` (default): the smallest top-k whose ``circuit_size`` is ``>= n_params``, so
      it overshoots the budget by less than its last component;
    * ``"nearest"``: that k or k - 1, whichever size is closer to the budget (ties: k - 1).

    When all components together stay under the budget, all are returned and the circuit's
    ``config["selection"]["budget_reached"]`` is False. The selection (budget, size, k, rule,
    position reduction) is in ``config["selection"]``, the scores' config in ``config["scores"]``.

    Raises:
        ValueError: ``n_params`` not a positive int, an unknown ``rule``, scores on a site
            without parameters or with axes other than ``layer`` [+ unit] [+ ``pos``].
        ModelMismatchError: scores computed on another model.
    """
    if not is_int(n_params) or n_params < 1:
        raise ValueError(f"n_params must be a positive int (a parameter count, e.g. circuit_size(model, c)), got {n_params!r}")
    if rule not in ("at_least", "nearest"):
        raise ValueError(f"rule must be 'at_least' or 'nearest', got {rule!r}")
    if not isinstance(scores, Scores):
        raise ValueError(f"scores must be a Scores, got {type(scores).__name__}")
    _check_same_model(scores, model, "scores")
    values, _, site = _component_scores(scores)
    flat = values.flatten()
    chosen = torch.nonzero(~torch.isnan(flat)).squeeze(1)
    order = chosen[torch.sort(flat[chosen], descending=True, stable=True).indices]
    cells = [torch.unravel_index(i, values.shape) for i in order]
    ranked = [
        Component(site, int(c[0])) if site in ("mlp", "attn")
        else Component(site, int(c[0]), **{site: int(c[1])})
        for c in cells
    ]

    def size(k: int) -> int:
        return circuit_size(model, ranked[:k]) if k else 0

    # size(k) grows with k: bisect for the smallest k reaching the budget
    lo, hi = 0, len(ranked)
    reached = size(hi) >= n_params
    if reached:
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if size(mid) < n_params else (lo, mid)
    k = hi
    if rule == "nearest" and reached and k > 0 and abs(size(k - 1) - n_params) <= abs(size(k) - n_params):
        k -= 1
    selection = {
        "rule": f"grow_to_budget:{rule}", "by": "abs", "n_params": int(n_params), "size": size(k), "k": k,
        "budget_reached": reached, "scores_site": scores.site,
        "pos_reduce": "max_abs" if "pos" in scores.axes else None,
    }
    return Circuit(
        tuple(ranked[:k]), method=scores.method, config={"scores": dict(scores.config), "selection": selection},
        provenance=scores.provenance if scores.provenance is not None else Provenance.of(model),
        description=description or f"top {k} {site} components by |{scores.method} score| up to {n_params} parameters",
    )
