"""Gradient ascent on the answer (Jang et al., 2023, "Knowledge Unlearning for Mitigating Privacy
Risks in Language Models")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from jaxtyping import Float
from torch import Tensor

from mechedit.edit.objectives.base import LossInputs, Objective


@dataclass(frozen=True)
class GradientAscent(Objective):
    """Forget by maximising the answer's negative log-likelihood.

    ``loss = mean_b log p(y_b | x_b)`` with ``log p(y|x) = sum_j log p(y_j | x, y_<j)`` (nats per
    answer, <= 0). Minimising it lowers every answer's log-probability: the gradient is
    ``mean_b grad log p(y_b|x_b)``, so a descent step moves against it. Unbounded below (the
    answer's log-probability can go to -inf), which is why it is usually paired with a retain
    term or an early stop.
    """

    name: ClassVar[str] = "grad_ascent"
    reads: ClassVar[str] = "forget"

    def loss(self, inputs: LossInputs) -> Float[Tensor, ""]:
        return inputs.need_answers(self.name).total.mean()
