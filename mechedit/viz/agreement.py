"""Figures of method agreement: Jaccard and Spearman matrices, and planted-layer recovery."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def agreement_heatmaps(agreement: Any, *, title: str | None = None) -> go.Figure:
    """Two method x method heatmaps side by side: top-k Jaccard (0-1) and Spearman (-1-1).

    ``agreement``: a ``mechedit.evaluate.agreement.Agreement``. Cells carry their value as text;
    hover shows each method's top cells.
    """
    names = list(agreement.methods)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.18, subplot_titles=(
        f"top-{agreement.k} Jaccard ({agreement.level} level)", f"Spearman ({agreement.level} level)"))
    tops = [", ".join(agreement.top[n][:5]) for n in names]
    for col, (matrix, zmin, scale, bar_x) in enumerate(
        ((agreement.jaccard, 0.0, "Blues", 0.41), (agreement.spearman, -1.0, "RdBu", 1.0)), start=1
    ):
        z = matrix.numpy()
        fig.add_trace(go.Heatmap(
            z=z, x=names, y=names, zmin=zmin, zmax=1.0, colorscale=scale, reversescale=col == 2,
            text=[[f"{v:.2f}" for v in row] for row in z], texttemplate="%{text}",
            customdata=[[f"{names[i]} vs {names[j]}: {z[i, j]:.3f}<br>{names[i]} top: {tops[i]}<br>{names[j]} top: {tops[j]}"
                         for j in range(len(names))] for i in range(len(names))],
            hovertemplate="%{customdata}<extra></extra>", colorbar=dict(x=bar_x, len=0.9),
        ), row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or "Do the localisations agree?", height=420 + 12 * len(names), width=980)
    return fig


def recovery_bars(recovery: pd.DataFrame, *, layer: int, title: str | None = None) -> go.Figure:
    """One bar per method: the share of its layer profile at the planted ``layer``, labelled with its rank.

    ``recovery``: ``mechedit.evaluate.agreement.planted_recovery``'s frame. Green bars put the
    planted layer first; the dashed line is a uniform profile's share (1 / n_layers).
    """
    colours = ["#2ca02c" if r else "#d62728" for r in recovery["recovered"]]
    fig = go.Figure(go.Bar(
        x=recovery["method"], y=recovery["share"], marker_color=colours,
        text=[f"rank {r} (top L{t})" for r, t in zip(recovery["rank"], recovery["top_layer"])], textposition="outside",
        hovertemplate="%{x}: share %{y:.3f} at layer " + str(layer) + "<br>%{text}<extra></extra>",
    ))
    if "n_layers" in recovery:
        fig.add_hline(y=1 / int(recovery["n_layers"].iloc[0]), line_dash="dash", annotation_text="uniform")
    fig.update_layout(title=title or f"Does each method put the planted layer (L{layer}) first?",
                      yaxis=dict(title=f"share of |score| at layer {layer}", range=[0, 1.1]), height=420)
    return fig
