"""Evaluation suites: each a function returning a result that serialises to JSON and a DataFrame."""

from mechedit.evaluate.facts import (
    EditReport,
    EvalRow,
    ReportFormatError,
    evaluate_fact_edit,
    fact_item_scores,
    fact_scores,
)

__all__ = [
    "EditReport",
    "EvalRow",
    "ReportFormatError",
    "evaluate_fact_edit",
    "fact_item_scores",
    "fact_scores",
]
