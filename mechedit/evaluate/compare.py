"""Which localisation makes an unlearning edit robust? One table, same objective everywhere.

Mechanistic Unlearning (Guo et al. 2024) edits the same facts through circuits found by different
localisations - fact lookup, causal tracing, attribution patching, nothing (all MLPs / all
weights) - with one objective and a small learning-rate sweep, and asks which edit survives other
question formats and attacks. ``compare_localizations`` runs that protocol on any model:

1. **Sweep.** For every localisation and every learning rate in ``config.lrs``,
   ``mechedit.edit.finetune`` trains only the circuit's parameters with ``config.finetune``'s
   objectives and steps (the learning rate replaced), on the case's ``efficacy`` prompts (forget:
   the true answers go; edit: the new answers come) and ``retain``.
2. **Select** one learning rate per localisation, the same rule for all: among the rates whose
   retain exact-match accuracy stays >= ``config.min_retain``, the one with the lowest efficacy
   score (forget: old-answer exact match; edit: one minus new-answer exact match); ties go to
   the smaller rate. When no rate keeps the retain set, the one that keeps it best.
3. **Evaluate** the selected edit with ``mechedit.evaluate.robustness`` (accuracies in training
   templates, held-out paraphrases and multiple choice, specificity, perplexity, and the attacks:
   relearning, latent probe, latent adversarial perturbation, direction ablation).

Localisations that name the same components (attribution patching often picks fact lookup's
layer) are trained and evaluated once - the runs are deterministic - and share their results.

The result, ``LocalizationComparison``, holds one row per localisation (its size in parameter
entries, the selected rate, steps, and every robustness measure), the whole sweep, and the
settings; it saves to JSON (format ``mechedit.localization_comparison``, version 1) and draws as a
grouped bar chart (``mechedit.viz.comparison_bars``).

Localisations should be compared at **equal budget** (``mechedit.budget.grow_to_budget`` grows a
locator's circuit to a parameter count); the table reports each circuit's size so a reader can
check. The model is left unchanged (every edit is applied and reverted; tested bit-for-bit).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mechedit.artifacts import (
    ArtifactError,
    check_json_able,
    check_keys,
    check_type,
    read_json,
    write_json_atomic,
)
from mechedit.checks import require_eval_mode
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.edit.finetune import FinetuneConfig, covered_masks, exact_match, finetune
from mechedit.evaluate.facts import FactEditSuites
from mechedit.evaluate.robustness import robustness_report
from mechedit.progress import tqdm
from mechedit.prompts import FactPrompt
from mechedit.provenance import weights_hash

__all__ = [
    "ComparisonConfig",
    "ComparisonFormatError",
    "LocalizationComparison",
    "compare_localizations",
]

FORMAT = "mechedit.localization_comparison"
VERSION = 1


class ComparisonFormatError(ArtifactError):
    """A saved comparison that is missing, malformed, or of another format or version."""


@dataclass(frozen=True)
class ComparisonConfig:
    """Settings of ``compare_localizations``.

    Attributes:
        finetune: the objectives, steps, batch size and stopping rules every localisation is
            trained with; its ``lr`` is replaced by each rate of ``lrs``.
        lrs: the learning-rate sweep (each > 0), tried for every localisation.
        min_retain: the retain set's exact-match accuracy a selected rate must keep, in [0, 1].
        robustness: settings passed to the robustness evaluation (``None``: its defaults).
    """

    finetune: FinetuneConfig
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    min_retain: float = 0.9
    robustness: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.finetune, FinetuneConfig):
            raise ValueError(
                f"finetune must be a FinetuneConfig (objectives, steps, ...), got {type(self.finetune).__name__}"
            )
        lrs = (self.lrs,) if isinstance(self.lrs, (int, float)) else tuple(self.lrs)
        if not lrs or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in lrs):
            raise ValueError(f"lrs must be one or more finite learning rates > 0, got {self.lrs!r}")
        object.__setattr__(self, "lrs", tuple(float(x) for x in lrs))
        if not 0.0 <= float(self.min_retain) <= 1.0:
            raise ValueError(f"min_retain must be in [0, 1], got {self.min_retain!r}")

    def to_dict(self) -> dict[str, Any]:
        rob = self.robustness
        return {
            "finetune": self.finetune.to_dict(),
            "lrs": list(self.lrs),
            "min_retain": self.min_retain,
            "robustness": None if rob is None else (rob.to_dict() if hasattr(rob, "to_dict") else dataclasses.asdict(rob)),
        }


@dataclass(frozen=True)
class LocalizationComparison:
    """The comparison's table, sweep and settings.

    Attributes:
        rows: one dict per localisation, in the order given: ``localization``, ``n_params``
            (parameter entries the circuit covers), ``lr`` (selected), ``steps`` (taken),
            ``retain_exact``, then every robustness measure as ``"<set>/<measure>"`` (the
            edited model's value) and, per attack, ``"<attack>"`` (the attacked value) and
            ``"<attack>/recovery"``.
        sweep: one dict per (localisation, rate) tried: ``localization``, ``lr``, ``steps``,
            ``efficacy_exact`` (old answer for a forget case, new answer for an edit case) and
            ``retain_exact``.
        original: the unedited model's value of every ``"<set>/<measure>"`` column.
        case: ``"forget"`` or ``"edit"``.
        config: ``ComparisonConfig.to_dict()``.
        model: the model's name and weights hash.
    """

    rows: tuple[dict[str, Any], ...]
    sweep: tuple[dict[str, Any], ...]
    original: dict[str, float]
    case: str
    config: dict[str, Any] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """The table: one row per localisation plus a first row ``"original"`` (unedited)."""
        first = {"localization": "original", **self.original}
        return pd.DataFrame([first, *self.rows]).set_index("localization")

    def headline(self, *, measure: str = "choice_accuracy_true") -> pd.DataFrame:
        """The issue's table: per localisation its size, rate, the forget facts' ``measure`` in
        training templates, paraphrases and multiple choice, the retain set's and the
        neighbours', held-out perplexity, and each attack's score on the held-out forget half with
        its recovery (probe attacks: the probe's accuracy at the depth named in the column).
        Columns the comparison did not measure are left out."""
        frame = self.to_frame()
        wanted = {
            "n_params": "n_params", "lr": "lr",
            "forget": f"forget/efficacy/{measure}",
            "forget, paraphrases": f"forget/paraphrase/{measure}",
            "forget, multiple choice": f"forget/multiple_choice/{measure}",
            "retain": f"retain/efficacy/{measure}",
            "neighbours": f"forget/neighbourhood/{measure}",
            "perplexity": "forget/fluency/perplexity",
        }
        attacks = sorted({c.split("/")[0] for c in frame.columns if c.endswith(f"/efficacy/{measure}/recovery")},
                         key=lambda a: list(frame.columns).index(f"{a}/efficacy/{measure}"))
        for attack in attacks:
            wanted[attack] = f"{attack}/efficacy/{measure}"
            wanted[f"{attack}: recovery"] = f"{attack}/efficacy/{measure}/recovery"
        # Probe attacks score a probe, not an answer: one column per probe attack, at its depth.
        for column in frame.columns:
            parts = column.split("/")
            if len(parts) == 3 and parts[1] == "probe" and parts[0] not in ("forget", "retain", "forget_heldout"):
                wanted[f"{parts[0]} ({parts[2]})"] = column
                wanted[f"{parts[0]}: recovery"] = f"{column}/recovery"
        present = {label: col for label, col in wanted.items() if col in frame.columns}
        return frame[list(present.values())].set_axis(list(present), axis=1)

    def sweep_frame(self) -> pd.DataFrame:
        """Every (localisation, rate) tried, with its efficacy and retain exact match."""
        return pd.DataFrame(list(self.sweep))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "case": self.case,
            "rows": [dict(r) for r in self.rows],
            "sweep": [dict(r) for r in self.sweep],
            "original": dict(self.original),
            "config": self.config,
            "model": self.model,
        }

    def save(self, path: str | Path) -> Path:
        """Write the comparison as JSON (atomically); non-finite numbers are stored as strings."""
        data = _json_numbers(self.to_dict())
        check_json_able(data, "the comparison")
        return write_json_atomic(Path(path), data)

    @classmethod
    def load(cls, path: str | Path) -> LocalizationComparison:
        """Read a saved comparison, checking its format, version and fields."""
        data = read_json(
            path, fmt=FORMAT, version=VERSION, error=ComparisonFormatError,
            expected="a JSON file written by LocalizationComparison.save",
        )
        where = str(path)
        keys = ("format", "version", "case", "rows", "sweep", "original", "config", "model")
        check_keys(data, required=keys, error=ComparisonFormatError, where=where)
        for key in ("rows", "sweep"):
            check_type(data[key], list, error=ComparisonFormatError, where=f"{where}: {key}")
            for i, row in enumerate(data[key]):
                check_type(row, dict, error=ComparisonFormatError, where=f"{where}: {key}[{i}]")
                if not isinstance(row.get("localization"), str):
                    raise ComparisonFormatError(f"{where}: {key}[{i}] has no 'localization' name")
        for key in ("original", "config", "model"):
            check_type(data[key], dict, error=ComparisonFormatError, where=f"{where}: {key}")
        if data["case"] not in ("forget", "edit"):
            raise ComparisonFormatError(f"{where}: 'case' must be 'forget' or 'edit', got {data['case']!r:.40}")
        back = _json_numbers(data, back=True)
        return cls(
            rows=tuple(back["rows"]), sweep=tuple(back["sweep"]), original=back["original"],
            case=back["case"], config=back["config"], model=back["model"],
        )


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_numbers(value: Any, *, back: bool = False) -> Any:
    # JSON has no NaN/inf (a recovery with original == edited is NaN): store them as strings.
    if isinstance(value, dict):
        return {k: _json_numbers(v, back=back) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_numbers(v, back=back) for v in value]
    if back and isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if not back and isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _checked_localizations(model: Any, localizations: Any) -> dict[str, Circuit | str]:
    if not isinstance(localizations, Mapping) or not localizations:
        raise ValueError(
            "localizations must be a non-empty dict of name -> Circuit (or 'all'), e.g. "
            "{'fact lookup': lookup.mlps, 'causal tracing': traced, 'all MLPs': 'all_mlps'}"
        )
    out: dict[str, Circuit | str] = {}
    for name, circuit in localizations.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"localization names must be non-empty strings, got {name!r}")
        if isinstance(circuit, str):
            if circuit not in ("all", "all_mlps"):
                raise ValueError(
                    f"localization {name!r}: the only named circuits are 'all' (every weight) and "
                    f"'all_mlps' (every MLP block), got {circuit!r}"
                )
            if circuit == "all_mlps":
                circuit = Circuit.of(
                    model, [Component("mlp", layer) for layer in range(model.cfg.n_layers)],
                    method="all_mlps", description="every MLP block",
                )
        elif isinstance(circuit, Iterable) and not isinstance(circuit, Circuit):
            circuit = Circuit(tuple(circuit))
        if isinstance(circuit, Circuit):
            if not len(circuit):
                raise ValueError(
                    f"localization {name!r} is an empty circuit: nothing to train. Drop it, or grow "
                    "it to a budget (mechedit.budget.grow_to_budget)"
                )
            circuit.check_model(model, strict=True)
        out[name] = circuit
    return out


def _n_params(model: Any, circuit: Circuit | str) -> int:
    return int(sum(int(mask.sum()) for mask in covered_masks(model, circuit).values()))


def _pairs(prompts: Sequence[FactPrompt], *, new: bool) -> list[tuple[str, str]]:
    return [(p.prompt, p.target_new if new else p.target) for p in prompts]


def _select(tried: list[dict[str, Any]], min_retain: float) -> dict[str, Any]:
    kept = [t for t in tried if t["retain_exact"] >= min_retain]
    if not kept:
        best = max(t["retain_exact"] for t in tried)
        kept = [t for t in tried if t["retain_exact"] == best]
    return min(kept, key=lambda t: (t["efficacy_loss"], t["lr"]))


def compare_localizations(
    model: Any,
    localizations: Mapping[str, Circuit | Iterable[Component] | str],
    *,
    case: FactEditSuites,
    retain: FactEditSuites,
    config: ComparisonConfig,
    workspace: Any,
    progress: bool = True,
) -> LocalizationComparison:
    """Edit ``case`` through each localisation and compare how robust the edits are.

    Args:
        model: a causal-LM bridge in eval mode, the original; left unchanged.
        localizations: name -> ``Circuit`` computed on this model (its parameters are trained),
            an iterable of ``Component``, ``"all"`` (every weight) or ``"all_mlps"`` (every MLP
            block).
        case: the forget or edit case (``fact_edit_suites(world, facts)``); its ``efficacy``
            prompts are trained on, every suite is measured.
        retain: the retained facts' case (``fact_edit_suites(world, kept, case="retain",
            neighbours_per_fact=0)``): its ``efficacy`` prompts are the fine-tunes' retain set
            and select the learning rate; every suite is measured. No forget fact may be in it.
        config: objectives, steps, learning-rate sweep and selection (``ComparisonConfig``).
        workspace: a second copy of the model (``mechedit.load`` of the same checkpoint), where
            each selected edit is applied while the robustness evaluation compares it with
            ``model``; reverted after, bit for bit.
        progress: a progress bar over the (localisation, rate) runs and the evaluations.

    Returns:
        ``LocalizationComparison`` (see the module notes).

    Raises:
        ValueError: no localisations, an empty circuit, cases that are not ``FactEditSuites``,
            a retain prompt that is also an edited prompt, a workspace that is the model itself
            or holds other weights.
        ModelMismatchError: a circuit computed on another model.
    """
    require_eval_mode(model, what="compare_localizations", needs_grad=True)
    require_eval_mode(workspace, what="compare_localizations (workspace)", needs_grad=True)
    for name, value in (("case", case), ("retain", retain)):
        if not isinstance(value, FactEditSuites):
            raise ValueError(
                f"{name} must be a FactEditSuites (mechedit.evaluate.fact_edit_suites(world, facts"
                f"{', case=' + repr('retain') if name == 'retain' else ''})), got {type(value).__name__}"
            )
    overlap = {p.prompt for p in retain.efficacy} & {p.prompt for p in case.efficacy}
    if overlap:
        raise ValueError(
            f"{len(overlap)} retain prompt(s) are also edited prompts (e.g. {sorted(overlap)[0]!r}); "
            "the retain case must hold other facts"
        )
    if workspace is model:
        raise ValueError(
            "workspace is the model itself; pass a second copy (mechedit.load of the same checkpoint) "
            "so the original and the edited model can run side by side"
        )
    base_hash = weights_hash(model)
    if weights_hash(workspace) != base_hash:
        raise ValueError(
            "workspace holds other weights than the model; load a fresh copy of the same checkpoint"
        )
    circuits = _checked_localizations(model, localizations)
    new = case.is_edit
    target_pairs = _pairs(case.efficacy, new=new)
    retain_pairs = _pairs(retain.efficacy, new=False)
    data = {"edit": list(case.efficacy)} if new else {"forget": list(case.efficacy)}

    # Two localisations may pick the same components (attribution patching often agrees with
    # fact lookup): training is deterministic, so the first one's runs stand for both.
    first_of: dict[str, str] = {}
    seen: dict[Any, str] = {}
    for name, circuit in circuits.items():
        key = circuit if isinstance(circuit, str) else frozenset(circuit)
        first_of[name] = seen.setdefault(key, name)
    distinct = [name for name in circuits if first_of[name] == name]
    runs = [(name, lr) for name in distinct for lr in config.lrs]
    tried: dict[str, list[dict[str, Any]]] = {name: [] for name in distinct}
    edits: dict[tuple[str, float], Any] = {}
    bar = tqdm(total=len(runs) + len(distinct), desc="compare_localizations", disable=not progress)
    for name, lr in runs:
        bar.set_postfix_str(f"{name}, lr {lr:g}")
        cfg = dataclasses.replace(config.finetune, lr=lr)
        edit = finetune(model, circuits[name], **data, retain=list(retain.efficacy), config=cfg, progress=False)
        with edit.applied(model):
            efficacy = exact_match(model, target_pairs)
            kept = exact_match(model, retain_pairs)
        tried[name].append(
            {
                "localization": name, "lr": lr, "steps": int(edit.params["run"]["steps"]),
                "efficacy_exact": efficacy, "retain_exact": kept,
                "efficacy_loss": (1.0 - efficacy) if new else efficacy,
            }
        )
        edits[(name, lr)] = edit
        bar.update()

    rows: list[dict[str, Any]] = []
    original: dict[str, float] = {}
    contexts: dict[str, Any] = {}
    measured_of: dict[str, dict[str, float]] = {}
    original_measures: dict[Any, Any] = {}  # the original's measures, the same for every localisation
    for name, circuit in circuits.items():
        source = first_of[name]
        chosen = _select(tried[source], config.min_retain)
        if source not in measured_of:
            bar.set_postfix_str(f"robustness: {name}")
            measured_of[source], before, contexts[name] = _robustness(
                model, workspace, edits[(source, chosen["lr"])], case=case, retain=retain,
                config=config.robustness, original_measures=original_measures,
            )
            original = original or before
            bar.update()
        else:
            contexts[name] = {"same_circuit_as": source}
        rows.append(
            {
                "localization": name, "n_params": _n_params(model, circuit), "lr": chosen["lr"],
                "steps": chosen["steps"], "retain_exact": chosen["retain_exact"], **measured_of[source],
            }
        )
    bar.close()
    for copy_, what in ((model, "model"), (workspace, "workspace")):
        if weights_hash(copy_) != base_hash:  # every edit is reverted; a change here is a bug
            raise RuntimeError(f"compare_localizations changed the {what}'s weights; please report this")
    sweep = tuple(
        {**{k: v for k, v in t.items() if k != "efficacy_loss"}, "localization": name}
        for name in circuits for t in tried[first_of[name]]
    )
    return LocalizationComparison(
        rows=tuple(rows), sweep=sweep, original=original, case="edit" if new else "forget",
        config={**config.to_dict(), "robustness_context": contexts},
        model={"name": str(getattr(model.cfg, "model_name", "")), "weights_hash": base_hash},
    )


def _robustness(
    original: Any, workspace: Any, edit: Any, *, case: FactEditSuites, retain: FactEditSuites, config: Any,
    original_measures: dict[Any, Any],
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """The edited model's robustness measures as flat columns, the original's, and the context."""
    with edit.applied(workspace):
        report = robustness_report(original, workspace, case, retain, config=config, progress=False,
                                   _original_measures=original_measures)
    edited: dict[str, float] = {}
    before: dict[str, float] = {}
    for row in report.rows:
        if row.attack == "none":
            key = f"{row.case}/{row.suite}/{row.measure}"
            edited[key], before[key] = row.edited, row.original
        else:
            key = f"{row.attack}/{row.suite}/{row.measure}"
            edited[key], edited[f"{key}/recovery"] = row.attacked, row.recovery
            before.setdefault(f"{row.case}/{row.suite}/{row.measure}", row.original)
            edited.setdefault(f"{row.case}/{row.suite}/{row.measure}", row.edited)
    context = {k: v for k, v in report.context.items() if k in ("split", "timings")}
    return edited, before, context
