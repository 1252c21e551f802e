"""Edits: temporary activation edits (hooks) and permanent, revertible weight edits.

Both kinds follow one protocol, ``Edit`` (``apply(model)``, ``revert(model)``,
``applied(model)``, ``save(dir)``, ``load(dir)``); ``export.export_hf`` writes a model with a
weight edit as a plain Hugging Face checkpoint.
"""

from mechedit.edit.activation import MODES, ActivationEdit, ablate, mean_activations
from mechedit.edit.pcgu import PCGURun, PCGUUpdate, PCGUUpdateConfig, pcgu_update
from mechedit.edit.protocol import Edit, applied_edit, load_edit
from mechedit.edit.rank_one import RankOneConfig, rank_one_edit
from mechedit.edit.weights import (
    BaseModelMismatchError,
    EditFormatError,
    EditStateError,
    Recording,
    WeightEdit,
    zero_neurons,
)

__all__ = [
    "MODES",
    "ActivationEdit",
    "BaseModelMismatchError",
    "Edit",
    "EditFormatError",
    "EditStateError",
    "PCGURun",
    "PCGUUpdate",
    "PCGUUpdateConfig",
    "RankOneConfig",
    "Recording",
    "WeightEdit",
    "ablate",
    "applied_edit",
    "load_edit",
    "mean_activations",
    "pcgu_update",
    "rank_one_edit",
    "zero_neurons",
]
