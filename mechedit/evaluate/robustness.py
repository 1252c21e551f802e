"""Is an unlearning (or edit) deep or shallow? Attacks that try to bring the old answer back.

``robustness_report(original, edited, forget, retain)`` compares two models of one architecture
- the ``original`` and the ``edited`` one (the same checkpoint after, e.g., a
``WeightEdit.apply``) - on a forget (or edit) case and on retained facts, then attacks the
edited model and measures how much of the forgotten (old, true) answer each attack restores.
Following Mechanistic Unlearning (Guo et al. 2024), "An adversarial perspective on machine
unlearning" (Łucki et al. 2024) and latent adversarial unlearning (LAU/LAT, Yuan et al. 2024).

Measures, before (``original``) and after (``edited``)
-----------------------------------------------------
Every suite of the forget case and of the retain case as ``mechedit.evaluate.facts`` measures
it (one code path: ``evaluate_fact_edit``'s): ``choice_accuracy_true`` (accuracy renormalised over
the relation's candidate values, in the training templates ``efficacy``, the held-out templates
``paraphrase``, and over the letters in ``multiple_choice``), ``p_true``, ``exact_true`` (greedy),
the neighbourhood's and the same-subject facts', and held-out perplexity (``fluency``). The
shipped fact world answers multiple choice from its stored facts (75 % on people whose MC it never
trained, model card), so ``multiple_choice`` tells whether an edit removed the fact or one format of it.

The split, and what an attack may see
-------------------------------------
The forget facts' subjects are split in two, seeded (``split_by_subject``,
``config.attack_fraction`` held out for measurement): the attacks fit on the **attack half**
(its ``efficacy`` prompts, with their true answers) and are measured on the **held-out half**
only (case ``"forget_heldout"``: its efficacy, paraphrase and multiple-choice prompts, which no
attack ever trained on). Recovery on the held-out half is therefore generalisation of the attack,
not memorisation of its training rows. The forget case needs at least two subjects.

Recovery
--------
For each held-out suite and measure, ``recovery = (attacked - edited) / (original - edited)``:
0 = the attack restores nothing, 1 = it restores the original score, > 1 or < 0 possible. When
``|original - edited| < 1e-9`` (the edit did not change that score) recovery is undefined and reported as NaN.

The attacks (``ATTACKS``)
-------------------------
* ``relearn_full`` - fine-tune the edited model, all parameters, on the attack half's true
  answers (``mechedit.edit.finetune(edited, "all", retain=..., objectives
  {"retain_ce": 1})``; AdamW, ``relearn_steps`` steps, default 20 as in Guo et al.), measured
  with that weight edit applied, then reverted bit-exactly. Adam moves every parameter by about
  ``lr`` per step whatever its gradient, so on a small model a large ``relearn_lr`` damages
  every fact (the held-out half included: negative recovery); match it to the edit's scale.
* ``relearn_lora`` - the same data and loss through rank-``lora_rank`` adapters: every targeted
  weight ``W`` (``lora_targets``: the MLP linears, attention's or both, every layer) becomes
  ``W0 + B A`` (``B`` ``[rows, r]`` zeros, ``A`` ``[r, cols]`` seeded normal / sqrt(cols); the
  low-rank set is the same in either weight layout), trained by Adam on ``A`` and ``B`` only
  (their gradients by the chain rule from ``d loss / d W``, ``mechedit.gradients``). ``W0 + B A``
  is written into the weights for the measurement and ``W0`` copied back after, bit for bit.
* ``probe_retrained`` - a linear probe per depth (``mechedit.probes.fit_probes``) on the
  residual stream at ``probe_position`` (default ``"last"``: in the fact world the attribute is
  readable at the final token, not at the subject) predicting the old value, fitted on the
  edited model's residuals of the retained facts of the forget relations, the forget case's
  neighbourhood and the attack half, tested on the held-out half. Row: ``original`` = the same
  probe fitted on the original model, ``edited`` = the edited model's output (choice accuracy
  over the relation's values on the same prompts; greedy exact match where they list none),
  ``attacked`` = the probe on the edited model; at the original probe's best depth (depths
  before an edited layer see identical residuals, so there a re-fitted probe trivially matches). Recovery 1 = the old value is as readable inside as before
  although the output no longer says it. The per-depth curves go to ``context["probes"]``.
* ``probe_frozen`` - the original model's probes, unchanged (``ProbeResult.accuracy``), applied
  to the edited model's residuals of the held-out half (same columns otherwise).
* ``latent_universal`` (the headline latent attack) - one vector ``delta`` of ``d_model`` added
  to the residual stream at ``blocks.{latent_layer}.hook_resid_pre``, at each row's final token
  (``latent_positions="last"``: the position that predicts, during teacher forcing and
  generation alike) or at every token (``"all"``), with ``||delta||_2 <= latent_epsilon * r``,
  ``r`` the mean L2 norm of the edited model's residual there on the attack half (so epsilon is
  relative to the stream's own scale). Found by ``latent_steps`` steps of L2 projected gradient
  descent from zero (step ``2.5 * epsilon * r / steps`` along the normalised gradient) on the
  attack half's mean answer NLL, and measured on the held-out half: a shared perturbation that
  must generalise.
* ``latent_per_example`` - the same bound and steps, one ``delta``
  per held-out prompt (shared by its answer's steps), optimised on that prompt's own true answer
  and measured on it (one prompt per measurement, so slower): an upper
  bound (it sees the answers it is scored on) of how close the answer lies under the edit.
* ``direction_ablation`` - at each depth of ``ablation_depths`` (``None``: every depth of
  ``probes.depth_labels``), the top ``ablation_rank`` directions of the difference
  ``original - edited`` of the residual at the final token over the attack half's prompts
  (``ablation_direction="mean"``: the mean difference, rank 1; ``"svd"``: the top right singular
  vectors of the uncentred difference matrix), projected out of the edited model's residual
  stream at that depth at every position (``x - U U^T x``; hooks, removed after). Depths where the
  mean difference is below ``1e-6`` of the mean residual norm carry no direction and are skipped
  (an edit of the last MLP leaves every earlier depth identical). All depths are ablated at once,
  as in Łucki et al.

Every attack leaves both models exactly as given (weights bit-identical, no hooks). Deterministic
for ``config.seed`` on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from mechedit.artifacts import (
    ArtifactError,
    check_json_able,
    check_keys,
    check_type,
    read_json,
    write_json_atomic,
)
from mechedit.checks import require_eval_mode
from mechedit.edit.finetune import FinetuneConfig, finetune
from mechedit.edit.objectives.base import mean_token_nll
from mechedit.evaluate.facts import (  # the fact-edit report's own measurement
    FactEditSuites,
    measure_cases,
)
from mechedit.gradients import parameter_gradients
from mechedit.hf import architecture, hf_parameters, layout
from mechedit.interventions import Intervention, patch
from mechedit.metrics import continuation_logprobs
from mechedit.models import model_device
from mechedit.probes import (
    depth_hook,
    depth_labels,
    fit_probes,
    split_by_subject,
    subject_residuals,
)
from mechedit.prompts import FactPrompt
from mechedit.tokens import tokenize_continuations

__all__ = [
    "ATTACKS",
    "ATTACK_MEASURES",
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "RobustnessConfig",
    "RobustnessFormatError",
    "RobustnessReport",
    "RobustnessRow",
    "robustness_report",
]

REPORT_FORMAT = "mechedit.robustness_report"
REPORT_VERSION = 1
ATTACKS = (
    "relearn_full",
    "relearn_lora",
    "probe_retrained",
    "probe_frozen",
    "latent_universal",
    "latent_per_example",
    "direction_ablation",
)
#: The held-out suites every attack is measured on, and the measures reported for them.
ATTACK_SUITES = ("efficacy", "paraphrase", "multiple_choice")
HELDOUT = "forget_heldout"
#: The held-out measures an attack can report (``evaluate.facts``' per-suite metric names; a
#: suite without candidates has no ``choice_accuracy_*``, a forget case no ``*_new``).
ATTACK_MEASURES = (
    *(f"{k}_{a}" for a in ("true", "new") for k in ("choice_accuracy", "p", "logprob", "token_accuracy", "mrr", "rank", "exact")),
    "new_beats_true",
)
_UNDEFINED = 1e-9


class RobustnessFormatError(ArtifactError):
    """A saved robustness report that is missing, malformed, or of another format or version."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _check_number(value: Any, name: str, *, low: float, high: float = math.inf, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value) and low <= value <= high
    if not ok:
        what = "an int" if integer else "a finite number"
        raise ValueError(f"{name} must be {what} in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class RobustnessConfig:
    """Settings of ``robustness_report`` (see the module notes for each attack).

    Attributes:
        seed: the subject split, LoRA's initialisation, fine-tuning's row order.
        attack_fraction: fraction of the forget subjects *held out* for measurement (the rest
            is the attack half), in (0, 1).
        attacks: which of ``ATTACKS`` to run (in that order).
        measures: the held-out measures each attack reports (names of ``evaluate_fact_edit``'s
            metrics; ``choice_accuracy_true`` is the paper's accuracy over candidates).
        relearn_steps, relearn_lr, relearn_batch_size: the relearning fine-tune (AdamW, cosine
            schedule, ``finetune``'s defaults otherwise); ``None`` batch = the whole attack half.
        lora_rank, lora_lr, lora_targets: the low-rank variant (Adam on the adapters, same
            steps); targets ``"mlp"``, ``"attn"`` or ``"all"`` (MLP and attention linears).
        probe_position: the token the probes read (``mechedit.probes.Position``).
        probe_l2: the probes' L2 penalty.
        latent_layer: block whose ``hook_resid_pre`` is perturbed (``None``: ``n_layers // 2``;
            negative counts from the end).
        latent_epsilon: L2 bound relative to the mean residual norm there (> 0).
        latent_steps: PGD steps.
        latent_positions: ``"last"`` (each row's final token) or ``"all"`` (every token).
        ablation_depths: depths (indices into ``probes.depth_labels``) for direction ablation;
            ``None`` = all.
        ablation_direction: ``"mean"`` (mean difference) or ``"svd"`` (top singular vectors).
        ablation_rank: directions per depth (``"svd"`` only; ``"mean"`` is rank 1).
        batch_size: prompts per forward pass in the measurements.
    """

    seed: int = 0
    attack_fraction: float = 0.5
    attacks: tuple[str, ...] = ATTACKS
    measures: tuple[str, ...] = ("choice_accuracy_true", "p_true", "exact_true")
    relearn_steps: int = 20
    relearn_lr: float = 1e-4
    relearn_batch_size: int | None = None
    lora_rank: int = 4
    lora_lr: float = 1e-3
    lora_targets: Literal["mlp", "attn", "all"] = "mlp"
    probe_position: Literal["subject_last", "subject_first", "last"] = "last"
    probe_l2: float = 1e-2
    latent_layer: int | None = None
    latent_epsilon: float = 0.5
    latent_steps: int = 20
    latent_positions: Literal["last", "all"] = "last"
    ablation_depths: tuple[int, ...] | None = None
    ablation_direction: Literal["mean", "svd"] = "mean"
    ablation_rank: int = 1
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check_number(self.seed, "seed", low=0, integer=True)
        if not 0.0 < float(self.attack_fraction) < 1.0:
            raise ValueError(f"attack_fraction must be in (0, 1), got {self.attack_fraction!r}")
        if isinstance(self.attacks, str):
            raise ValueError(f"attacks must be a tuple of names, not one string: ({self.attacks!r},)")
        object.__setattr__(self, "attacks", tuple(self.attacks))
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"unknown attacks {unknown}; choose from {list(ATTACKS)}")
        if isinstance(self.measures, str) or not self.measures:
            raise ValueError("measures must be a non-empty tuple of metric names, e.g. ('choice_accuracy_true',)")
        object.__setattr__(self, "measures", tuple(self.measures))
        unknown = [m for m in self.measures if m not in ATTACK_MEASURES]
        if unknown:
            raise ValueError(f"unknown measures {unknown}; choose from evaluate_fact_edit's metrics {list(ATTACK_MEASURES)}")
        for name in ("relearn_steps", "lora_rank", "latent_steps", "ablation_rank", "batch_size"):
            _check_number(getattr(self, name), name, low=1, integer=True)
        if self.relearn_batch_size is not None:
            _check_number(self.relearn_batch_size, "relearn_batch_size", low=1, integer=True)
        for name in ("relearn_lr", "lora_lr", "latent_epsilon"):
            _check_number(getattr(self, name), name, low=1e-12)
        _check_number(self.probe_l2, "probe_l2", low=0.0)
        choices = {
            "lora_targets": ("mlp", "attn", "all"),
            "probe_position": ("subject_last", "subject_first", "last"),
            "latent_positions": ("last", "all"),
            "ablation_direction": ("mean", "svd"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.latent_layer is not None:
            _check_number(self.latent_layer, "latent_layer", low=-1e9, integer=True)
        if self.ablation_depths is not None:
            object.__setattr__(self, "ablation_depths", tuple(self.ablation_depths))
            for d in self.ablation_depths:
                _check_number(d, "ablation_depths[i]", low=0, integer=True)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RobustnessRow:
    """One measure of one suite, on the original, edited and (for an attack) attacked model.

    ``case`` is ``"forget"``, ``"retain"`` (before/after rows, ``attack == "none"``, ``attacked``
    NaN) or ``"forget_heldout"`` (the half no attack trained on; one row per attack). Scores are
    as ``evaluate_fact_edit`` defines them (higher = more of the true, old answer, except
    ``perplexity``). ``n`` counts the suite's items.
    """

    case: str
    suite: str
    measure: str
    attack: str
    original: float
    edited: float
    attacked: float
    n: int

    @property
    def recovery(self) -> float:
        """``(attacked - edited) / (original - edited)``; NaN when the edit left the score as it was
        (``|original - edited| < 1e-9``) or there is no attack."""
        gap = self.original - self.edited
        if abs(gap) < _UNDEFINED or math.isnan(self.attacked):
            return math.nan
        return (self.attacked - self.edited) / gap


_FRAME_COLUMNS = ["case", "suite", "measure", "attack", "original", "edited", "attacked", "recovery", "n"]


def _to_json(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _from_json(value: Any, where: str) -> float:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    check_type(value, (int, float), error=RobustnessFormatError, where=where)
    return float(value)


@dataclass(frozen=True)
class RobustnessReport:
    """Rows (``RobustnessRow``) and context: config, the split, probe curves, attack details, timings."""

    rows: tuple[RobustnessRow, ...]
    context: dict[str, Any] = field(default_factory=dict)

    def get(self, suite: str, measure: str, attack: str, *, case: str | None = None) -> RobustnessRow:
        """The one row for ``suite`` / ``measure`` / ``attack`` (``case`` narrows); ``KeyError`` otherwise."""
        found = [
            r for r in self.rows
            if (r.suite, r.measure, r.attack) == (suite, measure, attack) and (case is None or r.case == case)
        ]
        if len(found) != 1:
            have = sorted({(r.case, r.suite, r.measure, r.attack) for r in self.rows})
            raise KeyError(f"{len(found)} rows for {(case, suite, measure, attack)}; rows (case, suite, measure, attack): {have}")
        return found[0]

    def recovery(self, attack: str, *, suite: str = "efficacy", measure: str = "choice_accuracy_true") -> float:
        """The recovery of one attack on the held-out half (default: accuracy over candidates)."""
        return self.get(suite, measure, attack, case=HELDOUT).recovery

    def to_frame(self) -> pd.DataFrame:
        """Columns case, suite, measure, attack, original, edited, attacked, recovery, n."""
        return pd.DataFrame([{**asdict(r), "recovery": r.recovery} for r in self.rows], columns=_FRAME_COLUMNS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "rows": [
                {**asdict(r), **{k: _to_json(getattr(r, k)) for k in ("original", "edited", "attacked")}}
                for r in self.rows
            ],
            "context": self.context,
        }

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically); ``ValueError`` if ``context`` is not plain JSON."""
        check_json_able(self.context, "RobustnessReport.context")
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RobustnessReport:
        """Read a saved report; ``RobustnessFormatError`` for anything missing or malformed."""
        err = RobustnessFormatError
        data = read_json(path, fmt=REPORT_FORMAT, version=REPORT_VERSION, error=err,
                         expected="a report JSON written by RobustnessReport.save")
        check_keys(data, required=("format", "version", "rows", "context"), error=err, where=str(path))
        check_type(data["rows"], list, error=err, where=f"{path}: 'rows'")
        check_type(data["context"], dict, error=err, where=f"{path}: 'context'")
        rows = []
        for i, row in enumerate(data["rows"]):
            at = f"{path}: rows[{i}]"
            check_type(row, dict, error=err, where=at)
            check_keys(row, required=tuple(f.name for f in fields(RobustnessRow)), error=err, where=at)
            for key in ("case", "suite", "measure", "attack"):
                check_type(row[key], str, error=err, where=f"{at}[{key!r}]")
            check_type(row["n"], int, error=err, where=f"{at}['n']")
            scores = {k: _from_json(row[k], f"{at}[{k!r}]") for k in ("original", "edited", "attacked")}
            rows.append(RobustnessRow(row["case"], row["suite"], row["measure"], row["attack"], n=row["n"], **scores))
        return cls(tuple(rows), data["context"])


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _check_models(original: Any, edited: Any) -> None:
    if original is edited:
        raise ValueError(
            "original and edited are the same object; load the model twice and apply the edit to "
            "the second (edited = mechedit.load(...); edit.apply(edited))"
        )
    for model, name in ((original, "original"), (edited, "edited")):
        require_eval_mode(model, what=f"robustness_report ({name} model)", needs_grad=True)
    if architecture(original) != architecture(edited):
        raise ValueError(
            f"the models differ in architecture ({architecture(original)} vs {architecture(edited)}); "
            "edited must be the original checkpoint with edited weights"
        )
    shapes = [{n: tuple(p.shape) for n, p in hf_parameters(m).items()} for m in (original, edited)]
    if shapes[0] != shapes[1]:
        diff = sorted(set(shapes[0].items()) ^ set(shapes[1].items()))[:3]
        raise ValueError(
            f"the models' parameters differ in names or shapes (e.g. {diff}); edited must be the "
            "original checkpoint with edited weights"
        )


def _fact_key(p: FactPrompt) -> tuple[str | None, str | None]:
    return (p.subject, p.relation_id)


def _check_cases(forget: Any, retain: Any) -> None:
    for case, name in ((forget, "forget"), (retain, "retain")):
        if not isinstance(case, FactEditSuites):
            raise ValueError(
                f"{name} must be a FactEditSuites (mechedit.evaluate.fact_edit_suites(world, facts)), "
                f"got {type(case).__name__}"
            )
    if forget.case == retain.case:
        raise ValueError(f"forget and retain carry the same case label {forget.case!r}; pass case='retain' to fact_edit_suites")
    missing = [p.prompt for p in forget.efficacy if p.subject is None]
    if missing:
        raise ValueError(f"forget prompts need a subject (to split the facts by person), e.g. {missing[0]!r}")
    if len({p.subject for p in forget.efficacy}) < 2:
        raise ValueError("the forget case needs facts of at least 2 subjects: the attacks train on one part and are measured on the other")
    forgotten = {_fact_key(p) for p in forget.efficacy}
    kept = [p for p in retain.efficacy if _fact_key(p) in forgotten]
    prompts = {p.prompt.strip() for p in forget.efficacy}
    kept += [p for p in retain.efficacy if p.prompt.strip() in prompts]
    if kept:
        raise ValueError(
            f"{len(kept)} retain prompts are forget facts too (e.g. {kept[0].prompt!r} -> {kept[0].target!r}); "
            "a fact cannot be forgotten and retained: build retain from other facts"
        )


def _heldout_case(forget: FactEditSuites, held: set[str]) -> FactEditSuites:
    keep = {name: tuple(p for p in getattr(forget, name) if p.subject in held) for name in ATTACK_SUITES}
    return FactEditSuites(**keep, case=HELDOUT, facts=tuple(f for f in forget.facts if f.get("subject") in held))


def _split(forget: FactEditSuites, cfg: RobustnessConfig) -> tuple[list[FactPrompt], set[str]]:
    """The attack half's efficacy prompts and the held-out subjects."""
    test = split_by_subject(forget.efficacy, test_fraction=cfg.attack_fraction, seed=cfg.seed).tolist()
    attack = [p for p, t in zip(forget.efficacy, test, strict=True) if not t]
    held = {p.subject for p, t in zip(forget.efficacy, test, strict=True) if t}
    return attack, held


# --------------------------------------------------------------------------------------------
# Attacks that change weights: relearning, full and low-rank
# --------------------------------------------------------------------------------------------


def _relearn_full(edited: Any, attack: Sequence[FactPrompt], cfg: RobustnessConfig, info: dict, progress: bool):
    config = FinetuneConfig(
        objectives={"retain_ce": 1.0}, lr=cfg.relearn_lr, steps=cfg.relearn_steps,
        batch_size=cfg.relearn_batch_size, seed=cfg.seed,
    )
    edit = finetune(edited, "all", retain=list(attack), config=config, progress=progress)
    curve = edit.params["run"]["curve"]
    info["relearn_full"] = {"loss_first": curve[0]["loss"], "loss_last": curve[-1]["loss"], "steps": len(curve)}
    return edit.applied(edited)


def _lora_names(model: Any, targets: str) -> list[str]:
    lay = layout(model)
    linears = {"mlp": (*lay.mlp_in, lay.mlp_out), "attn": (*lay.attn.qkv, lay.attn.o)}
    chosen = linears["mlp"] + linears["attn"] if targets == "all" else linears[targets]
    return [lin.weight.format(layer=layer) for layer in range(model.cfg.n_layers) for lin in chosen]


def _answer_rows(model: Any, prompts: Sequence[FactPrompt]):
    batch = tokenize_continuations(model, [p.prompt for p in prompts], [p.target for p in prompts],
                                   device=model_device(model))
    return batch.tokens, batch.continuation_starts, batch.continuation_lengths


@contextlib.contextmanager
def _relearn_lora(edited: Any, attack: Sequence[FactPrompt], cfg: RobustnessConfig, info: dict,
                  progress: bool) -> Iterator[None]:
    """Train ``W0 + B A`` adapters, keep them written in the weights for the block, restore ``W0``."""
    from mechedit.progress import tqdm

    names = _lora_names(edited, cfg.lora_targets)
    live = hf_parameters(edited)
    base = {n: live[n].detach().clone() for n in names}
    generator = torch.Generator().manual_seed(cfg.seed)
    r = cfg.lora_rank
    a = {n: (torch.randn(r, w.shape[1], generator=generator) / math.sqrt(w.shape[1])).to(w) for n, w in base.items()}
    b = {n: torch.zeros(w.shape[0], r, dtype=w.dtype, device=w.device) for n, w in base.items()}
    leaves = [t.requires_grad_() for n in names for t in (a[n], b[n])]
    optimiser = torch.optim.Adam(leaves, lr=cfg.lora_lr)
    tokens, starts, lengths = _answer_rows(edited, attack)

    def loss(logits: Tensor) -> Tensor:
        return mean_token_nll(continuation_logprobs(logits, tokens, starts, lengths))

    def write() -> None:
        with torch.no_grad():
            for n in names:
                live[n].copy_(base[n] + b[n] @ a[n])

    curve = []
    try:
        for _ in tqdm(range(cfg.relearn_steps), desc="relearn (LoRA)", disable=not progress, leave=False):
            write()
            grads = parameter_gradients(edited, tokens, names, loss)
            curve.append(grads.value)
            for n in names:
                g = grads.gradients[n]
                # W = W0 + B A: dL/dA = B^T dL/dW, dL/dB = dL/dW A^T
                a[n].grad = b[n].detach().T @ g
                b[n].grad = g @ a[n].detach().T
            optimiser.step()
        write()
        info["relearn_lora"] = {"loss_first": curve[0], "loss_last": curve[-1], "steps": len(curve),
                                "targets": len(names), "rank": r}
        yield
    finally:
        with torch.no_grad():
            for n in names:
                live[n].copy_(base[n])


# --------------------------------------------------------------------------------------------
# Latent attacks: a bounded residual perturbation (PGD), and direction ablation
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """No parameter requires grad in the block (only the perturbation is differentiated)."""
    params = {id(p): p for root in (model, getattr(model, "original_model", None))
              if isinstance(root, torch.nn.Module) for p in root.parameters()}
    flags = {k: p.requires_grad for k, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield
    finally:
        for k, p in params.items():
            p.requires_grad_(flags[k])


def _step_rows(model: Any, prompts: Sequence[FactPrompt]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One right-padded row per (prompt, answer step): ``(tokens, mask, targets, owner)``.

    Row ``x a_<j`` predicts ``a_j`` at its last real token, as in teacher-forced scoring; ``owner``
    is each row's prompt index.
    """
    tokens, starts, lengths = (t.cpu() for t in _answer_rows(model, prompts))
    rows, targets, owner = [], [], []
    for i, (s, m) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        for j in range(m):
            rows.append(tokens[i, : s + j])
            targets.append(int(tokens[i, s + j]))
            owner.append(i)
    width = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for k, row in enumerate(rows):
        padded[k, : len(row)] = row
        mask[k, : len(row)] = True
    return padded, mask, torch.tensor(targets), torch.tensor(owner)


def _latent_intervention(hook: str, delta: Tensor, positions: str, per_row: bool) -> Intervention:
    return Intervention(hook, "add", source=delta, source_shape="row" if per_row else "token",
                        positions=-1 if positions == "last" else None)


def _pgd(model: Any, hook: str, prompts: Sequence[FactPrompt], radius: float, cfg: RobustnessConfig,
         *, per_prompt: bool) -> Tensor:
    """L2 PGD from zero on the prompts' answer NLL: ``[d_model]`` (shared) or ``[n_prompts, d_model]``
    (one per prompt, shared by its answer steps)."""
    device = model_device(model)
    tokens, mask, targets, owner = (t.to(device) for t in _step_rows(model, prompts))
    n_rows = tokens.shape[0]
    shape = (len(prompts), model.cfg.d_model) if per_prompt else (model.cfg.d_model,)
    delta = torch.zeros(shape, device=device, requires_grad=True)
    step = 2.5 * radius / cfg.latent_steps
    last = mask.sum(1) - 1
    with _frozen(model), torch.enable_grad():
        for _ in range(cfg.latent_steps):
            source = delta[owner] if per_prompt else delta
            with patch(model, [_latent_intervention(hook, source, cfg.latent_positions, per_prompt)], attention_mask=mask):
                logits = model(tokens)
            logprobs = logits[torch.arange(n_rows, device=device), last].float().log_softmax(-1)
            nll = -logprobs.gather(1, targets[:, None])[:, 0]
            # per prompt the mean over its answer steps, then the mean over prompts; with one
            # delta per prompt the prompts' problems are independent, so the sum gives each its
            # own gradient
            by_prompt = torch.zeros(len(prompts), device=device).index_add(0, owner, nll)
            by_prompt = by_prompt / torch.bincount(owner, minlength=len(prompts)).to(by_prompt)
            objective = by_prompt.sum() if per_prompt else by_prompt.mean()
            (grad,) = torch.autograd.grad(objective, [delta])
            with torch.no_grad():
                norm = grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                delta -= step * grad / norm
                scale = (radius / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
                delta *= scale
    return delta.detach()


@torch.no_grad()
def _residual_radius(model: Any, hook: str, prompts: Sequence[FactPrompt], positions: str) -> float:
    """Mean L2 norm of the residual at ``hook`` over the prompts' final (or all real) tokens."""
    device = model_device(model)
    tokens, mask, _, _ = (t.to(device) for t in _step_rows(model, prompts))
    store: dict[str, Tensor] = {}

    def grab(act: Tensor, hook: Any = None) -> None:  # noqa: ARG001
        store["act"] = act.detach().float()

    with model.hooks(fwd_hooks=[(hook, grab)]):
        model(tokens)
    norms = store["act"].norm(dim=-1)
    if positions == "last":
        return norms[torch.arange(len(tokens), device=device), mask.sum(1) - 1].mean().item()
    return norms[mask].mean().item()


def _per_example_scores(model: Any, hook: str, heldout: FactEditSuites, radius: float, cfg: RobustnessConfig,
                        batch_size: int) -> dict[tuple[str, str, str, str], tuple[float, int]]:
    """Each held-out prompt measured with its own perturbation (one prompt per measurement)."""
    out: dict[tuple[str, str, str, str], tuple[float, int]] = {}
    for name in ATTACK_SUITES:
        prompts = getattr(heldout, name)
        if not prompts:
            continue
        deltas = _pgd(model, hook, prompts, radius, cfg, per_prompt=True)
        sums: dict[tuple[str, str, str, str], float] = {}
        for prompt, delta in zip(prompts, deltas, strict=True):
            one = FactEditSuites(efficacy=(prompt,), case=HELDOUT)
            with patch(model, [_latent_intervention(hook, delta, cfg.latent_positions, per_row=False)]):
                scores = measure_cases(model, [one], batch_size)
            for (case, _, measure, metric), (value, _) in scores.items():
                key = (case, name, measure, metric)
                sums[key] = sums.get(key, 0.0) + value
        out.update({key: (total / len(prompts), len(prompts)) for key, total in sums.items() if not key[3].startswith("rank_")})
    return out


@torch.no_grad()
def _difference_directions(original: Any, edited: Any, attack: Sequence[FactPrompt], cfg: RobustnessConfig,
                           info: dict) -> dict[int, Tensor]:
    """Depth -> ``[k, d_model]`` orthonormal directions of ``original - edited`` at the final token."""
    a = subject_residuals(original, attack, position="last")
    b = subject_residuals(edited, attack, position="last")
    diff = a - b  # [depth, n, d_model]
    scale = a.norm(dim=-1).mean(-1)  # [depth]
    mean = diff.mean(1)
    depths = range(diff.shape[0]) if cfg.ablation_depths is None else cfg.ablation_depths
    out, record = {}, {}
    labels = depth_labels(edited.cfg.n_layers)
    for d in depths:
        if d >= diff.shape[0]:
            raise ValueError(f"ablation depth {d} is out of range: the model has depths 0..{diff.shape[0] - 1} ({labels})")
        size = mean[d].norm().item()
        record[labels[d]] = round(size / scale[d].item(), 6)
        if size <= 1e-6 * scale[d].item():
            continue
        if cfg.ablation_direction == "mean":
            out[d] = (mean[d] / mean[d].norm())[None]
        else:
            _, _, vh = torch.linalg.svd(diff[d], full_matrices=False)
            out[d] = vh[: cfg.ablation_rank]
    info["direction_ablation"] = {"relative_mean_difference": record, "ablated": [labels[d] for d in sorted(out)]}
    return out


def _ablate_directions(model: Any, directions: dict[int, Tensor]):
    def projector(u: Tensor) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
            basis = u.to(act)
            return act - (act @ basis.T) @ basis

        return hook

    hooks = [(depth_hook(model.cfg.n_layers, d), projector(u)) for d, u in directions.items()]
    return model.hooks(fwd_hooks=hooks)


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


def _probe_rows(forget: FactEditSuites, retain: FactEditSuites, attack: Sequence[FactPrompt],
                heldout: FactEditSuites) -> tuple[list[FactPrompt], Tensor]:
    """Training rows (retained facts of the forget relations, neighbours, the attack half) and
    the held-out half as test rows (mask)."""
    relations = {p.relation_id for p in forget.efficacy}
    held = {p.prompt for p in heldout.efficacy}
    train = [p for p in (*retain.efficacy, *forget.neighbourhood, *attack) if p.relation_id in relations]
    train = list({p.prompt: p for p in train if p.prompt not in held}.values())
    rows = train + list(heldout.efficacy)
    return rows, torch.tensor([False] * len(train) + [True] * len(heldout.efficacy))


def _probe_summary(original: Any, edited: Any, forget: FactEditSuites, retain: FactEditSuites,
                   attack: Sequence[FactPrompt], heldout: FactEditSuites, cfg: RobustnessConfig) -> dict[str, Any]:
    """Probes re-fitted on each model, and the original's frozen probes on the edited model.

    Returns the JSON-able record: ``depths``, ``best_depth`` (the original probe's), each fit's
    ``ProbeResult.summary()`` and ``frozen_on_edited`` (per-depth accuracy on the held-out rows).
    """
    rows, test = _probe_rows(forget, retain, attack, heldout)
    labels = [p.target for p in rows]
    depths = depth_labels(edited.cfg.n_layers)
    feats = {k: subject_residuals(m, rows, position=cfg.probe_position) for k, m in (("original", original), ("edited", edited))}
    fitted = {k: fit_probes(f, labels, test, l2=cfg.probe_l2, depths=depths) for k, f in feats.items()}
    held_labels = [lab for lab, t in zip(labels, test.tolist(), strict=True) if t]
    frozen = fitted["original"].accuracy(feats["edited"][:, test], held_labels)
    return {
        "position": cfg.probe_position,
        "depths": list(depths),
        "best_depth": fitted["original"].best_depth,
        "original": fitted["original"].summary(),
        "edited": fitted["edited"].summary(),
        "frozen_on_edited": [round(x, 4) for x in frozen.tolist()],
    }


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

Scores = dict[tuple[str, str, str, str], tuple[float, int]]  # (case, suite, measure, metric) -> (value, n)


def _by_metric(scores: Scores) -> dict[tuple[str, str, str], tuple[float, int]]:
    # The report keys rows by metric name alone: facts' metric names are unique across measures.
    return {(case, suite, metric): v for (case, suite, _, metric), v in scores.items()}


def robustness_report(
    original: Any,
    edited: Any,
    forget: FactEditSuites,
    retain: FactEditSuites,
    *,
    config: RobustnessConfig | None = None,
    progress: bool = True,
    _original_measures: dict[Any, Any] | None = None,
) -> RobustnessReport:
    """Measure ``original`` vs ``edited`` on the forget and retain cases, then attack ``edited``.

    Args:
        original: the model before the edit (a causal-LM ``TransformerBridge`` in eval mode).
        edited: the same checkpoint with edited weights, a second bridge (e.g.
            ``edit.apply(mechedit.load(name))``); an activation edit must be applied to it too.
        forget: the forget (or edit) case, ``fact_edit_suites(world, facts[, new_values])``;
            facts of at least two subjects. Attacks restore its true (old) answers.
        retain: the retained facts' case, ``fact_edit_suites(world, kept, case="retain")``
            (``neighbours_per_fact=0`` keeps it small); none of its facts may be a forget fact.
        config: ``RobustnessConfig`` (default settings when ``None``).
        progress: tqdm bars (the attacks, and each training run).

    Returns:
        ``RobustnessReport``: before/after rows of every suite of both cases (``attack="none"``),
        one row per (held-out suite, measure, attack), and the probes' rows; ``context`` holds the
        config, the split, per-depth probe accuracies, each attack's details and timings (s).

    Raises:
        ValueError: the same object passed twice, models of different architecture or shapes,
            a case that is not a ``FactEditSuites``, a forget case with fewer than two subjects,
            a retain case holding forget facts, bad config values.
        RuntimeError: a model in training mode.
    """
    from mechedit.progress import tqdm

    cfg = RobustnessConfig() if config is None else config
    if not isinstance(cfg, RobustnessConfig):
        raise ValueError(f"config must be a RobustnessConfig, got {type(cfg).__name__}")
    _check_models(original, edited)
    _check_cases(forget, retain)
    n_layers = edited.cfg.n_layers
    layer = n_layers // 2 if cfg.latent_layer is None else cfg.latent_layer
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"latent_layer {cfg.latent_layer} is out of range for {n_layers} layers")
    layer %= n_layers
    hook = f"blocks.{layer}.hook_resid_pre"

    attack, held = _split(forget, cfg)
    heldout = _heldout_case(forget, held)
    info: dict[str, Any] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    cases = [forget, retain, heldout]
    # compare_localizations measures one original against several edits: the original's numbers on
    # the same case objects (held-out split included) are the same each time, so they are kept
    cache_key = (id(original), id(forget), id(retain), cfg.batch_size, tuple(sorted(held)))
    if _original_measures is not None and cache_key in _original_measures:
        before = _original_measures[cache_key]
    else:
        before = _by_metric(measure_cases(original, cases, cfg.batch_size))
        if _original_measures is not None:
            _original_measures[cache_key] = before
    after = _by_metric(measure_cases(edited, cases, cfg.batch_size))
    timings["measure"] = time.perf_counter() - start
    rows = [
        RobustnessRow(case, suite, metric, "none", value, after[key][0], math.nan, n)
        for key, (value, n) in before.items()
        for case, suite, metric in [key]
        if case != HELDOUT
    ]

    def attack_rows(name: str, attacked: dict[tuple[str, str, str], tuple[float, int]]) -> None:
        for suite in ATTACK_SUITES:
            for measure in cfg.measures:
                key = (HELDOUT, suite, measure)
                if key in before and key in attacked:
                    rows.append(RobustnessRow(HELDOUT, suite, measure, name, before[key][0], after[key][0],
                                              attacked[key][0], before[key][1]))

    def measure_within(context: contextlib.AbstractContextManager[Any]) -> dict[tuple[str, str, str], tuple[float, int]]:
        with context:
            return _by_metric(measure_cases(edited, [heldout], cfg.batch_size))

    bar = tqdm(cfg.attacks, desc="robustness attacks", disable=not progress, leave=False)
    for name in bar:
        bar.set_postfix_str(name, refresh=False)
        t0 = time.perf_counter()
        if name == "relearn_full":
            attack_rows(name, measure_within(_relearn_full(edited, attack, cfg, info, progress)))
        elif name == "relearn_lora":
            attack_rows(name, measure_within(_relearn_lora(edited, attack, cfg, info, progress)))
        elif name in ("probe_retrained", "probe_frozen"):
            if "probes" not in info:
                info["probes"] = _probe_summary(original, edited, forget, retain, attack, heldout, cfg)
            probes = info["probes"]
            best = probes["best_depth"]
            attacked = probes["edited"]["test_accuracy"][best] if name == "probe_retrained" else probes["frozen_on_edited"][best]
            # what the edited model's output says on the same prompts: accuracy over the
            # relation's values where the prompts list them, else greedy exact match
            output = (HELDOUT, "efficacy", "choice_accuracy_true")
            if output not in after:
                output = (HELDOUT, "efficacy", "exact_true")
            probes["edited_output_measure"] = output[2]
            rows.append(RobustnessRow(HELDOUT, "probe", f"probe_accuracy@{probes['depths'][best]}", name,
                                      probes["original"]["test_accuracy"][best], after[output][0], attacked,
                                      probes["original"]["n_test"]))
        elif name == "latent_universal":
            radius = cfg.latent_epsilon * _residual_radius(edited, hook, attack, cfg.latent_positions)
            delta = _pgd(edited, hook, attack, radius, cfg, per_prompt=False)
            info["latent"] = {"hook": hook, "positions": cfg.latent_positions, "epsilon": cfg.latent_epsilon,
                              "radius": radius, "universal_norm": delta.norm().item()}
            attack_rows(name, measure_within(patch(edited, [_latent_intervention(hook, delta, cfg.latent_positions, False)])))
        elif name == "latent_per_example":
            radius = cfg.latent_epsilon * _residual_radius(edited, hook, attack, cfg.latent_positions)
            attack_rows(name, _by_metric(_per_example_scores(edited, hook, heldout, radius, cfg, cfg.batch_size)))
        elif name == "direction_ablation":
            directions = _difference_directions(original, edited, attack, cfg, info)
            if directions:
                attack_rows(name, measure_within(_ablate_directions(edited, directions)))
            else:
                attack_rows(name, {k: after[k] for k in after if k[0] == HELDOUT})  # nothing differs: nothing to ablate
        timings[name] = time.perf_counter() - t0
    bar.close()
    context = {
        "config": cfg.to_dict(),
        "split": {"attack_subjects": sorted({p.subject for p in attack}), "heldout_subjects": sorted(held),
                  "attack_prompts": len(attack)},
        "cases": {c.case: {"facts": [dict(f) for f in c.facts], "sizes": c.sizes()} for c in cases},
        "attacks": info,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    return RobustnessReport(tuple(rows), context)
