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
from mechedit.locate.causal_tracing import (
    CausalTrace,
    CausalTracingConfig,
    causal_tracing,
    subject_embedding_std,
)
from mechedit.locate.neuron_attribution import NeuronAttributionConfig, neuron_attribution
from mechedit.locate.pcgu import PCGUConfig, PCGUSelection, pcgu

__all__ = [
    "ActivationPatchingConfig",
    "Attribution",
    "AttributionPatchingConfig",
    "CausalTrace",
    "CausalTracingConfig",
    "CircuitPatching",
    "NeuronAttributionConfig",
    "PCGUConfig",
    "PCGUSelection",
    "activation_patching",
    "attribution_patching",
    "causal_tracing",
    "circuit_patching",
    "faithfulness",
    "neuron_attribution",
    "pcgu",
    "subject_embedding_std",
]
