"""edit_bars: several edits' reports side by side, row by row."""

from __future__ import annotations

import pytest

from mechedit.evaluate import EditReport, EvalRow
from mechedit.viz import edit_bars


def _report(after_forget: float, after_ppl: float, *, before_forget: float = 1.0) -> EditReport:
    return EditReport(
        (
            EvalRow("efficacy", "exact_true", before_forget, after_forget, 14, "forget", "generated"),
            EvalRow("neighbourhood", "exact_true", 1.0, 0.9, 56, "forget", "generated"),
            EvalRow("efficacy", "exact_true", 1.0, 0.5, 14, "edit", "generated"),
            EvalRow("fluency", "perplexity", 5.0, after_ppl, 100, "forget", "teacher_forced"),
        ),
        {},
    )


ROWS = {"forgotten": ("forget", "efficacy", "exact_true"), "neighbours": ("forget", "neighbourhood", "exact_true")}


def test_edit_bars_draws_before_then_each_edit_per_row():
    fig = edit_bars({"a": _report(0.0, 5.1), "b": _report(0.25, 5.3)}, ROWS)
    assert [t.name for t in fig.data] == ["before", "a", "b"]
    assert all(list(t.x) == ["forgotten", "neighbours"] for t in fig.data)
    assert list(fig.data[0].y) == [1.0, 1.0]
    assert list(fig.data[1].y) == [0.0, 0.9]
    assert list(fig.data[2].y) == [0.25, 0.9]
    # the case narrows the row: the edit case's efficacy (after 0.5) is not the forget case's
    edit_row = edit_bars({"a": _report(0.0, 5.1)}, {"new": ("edit", "efficacy", "exact_true")})
    assert list(edit_row.data[1].y) == [0.5]
    assert fig.data[2].customdata[0][0] == pytest.approx(-0.75)  # change shown on hover
    assert fig.data[2].customdata[0][1] == 14


def test_edit_bars_refuses_reports_of_different_models_and_missing_rows():
    with pytest.raises(ValueError, match="same model"):
        edit_bars({"a": _report(0.0, 5.1), "b": _report(0.0, 5.1, before_forget=0.5)}, ROWS)
    with pytest.raises(KeyError, match="no row"):
        edit_bars({"a": _report(0.0, 5.1)}, {"x": ("forget", "paraphrase", "exact_true")})
    with pytest.raises(ValueError, match="no reports"):
        edit_bars({}, ROWS)
    with pytest.raises(ValueError, match="no rows"):
        edit_bars({"a": _report(0.0, 5.1)}, {})
