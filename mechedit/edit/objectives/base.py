"""What every fine-tuning objective shares: a validated weight, the data it reads, its inputs.

An objective is a small frozen dataclass with a ``weight`` (finite, >= 0) and a ``loss(inputs)``
returning a scalar tensor to **minimise**; ``mechedit.edit.finetune`` minimises
``sum_k weight_k * loss_k``. Each objective reads one kind of data (``reads``):

* ``"forget"``: the facts to forget, scored on their true answers;
* ``"edit"``: the facts to change, scored on their new answers;
* ``"retain"``: facts to keep, scored on their true answers;
* ``"general"``: general text, every next-token prediction;
* ``"mismatch"``: the forget prompts, each with a random other answer drawn every step.

Answers are teacher-forced: an answer of several tokens is scored token by token given the
prompt and the answer's earlier tokens (``mechedit.metrics.continuation_logprobs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from jaxtyping import Bool, Float
from torch import Tensor

from mechedit.metrics import ContinuationLogprobs

READS = ("forget", "edit", "retain", "general", "mismatch")


@dataclass(frozen=True)
class LossInputs:
    """What the trainer hands an objective for one step (fields it does not read are ``None``).

    Attributes:
        answers: the current model's teacher-forced answer log-probabilities
            (``token_logprobs [batch, k]`` nats, ``mask [batch, k]``); for ``"forget"``,
            ``"edit"``, ``"retain"`` and ``"mismatch"``.
        reference_total: ``[batch]`` ``log p_ref(answer | prompt)`` of the frozen original model
            (nats, summed over answer tokens); for objectives with ``needs_reference``.
        logits: ``[batch, pos, vocab]`` the current model's logits on general text.
        reference_logprobs: ``[batch, pos, vocab]`` the original model's log-softmax there.
        mask: ``[batch, pos]`` True at positions whose next-token prediction counts.
    """

    answers: ContinuationLogprobs | None = None
    reference_total: Float[Tensor, " batch"] | None = None
    logits: Float[Tensor, "batch pos vocab"] | None = None
    reference_logprobs: Float[Tensor, "batch pos vocab"] | None = None
    mask: Bool[Tensor, "batch pos"] | None = None

    def need_answers(self, who: str) -> ContinuationLogprobs:
        if self.answers is None:
            raise ValueError(f"{who} needs teacher-forced answer log-probabilities (answers=)")
        return self.answers


@dataclass(frozen=True)
class Objective:
    """Base of every objective: ``weight`` times ``loss(inputs)`` enters the total to minimise.

    Attributes:
        weight: the objective's factor in the total loss; finite and >= 0 (0 switches it off
            but still logs it). The direction (ascent or descent) is the objective's own: to
            push an answer down use a forget objective, never a negative weight.
    """

    weight: float = 1.0

    #: short name, the key in configs and loss curves
    name: ClassVar[str] = ""
    #: which data the objective reads (one of ``READS``)
    reads: ClassVar[str] = ""
    #: whether it compares with the frozen original model
    needs_reference: ClassVar[bool] = False

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ValueError(
                f"{type(self).__name__}.weight must be a finite number >= 0, got {w!r}; the sign "
                "of an objective is fixed by its kind (use a forget objective to push an answer "
                "down, not a negative weight)"
            )
        object.__setattr__(self, "weight", float(w))

    def loss(self, inputs: LossInputs) -> Float[Tensor, ""]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, float | str]:
        """``{"name": ..., "weight": ..., <its parameters>}`` (JSON)."""
        from dataclasses import asdict

        return {"name": self.name, **asdict(self)}


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def _finite(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def mean_token_nll(answers: ContinuationLogprobs) -> Float[Tensor, ""]:
    """``mean_b ( -(1/|y_b|) sum_j log p(y_bj | x_b, y_b<j) )``: nats per answer token, per row
    averaged over rows (every row weighs the same, whatever its answer's length). >= 0."""
    return (-answers.mean).mean()
