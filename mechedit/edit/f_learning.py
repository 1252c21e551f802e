"""F-Learning (Ni et al., 2024, "Forgetting before Learning: Utilizing Parametric Arithmetic for
Knowledge Updating in Large Language Models"), restricted to a circuit, as one weight edit.

Three stages, in one call:

1. **Learn the old facts harder**: fine-tune the circuit's parameters (``mechedit.edit.finetune``'s
   loop, so only covered entries move) with cross-entropy toward the **old** answers, from
   ``theta_0`` to ``theta_old``. The difference ``delta = theta_old - theta_0`` is a direction
   that encodes the old knowledge.
2. **Forget by subtraction**: ``theta' = theta_0 - lambda * delta`` (only covered entries; every
   other entry keeps its exact bits).
3. **Learn the new facts** from ``theta'`` with cross-entropy toward the new answers (plus any
   retain objectives in ``learn``), on the circuit's parameters (``learn_scope="circuit"``) or on
   every parameter (``"full"``, the paper's setting).

The result is one ``WeightEdit`` (kind ``"f_learning"``) from ``theta_0`` to the final weights,
recorded with ``WeightEdit.recording``; its ``params`` hold both stages' configs and runs (loss
curves), ``lam``, the scope and ``delta``'s L2 norm. The model is left as it was given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.edit.finetune import (
    ALL,
    FinetuneConfig,
    Pair,
    _check_inputs,
    _circuit_json,
    _data_json,
    _pairs,
    _train,
    covered_masks,
)
from mechedit.edit.objectives import EditCE
from mechedit.edit.weights import WeightEdit
from mechedit.hf import hf_parameters
from mechedit.prompts import FactPrompt


def _default_old() -> FinetuneConfig:
    return FinetuneConfig(objectives=(EditCE(),), lr=1e-3, steps=20)


def _default_new() -> FinetuneConfig:
    return FinetuneConfig(objectives=(EditCE(),), lr=1e-3, steps=100, edit_target=1.0)


@dataclass(frozen=True)
class FLearningConfig:
    """Settings of ``f_learning``.

    Attributes:
        old: stage 1, fine-tuning toward the old answers. Its objectives must be ``edit_ce``
            only (the old answers play the role of the edit set); targets are ignored.
        lam: lambda, how much of the old-fact delta is subtracted (> 0; the paper uses 1-ish).
        learn: stage 3, learning the new answers; objectives must include ``edit_ce`` and may add
            ``retain_ce`` / ``retain_kl`` (then pass ``retain`` / ``general_text``); its
            ``edit_target`` stops it early.
        learn_scope: ``"circuit"`` (stage 3 trains the same covered entries) or ``"full"``
            (every parameter).
    """

    old: FinetuneConfig = field(default_factory=_default_old)
    lam: float = 1.0
    learn: FinetuneConfig = field(default_factory=_default_new)
    learn_scope: Literal["circuit", "full"] = "circuit"

    def __post_init__(self) -> None:
        for name in ("old", "learn"):
            if not isinstance(getattr(self, name), FinetuneConfig):
                raise ValueError(f"{name} must be a FinetuneConfig, got {type(getattr(self, name)).__name__}")
        if [o.name for o in self.old.objectives] != ["edit_ce"]:
            raise ValueError(
                "stage 1 of F-Learning fine-tunes toward the old answers: old.objectives must be "
                f"(EditCE(),), got {[o.name for o in self.old.objectives]}"
            )
        learn = {o.name for o in self.learn.objectives}
        if "edit_ce" not in learn or not learn <= {"edit_ce", "retain_ce", "retain_kl"}:
            raise ValueError(
                "learn.objectives must include edit_ce and may add retain_ce / retain_kl, got "
                f"{sorted(learn)}"
            )
        lam = self.lam
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam <= 0:
            raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
        object.__setattr__(self, "lam", float(lam))
        if self.learn_scope not in ("circuit", "full"):
            raise ValueError(f"learn_scope must be 'circuit' or 'full', got {self.learn_scope!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"old": self.old.to_dict(), "lam": self.lam, "learn": self.learn.to_dict(), "learn_scope": self.learn_scope}


def f_learning(
    model: Any,
    circuit: Circuit | Iterable[Component],
    *,
    edit: Sequence[FactPrompt | tuple[str, str, str]],
    retain: Sequence[FactPrompt | Pair] = (),
    general_text: Sequence[str] = (),
    config: FLearningConfig | None = None,
    progress: bool = True,
) -> WeightEdit:
    """Replace old answers by new ones with F-Learning on ``circuit``; return one weight edit.

    Args:
        model: a causal LM bridge in eval mode.
        circuit: a ``Circuit`` computed on this model, or components (stage 1 and 2 train and
            subtract only its covered entries).
        edit: the facts to update: ``FactPrompt`` with ``target`` (old) and ``target_new``, or
            ``(prompt, old_answer, new_answer)`` triples.
        retain, general_text: for ``retain_ce`` / ``retain_kl`` in ``config.learn``.
        config: ``FLearningConfig``.
        progress: tqdm bars with the live losses.

    Returns:
        A ``WeightEdit`` of kind ``"f_learning"``, not applied; ``params`` hold ``config``,
        ``circuit``, ``data``, ``delta_norm`` and ``runs`` (``old``, ``learn``: steps, curve,
        checks).

    Raises:
        ValueError: as ``finetune`` (empty circuit, retain overlap, missing data ...), or an
            edit row without an old and a new answer.
        ModelMismatchError: a circuit found on another model.
    """
    cfg = config or FLearningConfig()
    if not isinstance(cfg, FLearningConfig):
        raise ValueError(f"config must be an FLearningConfig, got {type(cfg).__name__}")
    old_rows, new_rows = _old_new(edit)
    retain_rows = _pairs(retain, "retain")
    stage1 = {"forget": [], "edit": old_rows, "retain": []}
    stage3 = {"forget": [], "edit": new_rows, "retain": retain_rows}
    _check_inputs(model, cfg.old, stage1, ())
    _check_inputs(model, cfg.learn, stage3, general_text)
    masks = covered_masks(model, circuit)
    learn_masks = masks if cfg.learn_scope == "circuit" else covered_masks(model, ALL)
    names = list(dict.fromkeys([*masks, *learn_masks]))
    meta: dict[str, Any] = {
        "config": cfg.to_dict(),
        "circuit": _circuit_json(circuit),
        "data": {**_data_json({"old": old_rows, "new": new_rows, "retain": retain_rows}, general_text)},
    }
    with WeightEdit.recording(model, names, kind="f_learning", params_meta=meta) as rec:
        try:
            live = hf_parameters(model)
            theta0 = {n: live[n].detach().clone() for n in masks}
            run_old = _train(model, masks, stage1, (), cfg.old, progress=progress, desc="f-learning: old")
            delta_sq = 0.0
            with torch.no_grad():
                for name, mask in masks.items():
                    delta = live[name].detach() - theta0[name]
                    delta_sq += float((delta * delta).sum())
                    live[name].copy_(torch.where(mask, theta0[name] - cfg.lam * delta, theta0[name]))
            run_new = _train(model, learn_masks, stage3, general_text, cfg.learn, progress=progress,
                             desc="f-learning: new")
        except BaseException:
            rec.restore()
            raise
        meta["delta_norm"] = math.sqrt(delta_sq)
        meta["runs"] = {"old": run_old.to_dict(), "learn": run_new.to_dict()}
    result = rec.edit
    result.revert(model)
    return result


def _old_new(edit: Sequence[FactPrompt | tuple[str, str, str]]) -> tuple[list[Pair], list[Pair]]:
    if isinstance(edit, str | FactPrompt) or not edit:
        raise ValueError("edit must be a non-empty list of FactPrompt (with target_new) or (prompt, old, new) triples")
    old, new = [], []
    for i, item in enumerate(edit):
        if isinstance(item, FactPrompt):
            if item.target_new is None:
                raise ValueError(f"edit[{i}] ({item.prompt!r}) has no target_new: F-Learning needs the new answer")
            prompt, was, now = item.prompt, item.target, item.target_new
        elif isinstance(item, tuple | list) and len(item) == 3 and all(isinstance(s, str) for s in item):
            prompt, was, now = item
        else:
            raise ValueError(f"edit[{i}] must be a FactPrompt or a (prompt, old, new) triple, got {item!r:.80}")
        old.append((prompt, was))
        new.append((prompt, now))
    return old, new


__all__ = ["FLearningConfig", "f_learning"]
