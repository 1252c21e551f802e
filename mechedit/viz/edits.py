"""Figures comparing several edits of one model on the same evaluation suites.

* ``edit_bars``: chosen rows of several ``EditReport``s side by side, one group of bars per row
  (suite and metric), the unedited model's value first and then each edit's.
* ``comparison_bars``: chosen columns of a ``LocalizationComparison`` (the same case edited
  through several localisations), the unedited model first and then each localisation.

Results in, ``plotly.graph_objects.Figure`` out; no model is touched here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import plotly.graph_objects as go

if TYPE_CHECKING:  # results in, no evaluation code needed at run time
    from mechedit.evaluate.compare import LocalizationComparison
    from mechedit.evaluate.facts import EditReport

#: a row of a report: (case, suite, metric), e.g. ``("forget", "efficacy", "exact_true")``
RowKey = tuple[str, str, str]


def edit_bars(
    reports: Mapping[str, EditReport],
    rows: Mapping[str, RowKey],
    *,
    title: str = "Before and after each edit",
    yaxis_title: str = "value",
    tolerance: float = 1e-6,
) -> go.Figure:
    """Grouped bars: for each chosen report row, its value before any edit and after each edit.

    Args:
        reports: edit name -> its ``EditReport`` (``evaluate_fact_edit``), all measured on the
            same model and suites, so their ``before`` values agree.
        rows: bar-group label -> ``(case, suite, metric)`` of the row to draw (``EditReport.get``
            with ``case``; the ``measure`` follows from the metric). Keep one scale per figure
            (accuracies in [0, 1] apart from perplexity).
        title, yaxis_title: the figure's labels.
        tolerance: largest allowed difference between two reports' ``before`` of one row.

    Returns:
        A figure with one bar trace named ``"before"`` (from the first report) and one per edit,
        in the order of ``reports``; the x axis lists ``rows``' labels in order; hovering a bar
        shows the value, its change from before and the number of items ``n``.

    Raises:
        ValueError: no reports or no rows; reports whose ``before`` of a row differs by more
            than ``tolerance`` (they were measured on different models or suites).
        KeyError: a row a report lacks (the message lists the rows it has).
    """
    if not reports:
        raise ValueError("no reports: pass {edit name: EditReport}")
    if not rows:
        raise ValueError('no rows: pass {label: (case, suite, metric)}, e.g. {"forgotten": ("forget", "efficacy", "exact_true")}')
    labels = list(rows)
    found = {name: [report.get(suite, metric, case=case) for case, suite, metric in rows.values()] for name, report in reports.items()}
    first_name, first = next(iter(found.items()))
    for name, got in found.items():
        for label, row, ref in zip(labels, got, first, strict=True):
            same = (math.isnan(row.before) and math.isnan(ref.before)) or abs(row.before - ref.before) <= tolerance
            if not same:
                raise ValueError(
                    f"{label!r}: before is {ref.before} in {first_name!r} but {row.before} in {name!r}; "
                    "compare reports measured on the same model and suites"
                )
    fig = go.Figure()
    fig.add_bar(
        name="before",
        x=labels,
        y=[r.before for r in first],
        customdata=[[0.0, r.n] for r in first],
        marker_color="#9d9d9d",
        hovertemplate="%{x}<br>before %{y:.4g}<br>n %{customdata[1]}<extra></extra>",
    )
    for name, got in found.items():
        fig.add_bar(
            name=name,
            x=labels,
            y=[r.after for r in got],
            customdata=[[r.change, r.n] for r in got],
            hovertemplate="%{x}<br>" + name + " %{y:.4g}<br>change %{customdata[0]:+.4g}<br>n %{customdata[1]}<extra></extra>",
        )
    fig.update_layout(barmode="group", title=title, yaxis_title=yaxis_title, margin={"t": 60, "b": 80})
    return fig


def comparison_bars(
    comparison: LocalizationComparison,
    columns: Mapping[str, str],
    *,
    title: str = "Edited through each localisation",
    yaxis_title: str = "accuracy",
) -> go.Figure:
    """Grouped bars of a ``LocalizationComparison``: one group per chosen column, one bar for the
    unedited model and one per localisation.

    Args:
        comparison: ``mechedit.evaluate.compare_localizations``' result.
        columns: bar-group label -> a column of ``comparison.to_frame()`` (e.g.
            ``{"forget, training templates": "forget/efficacy", "after relearning":
            "relearn"}``). Keep one scale per figure.
        title, yaxis_title: the figure's labels.

    Returns:
        A figure with a trace ``"original"`` (grey; columns the unedited model has no value for
        are left out of it) and one trace per localisation, in the comparison's order; hover
        shows the value, the circuit's size and the selected learning rate.

    Raises:
        ValueError: no columns; KeyError: a column the table lacks (the message lists them).
    """
    if not columns:
        raise ValueError('no columns: pass {label: column}, e.g. {"forgotten": "forget/efficacy"}')
    frame = comparison.to_frame()
    missing = [c for c in columns.values() if c not in frame.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the comparison; it has {sorted(map(str, frame.columns))}")
    labels = list(columns)
    fig = go.Figure()
    for name, row in frame.iterrows():
        values = [row[c] for c in columns.values()]
        if name == "original":
            fig.add_bar(name="original", x=labels, y=values, marker_color="#9d9d9d",
                        hovertemplate="%{x}<br>original %{y:.4g}<extra></extra>")
            continue
        fig.add_bar(
            name=str(name), x=labels, y=values,
            customdata=[[row.get("n_params"), row.get("lr")]] * len(labels),
            hovertemplate="%{x}<br>" + str(name)
            + " %{y:.4g}<br>%{customdata[0]:,} parameters, lr %{customdata[1]:.2g}<extra></extra>",
        )
    fig.update_layout(barmode="group", title=title, yaxis_title=yaxis_title, margin={"t": 60, "b": 80})
    return fig


def relation_bars(report: EditReport, *, metric: str = "accuracy", title: str | None = None) -> go.Figure:
    """Before/after bars per suite and relation (``report.by_relation(metric)``), hover with item counts.

    ``report``: an ``EditReport`` from ``evaluate_fact_edit``. One bar pair per (suite, relation),
    so a collateral drop concentrated in one relation is visible at a glance.
    """
    frame = report.by_relation(metric)
    labels = [f"{s} / {r}" if not c else f"{c}: {s} / {r}" for c, s, r in zip(frame["case"], frame["suite"], frame["relation_id"])]
    fig = go.Figure()
    for when, colour in (("before", "#4c78a8"), ("after", "#e45756")):
        fig.add_bar(x=labels, y=frame[when], name=when, marker_color=colour, customdata=frame["n"],
                    hovertemplate="%{x}<br>" + when + f" {metric} %{{y:.3f}}<br>%{{customdata}} items<extra></extra>")
    fig.update_layout(barmode="group", title=title or f"{metric} per suite and relation, before and after the edit",
                      yaxis_title=metric, height=420, xaxis_tickangle=-30)
    return fig
