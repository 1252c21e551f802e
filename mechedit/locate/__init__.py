"""Locators: one module per method, each returning ``Scores`` over model components."""

from mechedit.locate.neuron_attribution import NeuronAttributionConfig, neuron_attribution

__all__ = ["NeuronAttributionConfig", "neuron_attribution"]
