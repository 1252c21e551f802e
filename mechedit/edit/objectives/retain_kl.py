"""KL divergence to the original model on general text (Yao et al., 2023, "Large Language Model
Unlearning"; open-unlearning's ``retain_loss_type="KL"``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from jaxtyping import Float
from torch import Tensor

from mechedit.edit.objectives.base import LossInputs, Objective
from mechedit.metrics import mean_kl_divergence


@dataclass(frozen=True)
class RetainKL(Objective):
    """Keep the next-token distributions on general text those of the original model.

    ``loss = mean over scored positions i of KL(P_original(. | t_<=i) || P_theta(. | t_<=i))``
    (nats, >= 0, 0 while nothing changed), pooled over every real position of every text whose
    next token is also real (``mechedit.metrics.mean_kl_divergence``). The expectation is under
    the original model, as in Yao et al.: it penalises losing what the original predicted. Its
    gradient is 0 at the start (a minimum), so it acts only once training has moved the model.
    """

    name: ClassVar[str] = "retain_kl"
    reads: ClassVar[str] = "general"
    needs_reference: ClassVar[bool] = True

    def loss(self, inputs: LossInputs) -> Float[Tensor, ""]:
        if inputs.logits is None or inputs.reference_logprobs is None:
            raise ValueError("retain_kl needs logits and reference_logprobs on general text")
        # kl_divergence(a, b) = KL(softmax a || softmax b): the reference goes first
        return mean_kl_divergence(inputs.reference_logprobs, inputs.logits, inputs.mask)
