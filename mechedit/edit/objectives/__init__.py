"""Fine-tuning objectives, one small module each, combined with weights by ``FinetuneConfig``.

| name | class | reads | loss (to minimise) |
|---|---|---|---|
| ``grad_ascent`` | ``GradientAscent`` | forget | ``mean log p(y|x)`` (Jang et al.) |
| ``log_one_minus_p`` | ``LogOneMinusP`` | forget | ``-mean log(1 - p + floor)`` (Guo et al.) |
| ``npo`` | ``NPO`` | forget | ``-(2/b) mean log sigmoid(-b (log p - log p_ref))`` (Zhang et al.) |
| ``simnpo`` | ``SimNPO`` | forget | ``-(2/b) mean log sigmoid(-(b/|y|) log p - gamma)`` (Fan et al.) |
| ``edit_ce`` | ``EditCE`` | edit | cross-entropy of the new answer |
| ``retain_ce`` | ``RetainCE`` | retain | cross-entropy of the kept answers |
| ``retain_kl`` | ``RetainKL`` | general text | ``KL(P_original || P)`` per position |
| ``random_mismatch`` | ``RandomMismatch`` | forget prompts | cross-entropy of random other answers (Yao et al.) |

``objectives_from(spec)`` turns ``{"npo": 1.0, "retain_kl": 0.5}`` (default parameters) or a
list of objective instances into a validated tuple.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mechedit.edit.objectives.base import READS, LossInputs, Objective, mean_token_nll
from mechedit.edit.objectives.edit_ce import EditCE
from mechedit.edit.objectives.grad_ascent import GradientAscent
from mechedit.edit.objectives.log_one_minus_p import LogOneMinusP
from mechedit.edit.objectives.mismatch import RandomMismatch
from mechedit.edit.objectives.npo import NPO
from mechedit.edit.objectives.retain_ce import RetainCE
from mechedit.edit.objectives.retain_kl import RetainKL
from mechedit.edit.objectives.simnpo import SimNPO

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (GradientAscent, LogOneMinusP, NPO, SimNPO, EditCE, RetainCE, RetainKL, RandomMismatch)
}


def objectives_from(spec: Mapping[str, float] | Iterable[Objective]) -> tuple[Objective, ...]:
    """A validated tuple of objectives from ``{name: weight}`` or objective instances.

    Raises:
        ValueError: an unknown name (the message lists the known ones), a weight that is NaN,
            infinite or negative, no objective at all, or one kind given twice.
    """
    if isinstance(spec, str):
        raise ValueError(f"objectives must be a dict of name -> weight or a list of objectives, not {spec!r}")
    if isinstance(spec, Mapping):
        unknown = [n for n in spec if n not in OBJECTIVES]
        if unknown:
            raise ValueError(f"unknown objectives {unknown}; known: {sorted(OBJECTIVES)}")
        items = tuple(OBJECTIVES[n](weight=w) for n, w in spec.items())
    else:
        items = tuple(spec)
        bad = [o for o in items if not isinstance(o, Objective)]
        if bad:
            raise ValueError(
                f"objectives must be Objective instances (e.g. NPO(beta=0.1)), got {bad[0]!r}"
            )
    if not items:
        raise ValueError(f"give at least one objective, e.g. {{'npo': 1.0, 'retain_kl': 1.0}}; known: {sorted(OBJECTIVES)}")
    names = [o.name for o in items]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"objectives {twice} are given twice; give each kind once with its weight")
    return items


__all__ = [
    "NPO",
    "OBJECTIVES",
    "READS",
    "EditCE",
    "GradientAscent",
    "LogOneMinusP",
    "LossInputs",
    "Objective",
    "RandomMismatch",
    "RetainCE",
    "RetainKL",
    "SimNPO",
    "mean_token_nll",
    "objectives_from",
]
