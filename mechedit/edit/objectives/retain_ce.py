"""Cross-entropy on a maintain set: keep the facts that should not change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from jaxtyping import Float
from torch import Tensor

from mechedit.edit.objectives.base import LossInputs, Objective, mean_token_nll


@dataclass(frozen=True)
class RetainCE(Objective):
    """Keep the retain set's answers likely (the "GradDiff" retain term).

    ``loss = mean_b -(1/|y_b|) sum_j log p(y_bj | x_b, y_b<j)`` over the retain facts' true
    answers (nats per token, >= 0); a descent step raises them.
    """

    name: ClassVar[str] = "retain_ce"
    reads: ClassVar[str] = "retain"

    def loss(self, inputs: LossInputs) -> Float[Tensor, ""]:
        return mean_token_nll(inputs.need_answers(self.name))
