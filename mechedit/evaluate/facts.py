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
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mechedit.edit.weights import WeightEdit
from mechedit.metrics import perplexity, target_logprob, top1_correct
from mechedit.prompts import FactPrompt
from mechedit.tokens import tokenize_facts

REPORT_FORMAT = "mechedit.edit_report"
REPORT_VERSION = 1


@torch.no_grad()
def fact_item_scores(model: Any, facts: Sequence[FactPrompt], *, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-fact ``[n]`` tensors: ``p_target``, ``accuracy`` (and ``p_new``, ``new_beats_true``)."""
    if not facts:
        raise ValueError("no facts to score")
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(facts), batch_size):
        batch = tokenize_facts(model, list(facts[start : start + batch_size]))
        logits = model(batch.tokens)
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
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "rows": [asdict(r) for r in self.rows],
            "context": self.context,
        }

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | Path) -> EditReport:
        """Read a saved report, checking format, version and row fields."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read edit report {path}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            raise ValueError(f"{path} is not a {REPORT_FORMAT} file")
        if data.get("version") != REPORT_VERSION:
            raise ValueError(f"{path}: unsupported version {data.get('version')!r} (expected {REPORT_VERSION})")
        rows = []
        for i, row in enumerate(data.get("rows", [])):
            try:
                rows.append(EvalRow(str(row["suite"]), str(row["metric"]), float(row["before"]), float(row["after"]), int(row["n"])))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: rows[{i}] needs suite, metric, before, after, n") from None
        return cls(tuple(rows), dict(data.get("context", {})))


Edit = Any  # a WeightEdit, an ActivationEdit (or any context manager), or a callable returning one


@contextlib.contextmanager
def _applied(model: Any, edit: Edit) -> Iterator[None]:
    if isinstance(edit, WeightEdit):
        with edit.applied(model):
            yield
    elif hasattr(edit, "__enter__") and hasattr(edit, "__exit__"):
        with edit:
            yield
    elif callable(edit):
        with edit():
            yield
    else:
        raise TypeError(
            "edit must be a WeightEdit, an activation edit such as ablate(model, circuit), or a "
            f"callable returning a context manager; got {type(edit).__name__}"
        )


def _measure(model, suites: dict[str, Sequence[FactPrompt]], texts: Sequence[str], batch_size: int) -> dict:
    out = {name: fact_scores(model, facts, batch_size=batch_size) for name, facts in suites.items() if facts}
    if texts:
        out["fluency"] = {"perplexity": perplexity(model, list(texts), batch_size=batch_size)}
    return out


def evaluate_fact_edit(
    model: Any,
    *,
    edit: Edit,
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

    ``edit`` is a ``WeightEdit``, an activation edit (``ablate(model, circuit)``), or a
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
    with _applied(model, edit):
        after = _measure(model, suites, fluency_texts, batch_size)
    rows = tuple(
        EvalRow(suite, metric, value, after[suite][metric], sizes[suite])
        for suite, metrics in before.items()
        for metric, value in metrics.items()
    )
    return EditReport(rows, dict(context or {}))
