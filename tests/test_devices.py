"""Tokens follow the model's device in every stage function that runs the model.

There is no GPU here, so the model's device is faked: ``model_device`` reports ``meta`` and the
model's forward records the device of the tokens it receives, then stops the run. A function
that forgot ``.to(model_device(model))`` hands the forward CPU tokens.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import mechedit
from mechedit.components import Component
from mechedit.edit import ablate
from mechedit.models import model_device
from mechedit.prompts import FactPrompt

# the modules (mechedit.locate re-exports a function under the module's name)
activation = importlib.import_module("mechedit.edit.activation")
facts = importlib.import_module("mechedit.evaluate.facts")
attribution = importlib.import_module("mechedit.locate.neuron_attribution")
gradients = importlib.import_module("mechedit.gradients")
tokens = importlib.import_module("mechedit.tokens")

FACTS = [
    FactPrompt(prompt="w1 w2 w3", target="w4", subject="w2"),
    FactPrompt(prompt="w5 w6", target="w7", subject="w5"),
]


class _Stop(Exception):
    """Raised by the spy once it has seen the tokens."""


@pytest.fixture
def spied(tiny_gpt2_dir, monkeypatch):
    model = mechedit.load(tiny_gpt2_dir)
    seen: list[torch.device] = []

    def recording_forward(tokens, *args, **kwargs):
        seen.append(tokens.device)
        raise _Stop


    monkeypatch.setattr(model, "forward", recording_forward)
    fake = torch.device("meta")
    for module in (activation, facts, attribution, gradients, tokens):
        monkeypatch.setattr(module, "model_device", lambda m: fake)
    return model, seen


def test_model_device_is_where_the_parameters_are(tiny_bridge):
    assert model_device(tiny_bridge) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


@pytest.mark.parametrize(
    "run",
    [
        lambda m: activation.mean_activations(m, ["blocks.0.mlp.hook_post"], ["w1 w2", "w3 w4 w5"]),
        lambda m: facts.fact_item_scores(m, FACTS),
        lambda m: attribution.neuron_attribution(
            m, FACTS, config=attribution.NeuronAttributionConfig(positions="subject"), progress=False
        ),
        lambda m: ablate(m, [Component("neuron", 0, neuron=1)], mode="mean", reference=["w1 w2"]),
    ],
    ids=["mean_activations", "fact_item_scores", "neuron_attribution", "ablate_mean"],
)
def test_stage_functions_move_tokens_to_the_models_device(spied, run):
    model, seen = spied
    with pytest.raises(_Stop):
        run(model)
    assert seen == [torch.device("meta")]
