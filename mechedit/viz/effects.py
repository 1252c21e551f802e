"""Edit-effect figures: predicted vs observed, the k sweep with its random control, exposure.

* ``effect_scatter``: ``mechedit.evaluate.effects.predicted_vs_observed``'s table as a scatter of
  each neuron's attribution (predicted drop, nats) against its exact effect when zeroed alone,
  with the ``y = x`` line; beside it, all selected neurons zeroed together against the sum of
  their predictions.
* ``k_sweep_lines``: ``k_sweep``'s table: the target's probability (or accuracy) against the
  number of zeroed neurons k (log axis), top-k against random k (mean and spread over seeds).
* ``exposure_strip``: per-secret exposure (bits) before and after a privacy edit, with the
  largest possible exposure ``log2 |R|`` marked.

Results in, ``plotly.graph_objects.Figure`` out; no model is touched here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from mechedit.evaluate.privacy import ExposureResult

SELECTED, RANDOM, JOINT = "selected", "random", "all selected"
_SUITE_COLOURS = {"forget": "#e45756", "neighbours": "#4c78a8"}


def _require_columns(frame: Any, columns: Sequence[str], what: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{what} takes a DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: the table lacks columns {missing}; it has {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{what}: the table is empty")


def effect_scatter(frame: pd.DataFrame, *, title: str | None = None, height: int = 440) -> go.Figure:
    """Predicted vs observed drop per neuron, and the joint effect of all selected neurons.

    Args:
        frame: ``predicted_vs_observed``'s table (columns ``group``, ``layer``, ``neuron``,
            ``rank``, ``predicted``, ``observed``; nats, positive = zeroing hurts the forget set
            more than the facts to keep).

    Returns:
        Two panels. Left: one scatter trace per group present (``"selected"``, ``"random"``;
        x = predicted, y = observed, hover with layer, neuron and rank) and a ``"y = x"`` line
        spanning both axes' range. Right (when the table has the ``"all selected"`` row): two
        bars, the sum of the selected neurons' predictions and the observed drop with all of
        them zeroed.

    Raises:
        ValueError: missing columns, an empty table, or no per-neuron rows.
    """
    _require_columns(frame, ("group", "layer", "neuron", "rank", "predicted", "observed"), "effect_scatter")
    single = frame[frame["group"] != JOINT]
    if single.empty:
        raise ValueError("effect_scatter: the table has no per-neuron rows (groups 'selected' / 'random')")
    joint = frame[frame["group"] == JOINT]
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.68, 0.32], horizontal_spacing=0.12,
        subplot_titles=("each neuron zeroed alone", "all selected zeroed together" if not joint.empty else ""),
    )
    styles = {SELECTED: dict(color="#e45756", size=9, symbol="circle"), RANDOM: dict(color="#9d9d9d", size=7, symbol="diamond")}
    for group in [g for g in (SELECTED, RANDOM) if g in set(single["group"])] + sorted(set(single["group"]) - {SELECTED, RANDOM}):
        part = single[single["group"] == group]
        fig.add_trace(go.Scatter(
            x=part["predicted"], y=part["observed"], mode="markers", name=f"{group} ({len(part)})",
            marker=styles.get(group, {}),
            customdata=part[["layer", "neuron", "rank"]].to_numpy(),
            hovertemplate="layer %{customdata[0]}, neuron %{customdata[1]} (rank %{customdata[2]})"
            "<br>predicted %{x:.3g} nats<br>observed %{y:.3g} nats<extra>" + group + "</extra>",
        ), row=1, col=1)
    lo = float(min(single["predicted"].min(), single["observed"].min()))
    hi = float(max(single["predicted"].max(), single["observed"].max()))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x (prediction exact)",
                             line=dict(color="#222", dash="dot", width=1), hoverinfo="skip"), row=1, col=1)
    fig.update_xaxes(title_text="predicted drop (attribution, nats)", row=1, col=1)
    fig.update_yaxes(title_text="observed drop (nats)", row=1, col=1)
    if not joint.empty:
        row = joint.iloc[0]
        n = int((single["group"] == SELECTED).sum())
        fig.add_trace(go.Bar(
            x=[f"sum of {n} predictions", f"observed, {n} zeroed"], y=[row["predicted"], row["observed"]],
            marker_color=["#f2a5a6", "#e45756"], name="all selected", showlegend=False,
            hovertemplate="%{x}<br>%{y:.3g} nats<extra></extra>",
        ), row=1, col=2)
        fig.update_yaxes(title_text="drop (nats)", row=1, col=2)
    fig.update_layout(title=title or "Attribution (predicted) vs the exact effect of zeroing (observed)", height=height,
                      legend=dict(orientation="h", y=-0.2))
    return fig


def k_sweep_lines(
    frame: pd.DataFrame, *, metric: str = "p_target", title: str | None = None, height: int = 420
) -> go.Figure:
    """The target's ``metric`` against k zeroed neurons: top-k vs random k, per suite.

    Args:
        frame: ``k_sweep``'s table (``selection`` in ``"none"`` / ``"top-k"`` / ``"random"``,
            ``k``, ``seed``, ``suite``, and ``metric``).
        metric: ``"p_target"`` (mean target probability) or ``"accuracy"`` (top-1).

    Returns:
        Per suite (in the table's order): ``"<suite>: top-k"`` (y = the metric at each k),
        ``"<suite>: random k"`` (y = the mean over seeds, error bars from the lowest to the
        highest seed) and, when the table has the unedited row, ``"<suite>: unedited"`` (a
        flat dotted line). x = k on a log axis.

    Raises:
        ValueError: missing columns or metric, an empty table, a table without top-k rows.
    """
    _require_columns(frame, ("selection", "k", "seed", "suite", metric), "k_sweep_lines")
    if not (frame["selection"] == "top-k").any():
        raise ValueError("k_sweep_lines: the table has no 'top-k' rows (is it k_sweep's?)")
    ks = sorted(int(k) for k in frame.loc[frame["selection"] != "none", "k"].unique())
    fig = go.Figure()
    for suite in dict.fromkeys(frame["suite"]):
        part = frame[frame["suite"] == suite]
        colour = _SUITE_COLOURS.get(suite)
        top = part[part["selection"] == "top-k"].sort_values("k")
        fig.add_scatter(x=top["k"], y=top[metric], mode="lines+markers", name=f"{suite}: top-k",
                        line=dict(color=colour, width=2.5),
                        hovertemplate="top %{x} zeroed<br>" + metric + " %{y:.3f}<extra>" + suite + "</extra>")
        rand = part[part["selection"] == "random"].groupby("k")[metric].agg(["mean", "min", "max", "count"]).reset_index()
        if not rand.empty:
            fig.add_scatter(
                x=rand["k"], y=rand["mean"], mode="lines+markers", name=f"{suite}: random k",
                line=dict(color=colour, dash="dash", width=1.5), marker=dict(symbol="diamond"),
                error_y=dict(type="data", symmetric=False, array=rand["max"] - rand["mean"], arrayminus=rand["mean"] - rand["min"]),
                customdata=rand[["min", "max", "count"]].to_numpy(),
                hovertemplate="%{x} random zeroed<br>mean " + metric
                + " %{y:.3f} (range %{customdata[0]:.3f} to %{customdata[1]:.3f}, %{customdata[2]} seeds)<extra>" + suite + "</extra>",
            )
        base = part[part["selection"] == "none"]
        if not base.empty:
            value = float(base[metric].iloc[0])
            fig.add_scatter(x=[ks[0], ks[-1]], y=[value, value], mode="lines", name=f"{suite}: unedited",
                            line=dict(color=colour, dash="dot", width=1), hovertemplate="unedited " + metric + " %{y:.3f}<extra></extra>")
    label = {"p_target": "mean target probability", "accuracy": "top-1 accuracy"}.get(metric, metric)
    fig.update_xaxes(type="log", title_text="k (neurons zeroed, log scale)", tickvals=ks, ticktext=[str(k) for k in ks])
    fig.update_yaxes(title_text=label, range=[-0.03, 1.03] if metric in ("p_target", "accuracy") else None)
    fig.update_layout(title=title or f"Zeroing the top-k neurons vs k random neurons: {label}", height=height)
    return fig


def _exposure_values(result: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(exposure [n] float64, log2_space [n] or None)`` of an ``ExposureResult`` or a 1-D sequence."""
    if hasattr(result, "exposure") and hasattr(result, "log2_space"):
        return torch.as_tensor(result.exposure, dtype=torch.float64).flatten(), torch.as_tensor(result.log2_space, dtype=torch.float64).flatten()
    try:
        values = torch.tensor([math.nan if v is None else float(v) for v in result], dtype=torch.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an ExposureResult or a sequence of exposures in bits, got {type(result).__name__}") from None
    return values, None


def exposure_strip(
    before: ExposureResult | Sequence[float],
    after: ExposureResult | Sequence[float],
    *,
    log2_space: float | None = None,
    title: str | None = None,
    height: int = 420,
) -> go.Figure:
    """Per-secret exposure (bits) before and after an edit: a box with every secret's point.

    Args:
        before, after: ``mechedit.evaluate.exposure`` results on the same secrets (or plain
            per-secret exposures, e.g. a privacy report's ``exposure_before`` / ``_after``
            columns; ``None``/NaN = not measured, left out).
        log2_space: the largest possible exposure ``log2 |R|`` to mark; taken from the results
            (their largest ``log2_space``) when they are ``ExposureResult``s.

    Returns:
        Traces ``"before"`` and ``"after"`` (box plots with all points; y = exposure in bits,
        hover names the secret's index) and, when known, ``"maximum: log2 |R| = ..."`` (a
        dashed line). Higher = more exposed; 0 = the secret ranks last among ``R``.

    Raises:
        ValueError: results of different lengths or different candidate spaces
        (``log2_space``), or nothing measured. TypeError: inputs of another type.
    """
    x_before, space_before = _exposure_values(before, "before")
    x_after, space_after = _exposure_values(after, "after")
    if len(x_before) != len(x_after):
        raise ValueError(f"before has {len(x_before)} secrets but after has {len(x_after)}: pass results on the same secrets")
    if space_before is not None and space_after is not None and not torch.equal(space_before, space_after):
        raise ValueError("before and after rank the secrets among different candidate spaces (log2_space differs): measure both with one alphabet")
    if len(x_before) == 0 or (x_before.isnan().all() and x_after.isnan().all()):
        raise ValueError("no exposure measured: the results are empty or all NaN")
    if log2_space is None:
        spaces = space_before if space_before is not None else space_after
        log2_space = float(spaces.max()) if spaces is not None and len(spaces) else None
    fig = go.Figure()
    for name, values, colour in (("before", x_before, "#4c78a8"), ("after", x_after, "#e45756")):
        index = [i for i, v in enumerate(values.tolist()) if not math.isnan(v)]
        fig.add_box(
            x=[name] * len(index), y=values[index].tolist(), name=name, boxpoints="all", jitter=0.4, pointpos=0,
            marker=dict(color=colour, size=6, opacity=0.7), line=dict(color=colour), customdata=index,
            hovertemplate="secret %{customdata}<br>exposure %{y:.2f} bits<extra>" + name + "</extra>",
        )
    if log2_space is not None:
        fig.add_scatter(x=["before", "after"], y=[log2_space, log2_space], mode="lines",
                        name=f"maximum: log2 |R| = {log2_space:.3g} bits", line=dict(color="#222", dash="dash", width=1))
    fig.update_yaxes(title_text="exposure (bits; higher = more exposed)", rangemode="tozero")
    fig.update_layout(title=title or "Exposure of each secret, before and after the edit", height=height, showlegend=True)
    return fig
