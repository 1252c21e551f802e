"""Cross-entropy toward the new answer: the edit objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from jaxtyping import Float
from torch import Tensor

from mechedit.edit.objectives.base import LossInputs, Objective, mean_token_nll


@dataclass(frozen=True)
class EditCE(Objective):
    """Teach each edited prompt its new answer.

    ``loss = mean_b -(1/|y_b|) sum_j log p(y_new_bj | x_b, y_new_b<j)``: teacher-forced
    cross-entropy of the new answer, nats per token, averaged over rows (>= 0, 0 when the new
    answer is certain). A descent step raises the new answer's log-probability.
    """

    name: ClassVar[str] = "edit_ce"
    reads: ClassVar[str] = "edit"

    def loss(self, inputs: LossInputs) -> Float[Tensor, ""]:
        return mean_token_nll(inputs.need_answers(self.name))
