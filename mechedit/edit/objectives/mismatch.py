"""Yao et al.'s random-mismatch term (2023, "Large Language Model Unlearning"): on a forget prompt,
teach a random other answer, so forgetting ends in a plausible wrong answer rather than noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from jaxtyping import Float
from torch import Tensor

from mechedit.edit.objectives.base import LossInputs, Objective, mean_token_nll


@dataclass(frozen=True)
class RandomMismatch(Objective):
    """Cross-entropy of a random answer given each forget prompt, redrawn every step.

    ``loss = mean_b -(1/|y~_b|) sum_j log p(y~_bj | x_b, y~_b<j)`` with ``y~_b`` drawn uniformly
    (seeded by the config's seed and the step) from ``answers`` without row ``b``'s own answer
    (nats per token, >= 0). A descent step raises random answers, spreading the forget prompts'
    probability over them. ``answers`` empty (the default): the distinct answers of the forget,
    retain and edit sets.
    """

    answers: tuple[str, ...] = ()

    name: ClassVar[str] = "random_mismatch"
    reads: ClassVar[str] = "mismatch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.answers, str):
            raise ValueError(f"answers must be a list of strings, not one string: [{self.answers!r}]")
        answers = tuple(self.answers)
        if any(not isinstance(a, str) or not a.strip() for a in answers):
            raise ValueError(f"answers must be non-empty strings, got {answers!r}")
        object.__setattr__(self, "answers", answers)

    def loss(self, inputs: LossInputs) -> Float[Tensor, ""]:
        return mean_token_nll(inputs.need_answers(self.name))
