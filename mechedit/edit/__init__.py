"""Edits: temporary activation edits (hooks) and permanent, revertible weight edits."""

from mechedit.edit.activation import MODES, ActivationEdit, ablate, mean_activations
from mechedit.edit.weights import (
    BaseModelMismatchError,
    EditFormatError,
    EditStateError,
    WeightEdit,
    zero_neurons,
)

__all__ = [
    "MODES",
    "ActivationEdit",
    "BaseModelMismatchError",
    "EditFormatError",
    "EditStateError",
    "WeightEdit",
    "ablate",
    "mean_activations",
    "zero_neurons",
]
