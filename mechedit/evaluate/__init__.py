"""Evaluation suites: each a function returning a result that serialises to JSON and a DataFrame."""

from mechedit.evaluate.attribution_check import AttributionCheck, verify_attribution
from mechedit.evaluate.bias import (
    PairPreference,
    StereoSetScores,
    fact_world_utility,
    pair_preference,
    stereoset_scores,
)
from mechedit.evaluate.controls import depn_controls
from mechedit.evaluate.facts import (
    EditReport,
    EvalRow,
    ReportFormatError,
    evaluate_fact_edit,
    fact_item_scores,
    fact_scores,
)
from mechedit.evaluate.privacy import (
    DIGITS,
    ExposureResult,
    MemorizationScores,
    PrivacyReport,
    Secret,
    SecretTokenScores,
    answer_flips,
    as_secrets,
    exposure,
    greedy_completions,
    is_masked_lm,
    memorization,
    mrr,
    privacy_report,
    secret_token_scores,
)

__all__ = [
    "DIGITS",
    "AttributionCheck",
    "EditReport",
    "EvalRow",
    "ExposureResult",
    "MemorizationScores",
    "PrivacyReport",
    "ReportFormatError",
    "Secret",
    "SecretTokenScores",
    "answer_flips",
    "depn_controls",
    "as_secrets",
    "PairPreference",
    "ReportFormatError",
    "StereoSetScores",
    "evaluate_fact_edit",
    "exposure",
    "fact_item_scores",
    "fact_scores",
    "greedy_completions",
    "is_masked_lm",
    "memorization",
    "mrr",
    "privacy_report",
    "secret_token_scores",
    "fact_world_utility",
    "pair_preference",
    "stereoset_scores",
    "verify_attribution",
]
