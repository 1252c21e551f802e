"""The fact-edit report: efficacy, generalisation, specificity and fluency, before vs after.

Suites (CounterFact's, Meng et al. 2022), each measured on the unedited and the edited model:

* ``efficacy`` - the edited facts' own prompts;
* ``generalisation`` - paraphrases of them (for the fact world: held-out templates);
* ``specificity`` - neighbourhood facts (other subjects, same relation and true value), which
  an edit should leave alone;
* ``fluency`` - perplexity on unrelated held-out text.

Per fact suite the metrics are ``p_target`` (mean probability of the *true* target over the whole
vocabulary), ``accuracy`` (fraction where the true target is the greedy next token) and, when the
facts carry a ``target_new``, ``p_new`` and ``new_beats_true`` (fraction with P(new) > P(true),
ROME's efficacy score). For forgetting, efficacy is a *drop* in ``accuracy``; for specificity,
the ideal change is none.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mechedit.artifacts import (
    ArtifactError,
    check_json_able,
    check_keys,
    check_type,
    read_json,
    write_json_atomic,
)
from mechedit.checks import require_eval_mode
from mechedit.edit import Edit
from mechedit.edit.protocol import applied_edit
from mechedit.interventions import real_tokens
from mechedit.metrics import perplexity, target_logprob, top1_correct
from mechedit.models import model_device
from mechedit.prompts import FactPrompt
from mechedit.tokens import tokenize_facts

REPORT_FORMAT = "mechedit.edit_report"
REPORT_VERSION = 1
# JSON has no NaN or infinities; a metric can be either (perplexity of an impossible text), so the
# report stores those as these strings.
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class ReportFormatError(ArtifactError):
    """A saved edit report that is missing, malformed, or of another format or version."""


def _number_to_json(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _number_from_json(value: object, *, where: str) -> float:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    check_type(value, (int, float), error=ReportFormatError, where=where)
    return float(value)


@torch.no_grad()
def fact_item_scores(model: Any, facts: Sequence[FactPrompt], *, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-fact ``[n]`` tensors: ``p_target``, ``accuracy`` (and ``p_new``, ``new_beats_true``).

    Each batch runs inside ``real_tokens(batch)``, so an applied activation edit at ``pos=-1``
    edits every prompt's own last token. Tensors are on the model's device.
    """
    if not facts:
        raise ValueError("no facts to score")
    require_eval_mode(model, what="fact scoring")
    device = model_device(model)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(facts), batch_size):
        batch = tokenize_facts(model, list(facts[start : start + batch_size]))
        with real_tokens(batch):
            logits = model(batch.tokens.to(device))
        lp_true = target_logprob(logits, batch.target_ids, batch.last_positions)
        row = {
            "p_target": lp_true.exp(),
            "accuracy": top1_correct(logits, batch.target_ids, batch.last_positions).float(),
        }
        if batch.target_new_ids is not None:
            lp_new = target_logprob(logits, batch.target_new_ids, batch.last_positions)
            row["p_new"] = lp_new.exp()
            row["new_beats_true"] = (lp_new > lp_true).float()
        for key, value in row.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def fact_scores(model: Any, facts: Sequence[FactPrompt], *, batch_size: int = 256) -> dict[str, float]:
    """Means over ``facts`` of ``fact_item_scores``."""
    return {key: value.mean().item() for key, value in fact_item_scores(model, facts, batch_size=batch_size).items()}


@dataclass(frozen=True)
class EvalRow:
    """One metric of one suite, before and after an edit, over ``n`` items."""

    suite: str
    metric: str
    before: float
    after: float
    n: int

    @property
    def change(self) -> float:
        return self.after - self.before


@dataclass(frozen=True)
class EditReport:
    """Before/after rows of an edit evaluation, with free-form context (edit description, seeds)."""

    rows: tuple[EvalRow, ...]
    context: dict[str, Any]

    def get(self, suite: str, metric: str) -> EvalRow:
        """The row for ``suite`` / ``metric``; ``KeyError`` listing the rows that exist."""
        for row in self.rows:
            if (row.suite, row.metric) == (suite, metric):
                return row
        raise KeyError(f"no row {suite}/{metric}; rows: {[(r.suite, r.metric) for r in self.rows]}")

    def to_frame(self) -> pd.DataFrame:
        """Columns suite, metric, before, after, change, n."""
        return pd.DataFrame([{**asdict(r), "change": r.change} for r in self.rows])[
            ["suite", "metric", "before", "after", "change", "n"]
        ]

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON document (non-finite before/after values as ``"nan"``/``"inf"``/``"-inf"``)."""
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "rows": [
                {**asdict(r), "before": _number_to_json(r.before), "after": _number_to_json(r.after)}
                for r in self.rows
            ],
            "context": self.context,
        }

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically); ``ValueError`` if ``context`` is not plain JSON."""
        check_json_able(self.context, "EditReport.context")
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EditReport:
        """Read a saved report; ``ReportFormatError`` (only) for anything missing or malformed."""
        err = ReportFormatError
        data = read_json(
            path,
            fmt=REPORT_FORMAT,
            version=REPORT_VERSION,
            error=err,
            expected="a report JSON written by EditReport.save",
        )
        check_keys(data, required=("format", "version", "rows", "context"), error=err, where=str(path))
        check_type(data["rows"], list, error=err, where=f"{path}: 'rows'")
        check_type(data["context"], dict, error=err, where=f"{path}: 'context'")
        rows = []
        fields = ("suite", "metric", "before", "after", "n")
        for i, row in enumerate(data["rows"]):
            at = f"{path}: rows[{i}]"
            check_type(row, dict, error=err, where=at)
            check_keys(row, required=fields, error=err, where=at)
            check_type(row["suite"], str, error=err, where=f"{at}['suite']")
            check_type(row["metric"], str, error=err, where=f"{at}['metric']")
            check_type(row["n"], int, error=err, where=f"{at}['n']")
            rows.append(
                EvalRow(
                    row["suite"],
                    row["metric"],
                    _number_from_json(row["before"], where=f"{at}['before']"),
                    _number_from_json(row["after"], where=f"{at}['after']"),
                    row["n"],
                )
            )
        return cls(tuple(rows), data["context"])


def _measure(model, suites: dict[str, Sequence[FactPrompt]], texts: Sequence[str], batch_size: int) -> dict:
    out = {name: fact_scores(model, facts, batch_size=batch_size) for name, facts in suites.items() if facts}
    if texts:
        out["fluency"] = {"perplexity": perplexity(model, list(texts), batch_size=batch_size)}
    return out


def evaluate_fact_edit(
    model: Any,
    *,
    edit: Edit | Callable[[], contextlib.AbstractContextManager[Any]],
    edited: Sequence[FactPrompt],
    paraphrases: Sequence[FactPrompt] = (),
    neighbours: Sequence[FactPrompt] = (),
    fluency_texts: Sequence[str] = (),
    extra: dict[str, Sequence[FactPrompt]] | None = None,
    batch_size: int = 256,
    context: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> EditReport:
    """Measure every suite on ``model`` as it is, then with ``edit`` applied, and report both.

    ``edit`` is an ``Edit`` (``mechedit.edit.Edit``: a ``WeightEdit`` or an activation edit
    such as ``ablate(model, circuit)``), applied with ``edit.applied(model)``, or a
    zero-argument callable returning a context manager. The model is left exactly as it was
    given. ``extra`` adds named fact suites (e.g. the same subject's other facts). Empty suites
    are skipped.
    """
    suites = {"efficacy": edited, "generalisation": paraphrases, "specificity": neighbours, **(extra or {})}
    sizes = {name: len(facts) for name, facts in suites.items()}
    sizes["fluency"] = len(fluency_texts)
    if progress:
        progress("measuring before the edit")
    before = _measure(model, suites, fluency_texts, batch_size)
    if progress:
        progress("measuring with the edit")
    with applied_edit(model, edit):
        after = _measure(model, suites, fluency_texts, batch_size)
    rows = tuple(
        EvalRow(suite, metric, value, after[suite][metric], sizes[suite])
        for suite, metrics in before.items()
        for metric, value in metrics.items()
    )
    return EditReport(rows, dict(context or {}))
