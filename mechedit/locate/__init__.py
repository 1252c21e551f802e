"""Locators: one module per method, each returning ``Scores`` over model components."""

from mechedit.locate.activation_patching import (
    ActivationPatchingConfig,
    CircuitPatching,
    activation_patching,
    circuit_patching,
    faithfulness,
)
from mechedit.locate.attribution_patching import (
    Attribution,
    AttributionPatchingConfig,
    attribution_patching,
)
from mechedit.locate.neuron_attribution import NeuronAttributionConfig, neuron_attribution

__all__ = [
    "ActivationPatchingConfig",
    "Attribution",
    "AttributionPatchingConfig",
    "attribution_patching",
    "CircuitPatching",
    "NeuronAttributionConfig",
    "activation_patching",
    "circuit_patching",
    "faithfulness",
    "neuron_attribution",
]
