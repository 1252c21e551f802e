"""SimNPO: NPO without a reference model (Fan et al., 2024, "Simplicity Prevails: Rethinking
Negative Preference Optimization for LLM Unlearning")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mechedit.edit.objectives.base import LossInputs, Objective, _finite, _positive


@dataclass(frozen=True)
class SimNPO(Objective):
    """Forget with a length-normalised NPO whose reference is a constant margin.

    ``loss = -(2/beta) mean_b log sigmoid(-(beta/|y_b|) log p(y_b|x_b) - gamma)`` (nats, > 0,
    tends to 0 as ``p -> 0``); ``|y_b|`` is the answer's token count. Its gradient with respect
    to ``log p(y_b|x_b)`` is ``(2/|y_b|) sigmoid((beta/|y_b|) log p + gamma) / batch > 0``: a
    descent step lowers the answer's log-probability, less and less once it is improbable.
    ``gamma`` (>= 0 in the paper; 0 by default) is the reward margin.
    """

    beta: float = 2.5
    gamma: float = 0.0

    name: ClassVar[str] = "simnpo"
    reads: ClassVar[str] = "forget"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "beta", _positive(self.beta, "SimNPO.beta"))
        object.__setattr__(self, "gamma", _finite(self.gamma, "SimNPO.gamma"))

    def loss(self, inputs: LossInputs) -> Float[Tensor, ""]:
        answers = inputs.need_answers(self.name)
        per_token = answers.total / answers.lengths
        return -(2.0 / self.beta) * F.logsigmoid(-self.beta * per_token - self.gamma).mean()
