"""Locators: one module per method, each returning ``Scores`` over model components."""

from mechedit.locate.activation_patching import (
    ActivationPatchingConfig,
    CircuitPatching,
    EdgeFaithfulness,
    activation_patching,
    circuit_patching,
    edge_faithfulness,
    faithfulness,
)
from mechedit.locate.attribution_patching import (
    Attribution,
    AttributionPatchingConfig,
    EdgeAttribution,
    attribution_memory,
    attribution_patching,
    edge_attribution_patching,
)
from mechedit.locate.causal_tracing import (
    CausalTrace,
    CausalTracingConfig,
    causal_tracing,
    subject_embedding_std,
)
from mechedit.locate.depn import (
    DEPNConfig,
    depn,
    depn_select,
    perturb_neurons,
    random_neurons,
    secret_attribution,
)
from mechedit.locate.fact_lookup import (
    FactLookup,
    FactLookupConfig,
    corrupt_subject_pairs,
    fact_lookup,
    knockout_logits,
)
from mechedit.locate.knowledge_neurons import (
    KnowledgeNeuronsConfig,
    KnowledgePrompt,
    knowledge_neurons,
    knowledge_prompts,
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
    "EdgeAttribution",
    "EdgeFaithfulness",
    "DEPNConfig",
    "FactLookup",
    "FactLookupConfig",
    "KnowledgeNeuronsConfig",
    "KnowledgePrompt",
    "NeuronAttributionConfig",
    "PCGUConfig",
    "PCGUSelection",
    "activation_patching",
    "attribution_memory",
    "attribution_patching",
    "causal_tracing",
    "circuit_patching",
    "corrupt_subject_pairs",
    "edge_attribution_patching",
    "edge_faithfulness",
    "depn",
    "depn_select",
    "fact_lookup",
    "faithfulness",
    "knockout_logits",
    "knowledge_neurons",
    "knowledge_prompts",
    "neuron_attribution",
    "perturb_neurons",
    "random_neurons",
    "pcgu",
    "secret_attribution",
    "subject_embedding_std",
]
