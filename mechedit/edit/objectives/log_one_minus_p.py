"""Minimise ``-log(1 - p)`` of the answer, with a floor (Guo et al., 2024, "Mechanistic Unlearning:
Robust Knowledge Unlearning and Editing via Mechanistic Localization")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from mechedit.edit.objectives.base import LossInputs, Objective


@dataclass(frozen=True)
class LogOneMinusP(Objective):
    """Forget by making the answer improbable, with a loss that is bounded below.

    ``loss = -mean_b log(1 - p_b + floor)``, ``p_b = p(y_b | x_b) = exp(sum_j log p(y_bj | ...))``
    (nats; ``>= -log(1 + floor) ~ 0``, reached as ``p_b -> 0``). ``1 - p`` is computed as
    ``-expm1(log p)``, exact even for p close to 1. Its gradient with respect to ``log p_b`` is
    ``p_b / (1 - p_b + floor) >= 0`` (times ``1/batch``), so a descent step lowers the answer's
    log-probability, strongly while it is likely and hardly once it is not: unlike gradient
    ascent it stops pushing once the answer is forgotten. ``floor`` (> 0) keeps the loss finite
    at ``p = 1`` and caps that gradient at ``1 / floor``.
    """

    floor: float = 1e-4

    name: ClassVar[str] = "log_one_minus_p"
    reads: ClassVar[str] = "forget"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.floor, int | float) and math.isfinite(self.floor) and 0 < self.floor < 1):
            raise ValueError(f"floor must be a number in (0, 1), got {self.floor!r}")
        object.__setattr__(self, "floor", float(self.floor))

    def loss(self, inputs: LossInputs) -> Float[Tensor, ""]:
        log_p = inputs.need_answers(self.name).total.clamp(max=0.0)
        return -torch.log(-torch.expm1(log_p) + self.floor).mean()
