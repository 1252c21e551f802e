"""Plotly figures from ``Scores`` and evaluation tables.

Every function takes results (never a model) and returns a ``plotly.graph_objects.Figure``, which
is interactive in a notebook and goes into an HTML report with ``mechedit.viz.write_report``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import plotly.graph_objects as go
import torch

from mechedit.components import Component
from mechedit.scores import Scores

if TYPE_CHECKING:
    from mechedit.probes import ProbeResult


def _axis_ticks(scores: Scores, axis: str) -> list[str]:
    size = scores.values.shape[scores.axes.index(axis)]
    labels = scores.labels.get(axis)
    if labels is None:
        return [str(i) for i in range(size)]
    # tokens repeat ("the", ","): prefix the index so every tick is distinct and readable
    return [f"{i}: {name}" for i, name in enumerate(labels)]


def _recorded_span(scores: Scores) -> tuple[int, int] | None:
    span = scores.config.get("subject_span", scores.config.get("changed_span"))
    if isinstance(span, (list, tuple)) and span and isinstance(span[0], (list, tuple)):
        span = span[0]
    if isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(v, int) for v in span):
        return int(span[0]), int(span[1])
    return None


def _coordinate(component: Component, axis: str, size: int) -> int:
    """The index of ``component`` along a heatmap axis (``layer``, ``neuron``, ``head``, ``pos``)."""
    value = getattr(component, axis, None)
    if value is None:
        raise ValueError(f"cannot mark {component!r} on a heatmap with axis {axis!r}: it has no {axis}")
    value = int(value)
    if not -size <= value < size:
        raise ValueError(f"cannot mark {component!r}: {axis} {value} is outside the axis (size {size})")
    return value % size


def heatmap(
    scores: Scores,
    *,
    y: str | None = None,
    x: str | None = None,
    reduce: str = "mean",
    title: str | None = None,
    colorscale: str = "RdBu",
    zmid: float | None = 0.0,
    height: int | None = None,
    mark_span: tuple[int, int] | None = None,
    mark: Iterable[Component] | None = None,
    notes: Mapping[Component, str] | None = None,
    order: str = "raw",
    max_columns: int = 4096,
) -> go.Figure:
    """A heatmap of two axes of ``scores`` (others reduced by ``reduce``).

    Defaults: ``y`` is ``"layer"`` when present, ``x`` the first other axis, so
    ``("layer", "neuron")`` scores give layer x neuron, ``("layer", "pos")`` layer x position with
    token labels, ``("layer", "head")`` layer x head. Hovering a cell shows both coordinates (with
    the token for positions) and the value. The colour scale is centred on ``zmid`` (0 by default,
    since scores are signed effects); pass ``zmid=None`` for unsigned scores.

    ``mark_span=(start, end)`` outlines positions ``start .. end - 1`` of a ``pos`` x axis (e.g.
    the subject's tokens); by default the span a locator recorded in
    ``scores.config["subject_span"]`` (for several prompts, the first one's) or
    ``["changed_span"]`` (where activation patching's first clean/corrupt pair differs).

    ``mark`` outlines the cells of selected components (e.g. ``scores.top_k(24)``, a ``Circuit``),
    as one scatter trace named ``"selected"`` (hover: the component): each component must carry
    both plotted coordinates (``layer`` and its ``neuron`` / ``head`` / ``pos``). ``notes``
    (``{component: text}``, e.g. ``mechedit.unembedding.promoted_tokens`` joined) is added to a
    marked component's hover.

    ``order="sorted"`` sorts each row by ``|score|``, largest first (x becomes the rank; hover
    shows the original index), and shows the first ``max_columns`` ranks. In raw order an x axis
    longer than ``max_columns`` (e.g. 11,008 neurons) is shown in bins of adjacent entries, each
    the entry of largest ``|score|`` (sign kept), so a heatmap of a 7B model stays responsive.
    """
    if order not in ("raw", "sorted"):
        raise ValueError(f"order must be 'raw' or 'sorted', got {order!r}")
    if max_columns < 1:
        raise ValueError(f"max_columns must be >= 1, got {max_columns}")
    if scores.values.ndim < 2:
        raise ValueError(f"a heatmap needs two axes; these scores have {scores.axes}")
    y = y or ("layer" if "layer" in scores.axes else scores.axes[0])
    x = x or next(a for a in scores.axes if a != y)
    for axis in (x, y):
        if axis not in scores.axes:
            raise ValueError(f"no axis {axis!r}; axes are {scores.axes}")
    if x == y:
        raise ValueError("x and y must be different axes")
    reduced = scores
    for axis in [a for a in scores.axes if a not in (x, y)]:
        reduced = reduced.reduce(axis, op=reduce)
    values = reduced.values.float()
    if reduced.axes.index(y) > reduced.axes.index(x):
        values = values.T
    xt, yt = _axis_ticks(reduced, x), _axis_ticks(reduced, y)
    marked = list(mark) if mark is not None else []
    cells = [(_coordinate(c, x, len(xt)), _coordinate(c, y, len(yt)), c) for c in marked]
    # source[row][column]: the original x entry a displayed cell shows (sorted or binned axes)
    if order == "sorted":
        ranked = values.abs().argsort(dim=1, descending=True, stable=True)[:, :max_columns]
        values = values.gather(1, ranked)
        source = ranked
        x_labels = [str(r) for r in range(values.shape[1])]
        cells = [(int((ranked[j] == i).nonzero()[0, 0]), j, c) for i, j, c in cells if (ranked[j] == i).any()]
        hover_x = [[xt[i] for i in row] for row in source.tolist()]
    elif len(xt) > max_columns:
        width = -(-len(xt) // max_columns)
        pad = (-values.shape[1]) % width
        blocks = torch.nn.functional.pad(values, (0, pad)).reshape(values.shape[0], -1, width)
        pick = blocks.abs().argmax(-1, keepdim=True)
        values = blocks.gather(-1, pick).squeeze(-1)
        source = (pick.squeeze(-1) + torch.arange(values.shape[1]) * width).clamp(max=len(xt) - 1)
        x_labels = [f"{b * width}-{min(len(xt), (b + 1) * width) - 1}" for b in range(values.shape[1])]
        cells = [(i // width, j, c) for i, j, c in cells]
        hover_x = [[xt[i] for i in row] for row in source.tolist()]
    else:
        x_labels, hover_x = xt, None
    heat = go.Heatmap(
        z=values.cpu().numpy(),
        x=x_labels,
        y=yt,
        colorscale=colorscale,
        zmid=zmid,
        hovertemplate=f"{y} %{{y}}<br>{x} %{{x}}<br>score %{{z:.4g}}<extra></extra>",
        colorbar={"title": {"text": "score"}},
    )
    if hover_x is not None:
        what = "rank" if order == "sorted" else "bin"
        heat.update(customdata=hover_x, hovertemplate=(
            f"{y} %{{y}}<br>{x} %{{customdata}} ({what} %{{x}})<br>score %{{z:.4g}}<extra></extra>"))
    fig = go.Figure(heat)
    if cells:
        notes = notes or {}
        fig.add_scatter(
            x=[x_labels[i] for i, _, _ in cells], y=[yt[j] for _, j, _ in cells], mode="markers",
            name="selected", text=[str(c) + (f"<br>{notes[c]}" if c in notes else "") for _, _, c in cells],
            hovertemplate="%{text}<extra>selected</extra>",
            marker={"symbol": "square-open", "size": 9, "color": "black", "line": {"width": 2}},
        )
    span = mark_span if mark_span is not None else _recorded_span(scores) if x == "pos" else None
    if span is not None:
        start, end = int(span[0]), int(span[1])
        fig.add_shape(
            type="rect", xref="x", yref="paper", x0=start - 0.5, x1=end - 0.5, y0=0, y1=1,
            line={"color": "black", "width": 2}, fillcolor="rgba(0,0,0,0)",
        )
    fig.update_layout(
        title=title or f"{scores.method}: {scores.site} scores ({y} x {x})",
        xaxis_title=x,
        yaxis_title=y,
        yaxis={"autorange": "reversed"} if y == "layer" else {},
        height=height or max(300, 40 * len(yt) + 150),
        margin={"l": 60, "r": 20, "t": 60, "b": 60},
    )
    return fig


def before_after(
    table: pd.DataFrame,
    *,
    metric_col: str = "metric",
    before_col: str = "before",
    after_col: str = "after",
    group_cols: Sequence[str] = ("suite",),
    title: str = "Before and after the edit",
) -> go.Figure:
    """Grouped bars of each metric before and after an edit, from an evaluation DataFrame.

    Rows are labelled ``"<group> / <metric>"``; hover shows the exact values and the change.
    Quantities on very different scales (a perplexity next to probabilities) read better as
    separate figures: filter the table first.
    """
    missing = [c for c in (metric_col, before_col, after_col, *group_cols) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; it has {list(table.columns)}")
    names = [" / ".join(str(row[c]) for c in (*group_cols, metric_col)) for _, row in table.iterrows()]
    delta = (table[after_col] - table[before_col]).tolist()
    fig = go.Figure()
    for col, colour in ((before_col, "#4c78a8"), (after_col, "#e45756")):
        fig.add_bar(
            name=col,
            x=names,
            y=table[col].tolist(),
            marker_color=colour,
            customdata=delta,
            hovertemplate="%{x}<br>" + col + " %{y:.4g}<br>change %{customdata:+.4g}<extra></extra>",
        )
    fig.update_layout(barmode="group", title=title, yaxis_title="value", margin={"t": 60, "b": 120})
    return fig


def _node_place(label: str, n_heads: int) -> tuple[float, float]:
    """Where a writer/reader label sits: x = layer stage (embed left, logits right), y = row."""
    if label == "embed":
        return 0.0, n_heads / 2
    if label == "logits":
        return float("inf"), n_heads / 2
    if label.startswith("m"):
        return 2 * int(label[1:]) + 2.0, n_heads / 2
    layer, head = label[1:].split(".")[:2]
    return 2 * int(layer) + 1.0, float(head[1:])


def edge_graph(
    edges: Sequence[Sequence[Any]],
    *,
    n_heads: int,
    title: str = "edge circuit",
) -> go.Figure:
    """An edge circuit as a graph: heads and MLPs by layer, edges coloured by sign.

    Args:
        edges: ``(writer, reader, score)`` triples, as ``EdgeAttribution.top_edges`` /
            ``greedy_edges`` give them (labels ``embed``, ``a{l}.h{h}``, ``m{l}``; a reader's
            ``.q`` / ``.k`` / ``.v`` is shown on the edge's hover text).
        n_heads: heads per layer (rows of the drawing).

    Line width grows with ``|score|``; blue raises the metric, red lowers it.
    """
    if not edges:
        raise ValueError("no edges to draw")
    nodes: dict[str, tuple[float, float]] = {}
    for writer, reader, _ in edges:
        for label in (writer, reader.rsplit(".", 1)[0] if reader.count(".") == 2 else reader):
            nodes.setdefault(label, _node_place(label, n_heads))
    right = max((x for x, _ in nodes.values() if x != float("inf")), default=0.0) + 1
    nodes = {k: (right if x == float("inf") else x, y) for k, (x, y) in nodes.items()}
    biggest = max(abs(float(s)) for *_, s in edges) or 1.0
    fig = go.Figure()
    for writer, reader, score in edges:
        target = reader.rsplit(".", 1)[0] if reader.count(".") == 2 else reader
        (x0, y0), (x1, y1) = nodes[writer], nodes[target]
        fig.add_scatter(
            x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text", showlegend=False,
            text=f"{writer} -> {reader}: {float(score):+.3g}",
            line={"width": 0.5 + 6 * abs(float(score)) / biggest, "color": "#2b6cb0" if score >= 0 else "#c53030"},
        )
    fig.add_scatter(
        x=[x for x, _ in nodes.values()], y=[y for _, y in nodes.values()], mode="markers+text",
        text=list(nodes), textposition="top center", marker={"size": 10, "color": "#444"}, showlegend=False,
    )
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False}, height=450)
    return fig


def probe_curves(
    results: Mapping[str, ProbeResult],
    *,
    title: str = "Linear-probe accuracy by depth (held-out subjects)",
) -> go.Figure:
    """Test accuracy of per-depth linear probes (``mechedit.probes``), one line per result.

    Args:
        results: label -> ``ProbeResult`` (e.g. ``{"subject's last token": ..., "final token":
            ...}``, or the same probe on an original and an edited model); all must share their
            depths.

    Returns:
        A figure with one line per result (x: depth names, y: test accuracy; hover adds the
        train accuracy) and a dotted line per result at its ``chance`` (the majority label).

    Raises:
        ValueError: no results, or results probed at different depths.
    """
    if not results:
        raise ValueError('no results: pass {label: ProbeResult}, e.g. {"final token": attribute_probes(...)}')
    depths = next(iter(results.values())).depths
    for label, result in results.items():
        if result.depths != depths:
            raise ValueError(f"{label!r} was probed at depths {result.depths}, the first at {depths}")
    fig = go.Figure()
    for label, result in results.items():
        fig.add_scatter(
            name=label, x=list(depths), y=result.test_accuracy.tolist(), mode="lines+markers",
            customdata=[[v] for v in result.train_accuracy.tolist()],
            hovertemplate="%{x}<br>" + label + ": test %{y:.3f}, train %{customdata[0]:.3f}<extra></extra>",
        )
        fig.add_scatter(
            name=f"{label}: chance", x=list(depths), y=[result.chance] * len(depths), mode="lines",
            line={"dash": "dot", "width": 1}, hoverinfo="skip", showlegend=True,
        )
    fig.update_layout(title=title, xaxis_title="depth (residual stream)", yaxis_title="probe accuracy",
                      yaxis_range=[0, 1.02], margin={"t": 60, "b": 80})
    return fig
