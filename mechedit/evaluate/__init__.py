"""Evaluation suites: each a function returning a result that serialises to JSON and a DataFrame."""

from mechedit.evaluate.attribution_check import AttributionCheck, verify_attribution
from mechedit.evaluate.bias import (
    PairPreference,
    StereoSetScores,
    fact_world_utility,
    pair_preference,
    stereoset_scores,
)
from mechedit.evaluate.facts import (
    EditReport,
    EvalRow,
    ReportFormatError,
    evaluate_fact_edit,
    fact_item_scores,
    fact_scores,
)

__all__ = [
    "AttributionCheck",
    "EditReport",
    "EvalRow",
    "PairPreference",
    "ReportFormatError",
    "StereoSetScores",
    "evaluate_fact_edit",
    "fact_item_scores",
    "fact_scores",
    "fact_world_utility",
    "pair_preference",
    "stereoset_scores",
    "verify_attribution",
]
