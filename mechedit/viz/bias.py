"""Figures of a bias edit: where its partitions sit, and the bias before and after against 50 %.

* ``partition_heatmap``: a layer x tensor map of a partition selection (e.g. PCGU's), from
  ``PCGUSelection.tensor_table()``;
* ``bias_bars``: the bias of each method (a ``bias_edit_table`` column) with the unbiased line and
  its tolerance band;
* ``bias_history``: the dev bias after every update step of each run, with the same line.

Results in, ``plotly.graph_objects.Figure`` out; no model is touched here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

OUTSIDE = "outside blocks"


def partition_heatmap(
    table: pd.DataFrame, *, value: str = "fraction", title: str | None = None, colorscale: str = "Viridis"
) -> go.Figure:
    """Where selected partitions sit: one row per layer, one column per tensor of a block.

    ``table`` has one row per tensor with columns ``layer`` (block index; missing for tensors
    outside the blocks, which get their own row, ``"outside blocks"``, and their own columns),
    ``tensor`` (the name inside the block, e.g. ``mlp.c_fc.weight``), ``partitions``,
    ``selected`` and ``value`` (by default ``fraction`` = selected / partitions, in [0, 1]) —
    ``PCGUSelection.tensor_table()`` is such a table. Cells with no tensor are blank; hovering a
    cell shows the tensor's HF name (``param`` when present) and its counts.
    """
    needed = ["layer", "tensor", "partitions", "selected", value]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(
            f"table lacks columns {missing}; pass PCGUSelection.tensor_table() (columns {needed})"
        )
    if table.empty:
        raise ValueError("table is empty: no tensor to draw")
    inside = table[table["layer"].notna()]
    outside = table[table["layer"].isna()]
    columns = list(dict.fromkeys(inside["tensor"])) + list(dict.fromkeys(outside["tensor"]))
    layers = sorted({int(v) for v in inside["layer"]})
    rows = [str(layer) for layer in layers] + ([OUTSIDE] if len(outside) else [])
    z = np.full((len(rows), len(columns)), np.nan)
    text = np.full((len(rows), len(columns)), "", dtype=object)
    col_of = {name: j for j, name in enumerate(columns)}
    row_of = {name: i for i, name in enumerate(rows)}
    for record in table.to_dict("records"):
        i = row_of[OUTSIDE if pd.isna(record["layer"]) else str(int(record["layer"]))]
        j = col_of[record["tensor"]]
        z[i, j] = float(record[value])
        text[i, j] = (
            f"{record.get('param', record['tensor'])}<br>{int(record['selected'])} of "
            f"{int(record['partitions'])} partitions selected"
        )
    n_selected, n_all = int(table["selected"].sum()), int(table["partitions"].sum())
    fig = go.Figure(
        go.Heatmap(
            z=z, x=columns, y=rows, text=text, colorscale=colorscale, zmin=0.0,
            hovertemplate="%{text}<br>" + value + " %{z:.3g}<extra></extra>",
            colorbar={"title": {"text": value}},
        )
    )
    fig.update_layout(
        title=title or f"Selected partitions by layer and tensor ({n_selected:,} of {n_all:,})",
        xaxis_title="tensor",
        yaxis_title="layer",
        yaxis={"autorange": "reversed", "type": "category"},
        height=max(300, 40 * len(rows) + 220),
        margin={"l": 90, "r": 20, "t": 60, "b": 160},
    )
    return fig


def _target_band(fig: go.Figure, target: float, tolerance: float | None) -> None:
    if tolerance:
        fig.add_hrect(y0=target - tolerance, y1=target + tolerance, fillcolor="green", opacity=0.12, line_width=0)
    fig.add_hline(
        y=target, line={"dash": "dash", "color": "black"},
        annotation_text=f"{100 * target:g} % (no preference)", annotation_position="top left",
    )


def bias_bars(
    table: pd.DataFrame,
    *,
    column: str = "test_bias",
    label: str = "method",
    target: float = 0.5,
    tolerance: float | None = 0.05,
    title: str = "Bias before and after: share of pairs preferring the advantaged side",
) -> go.Figure:
    """One bar per row of ``table`` (e.g. ``evaluate.bias.bias_edit_table``): its ``column``
    (a fraction in [0, 1]) labelled by ``label``, with the ``target`` line (0.5: no preference)
    and, when ``tolerance`` is given, the band ``target ± tolerance``."""
    missing = [c for c in (column, label) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; it has {list(table.columns)}")
    values = table[column].astype(float).tolist()
    fig = go.Figure(
        go.Bar(
            x=table[label].astype(str).tolist(), y=values, marker_color="#4c78a8",
            text=[f"{100 * v:.1f} %" for v in values], textposition="outside",
            hovertemplate="%{x}<br>" + column + " %{y:.3f}<extra></extra>",
        )
    )
    _target_band(fig, target, tolerance)
    fig.update_layout(title=title, yaxis={"title": column, "range": [0, 1.1]}, margin={"t": 60})
    return fig


def bias_history(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    *,
    x: str = "step",
    target: float = 0.5,
    tolerance: float | None = 0.05,
    checkpoints: Mapping[str, float] | None = None,
    title: str = "Dev bias during the update",
) -> go.Figure:
    """One line per run: ``dev_bias`` (a fraction) against ``x`` (``"step"``) from each run's
    ``history`` (``PCGURun.history``: dicts with ``x`` and ``dev_bias``), with the ``target`` line;
    ``checkpoints[run]`` (the chosen step) is marked with a ring."""
    fig = go.Figure()
    for name, history in histories.items():
        points = [h for h in history if x in h]
        if not points:
            raise ValueError(f"run {name!r} has no history entries with {x!r}; its keys: {list(history[:1])}")
        xs, ys = [h[x] for h in points], [h["dev_bias"] for h in points]
        fig.add_scatter(x=xs, y=ys, mode="lines+markers", name=name)
        if checkpoints and name in checkpoints and checkpoints[name] in xs:
            at = xs.index(checkpoints[name])
            fig.add_scatter(
                x=[xs[at]], y=[ys[at]], mode="markers", name=f"{name}: chosen",
                marker={"size": 16, "symbol": "circle-open", "line": {"width": 2}},
            )
    _target_band(fig, target, tolerance)
    fig.update_layout(title=title, xaxis_title=x, yaxis={"title": "dev bias", "range": [-0.02, 1.05]})
    return fig


__all__ = ["bias_bars", "bias_history", "partition_heatmap"]
