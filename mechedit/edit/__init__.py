"""Edits: temporary activation edits (hooks) and permanent, revertible weight edits.

Both kinds follow one protocol, ``Edit`` (``apply(model)``, ``revert(model)``,
``applied(model)``, ``save(dir)``, ``load(dir)``); ``export.export_hf`` writes a model with a
weight edit as a plain Hugging Face checkpoint. ``finetune`` trains only a circuit's parameters
with composable objectives (``mechedit.edit.objectives``) and ``f_learning`` runs F-Learning on a
circuit; both return a ``WeightEdit``.
"""

from mechedit.edit.activation import MODES, ActivationEdit, ablate, mean_activations
from mechedit.edit.f_learning import FLearningConfig, f_learning
from mechedit.edit.finetune import FinetuneConfig, covered_masks, exact_match, finetune
from mechedit.edit.objectives import (
    NPO,
    OBJECTIVES,
    EditCE,
    GradientAscent,
    LogOneMinusP,
    Objective,
    RandomMismatch,
    RetainCE,
    RetainKL,
    SimNPO,
)
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
    "NPO",
    "OBJECTIVES",
    "ActivationEdit",
    "BaseModelMismatchError",
    "Edit",
    "EditFormatError",
    "EditCE",
    "EditStateError",
    "FLearningConfig",
    "FinetuneConfig",
    "GradientAscent",
    "LogOneMinusP",
    "Objective",
    "PCGURun",
    "PCGUUpdate",
    "PCGUUpdateConfig",
    "RankOneConfig",
    "RandomMismatch",
    "Recording",
    "RetainCE",
    "RetainKL",
    "SimNPO",
    "WeightEdit",
    "ablate",
    "applied_edit",
    "covered_masks",
    "exact_match",
    "f_learning",
    "finetune",
    "load_edit",
    "mean_activations",
    "pcgu_update",
    "rank_one_edit",
    "zero_neurons",
]
