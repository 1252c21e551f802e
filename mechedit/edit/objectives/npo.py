"""Negative preference optimisation (Zhang et al., 2024, "Negative Preference Optimization: From
Catastrophic Collapse to Effective Unlearning")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mechedit.edit.objectives.base import LossInputs, Objective, _positive


@dataclass(frozen=True)
class NPO(Objective):
    """Forget relative to the frozen original model, with a loss bounded below by 0.

    ``loss = (2/beta) mean_b log(1 + (p_theta(y_b|x_b) / p_ref(y_b|x_b))^beta)``
    ``      = -(2/beta) mean_b log sigmoid(-beta * (log p_theta - log p_ref))`` (nats; 0 as
    ``p_theta -> 0``; ``(2/beta) log 2`` at the start, where ``p_theta = p_ref``). Sequence
    log-probabilities sum the answer's tokens. Its gradient is a **weighted gradient ascent**:
    ``mean_b w_b grad log p_theta(y_b|x_b)`` with ``w_b = 2 sigmoid(beta * (log p_theta -
    log p_ref)) in (0, 2)``, which is 1 at the start and tends to 1 for every row as
    ``beta -> 0`` (NPO is then ``GradientAscent``) and shrinks as an answer drops below the
    original's, so NPO slows down instead of diverging.
    """

    beta: float = 0.1

    name: ClassVar[str] = "npo"
    reads: ClassVar[str] = "forget"
    needs_reference: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "beta", _positive(self.beta, "NPO.beta"))

    def loss(self, inputs: LossInputs) -> Float[Tensor, ""]:
        answers = inputs.need_answers(self.name)
        if inputs.reference_total is None:
            raise ValueError("NPO needs the original model's answer log-probabilities (reference_total)")
        ratio = answers.total - inputs.reference_total.to(answers.total.device)
        return -(2.0 / self.beta) * F.logsigmoid(-self.beta * ratio).mean()
