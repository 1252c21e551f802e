"""Method agreement: Jaccard/Spearman by hand on made-up scores, and a real comparison on
factworld-planted, whose planted layer is known."""

from __future__ import annotations

import random

import pytest
import torch

import mechedit
from mechedit import zoo
from mechedit.evaluate import layer_profile, localization_agreement, planted_recovery
from mechedit.locate import activation_patching, attribution_patching
from mechedit.scores import Scores
from mechedit.viz import agreement_heatmaps, recovery_bars
from mechedit.zoo.prompts import fact_pairs


def _neurons(values) -> Scores:
    return Scores(torch.tensor(values, dtype=torch.float32), ("layer", "neuron"), "neuron", "made-up")


def test_component_level_matches_hand_computed_values():
    a = _neurons([[5.0, 4.0, 0.1], [3.0, 0.2, 0.3]])
    b = _neurons([[-5.0, 0.1, 4.0], [3.0, 0.2, 0.3]])  # |b|: same top-1, second place moved
    c = _neurons([[0.1, 0.2, 5.0], [0.3, 4.0, 3.0]])  # |c| ranks a's cells exactly in reverse
    agreement = localization_agreement({"a": a, "b": b, "c": c}, k=2)
    assert agreement.level == "component" and agreement.k == 2
    # top-2 by |score|: a {L0N0, L0N1}, b {L0N0, L0N2}, c {L0N2, L1N1}
    assert agreement.jaccard[0, 1].item() == pytest.approx(1 / 3)
    assert agreement.jaccard[0, 2].item() == 0.0
    assert agreement.spearman[0, 2].item() == pytest.approx(-1.0)
    assert agreement.spearman[0, 0].item() == 1.0
    assert torch.equal(agreement.spearman, agreement.spearman.T)
    assert agreement.top["a"][0] == str(a.component_at(0, 0))
    # signed ranking: b's -5 is now its last cell
    signed = localization_agreement({"a": a, "b": b}, k=1, by="value")
    assert signed.jaccard[0, 1].item() == 0.0


def test_layer_level_for_different_sites_and_its_errors():
    neurons = _neurons([[1.0, -1.0, 0.0], [0.5, 0.5, 4.0]])
    grid = Scores(torch.tensor([[0.0, 2.0], [0.0, 0.1]]), ("layer", "pos"), "mlp_out", "made-up")
    assert layer_profile(neurons).tolist() == [2.0, 5.0]
    assert layer_profile(neurons, op="abs_max").tolist() == [1.0, 4.0]
    agreement = localization_agreement({"neurons": neurons, "grid": grid}, k=1)
    assert agreement.level == "layer"
    assert agreement.top == {"neurons": ("L1",), "grid": ("L0",)}
    assert agreement.jaccard[0, 1].item() == 0.0 and agreement.spearman[0, 1].item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least two"):
        localization_agreement({"neurons": neurons})
    with pytest.raises(ValueError, match="one site and shape"):
        localization_agreement({"neurons": neurons, "grid": grid}, level="component")
    three = _neurons([[1.0], [2.0], [3.0]])
    with pytest.raises(ValueError, match="different numbers of layers"):
        localization_agreement({"neurons": neurons, "three": three})
    frame = planted_recovery({"neurons": neurons, "grid": grid}, layer=1)
    assert frame["rank"].tolist() == [1, 2] and frame["recovered"].tolist() == [True, False]
    assert frame["share"].iloc[0] == pytest.approx(5 / 7)


def test_methods_on_factworld_planted_agree_on_the_planted_layer_only_with_a_control():
    """Raw mlp_out patching puts layer 0 first for every subject; subtracting control facts
    (trained people, same templates) makes exact patching and attribution patching both put the
    planted layer first, and agree with each other at layer level."""
    name = "factworld-planted"
    model, world = mechedit.load(name), zoo.load_world(name)
    layer = zoo.metadata(name)["planted_layer"]
    rng = random.Random(0)
    planted = fact_pairs(world, world.planted_facts[::4], pool=world.planted_facts, rng=rng)
    control = fact_pairs(world, rng.sample(world.facts, 20), rng=rng)
    options = dict(site="mlp_out", per_position=False, progress=False, hook_check=False)
    scores = {
        "patching (raw)": activation_patching(model, planted, **options),
        "patching - control": activation_patching(model, planted, control=control, **options),
        "attribution - control": attribution_patching(
            model, planted, sites=("mlp_out",), per_position=False, control=control, progress=False)["mlp_out"],
    }
    # recovery ranks by |score|; the contrasts' planted layer is their largest positive cell
    recovery = planted_recovery(scores, layer=layer).set_index("method")
    assert recovery.loc["patching (raw)", "top_layer"] == 0
    assert not recovery.loc["patching (raw)", "recovered"]
    assert recovery.loc["patching - control", "recovered"], recovery
    assert recovery.loc["attribution - control", "recovered"], recovery
    agreement = localization_agreement(scores, k=1)
    jaccard, rho = agreement.frames()
    assert jaccard.loc["patching - control", "attribution - control"] == 1.0
    assert jaccard.loc["patching (raw)", "patching - control"] == 0.0
    # measured: Spearman over the six |layer| profiles 0.66 (exact vs gradient contrast; 0.77 before issue 7)
    assert rho.loc["patching - control", "attribution - control"] > 0.5, rho
    fig = agreement_heatmaps(agreement)
    assert len(fig.data) == 2 and list(fig.data[0].x) == list(scores)
    bars = recovery_bars(planted_recovery(scores, layer=layer), layer=layer)
    assert list(bars.data[0].marker.color) == ["#d62728", "#2ca02c", "#2ca02c"]


def test_scores_of_different_models_are_refused_unless_asked_for():
    from dataclasses import replace

    from mechedit.provenance import Provenance

    a = replace(_neurons([[1.0, 0.0], [0.0, 2.0]]), provenance=Provenance("factworld", "aaaa"))
    b = replace(_neurons([[1.0, 0.0], [0.0, 2.0]]), provenance=Provenance("factworld-planted", "bbbb"))
    with pytest.raises(ValueError, match="different models.*same_model=False"):
        localization_agreement({"a": a, "b": b}, k=1)
    assert localization_agreement({"a": a, "b": b}, k=1, same_model=False).jaccard[0, 1].item() == 1.0
