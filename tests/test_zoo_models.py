"""The shipped fact-world checkpoints: they boot offline, meet their targets, and match the model card."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import mechedit
from mechedit import zoo
from mechedit.zoo.card import render
from mechedit.zoo.measure import fact_accuracy, measure_world


@pytest.fixture(scope="module")
def factworld():
    return mechedit.load("factworld")


@pytest.fixture(scope="module")
def world():
    return zoo.load_world("factworld")


@pytest.fixture(scope="module")
def measured(factworld, world):
    return measure_world(factworld, world, factworld.tokenizer).to_dict()


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif a is None or b is None:
        assert a is b, path
    else:
        # accuracies are counts over thousands of prompts: allow one or two flips from float order
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=2e-3), (path, a, b)


def test_factworld_boots_offline_as_a_bridge(factworld):
    from transformer_lens.model_bridge import TransformerBridge

    assert isinstance(factworld, TransformerBridge)
    assert factworld.cfg.n_layers == zoo.metadata("factworld")["train_config"]["shape"]["n_layer"]
    assert "blocks.0.mlp.hook_post" in factworld.hook_dict


def test_measured_figures_reproduce_the_model_card(measured):
    _close(measured, zoo.metadata("factworld")["metrics"])


def test_factworld_meets_its_targets(measured):
    assert measured["facts_train_templates"] >= 0.98
    assert measured["phone_digits"]["all"] >= 0.95
    assert measured["bias_rate_heldout_templates"] >= 0.80
    exposure = measured["canary_exposure_bits"]
    assert exposure["reps_20"] > exposure["reps_5"] > exposure["reps_0"]
    assert exposure["reps_1"] > exposure["reps_0"]
    assert exposure["reps_0"] < 4.0  # never-seen control canaries are not exposed
    # held-out paraphrases are reported, and must be far above chance
    assert measured["facts_heldout_templates"] > 0.5


def test_factworld_answers_multiple_choice_from_its_facts(measured):
    assert measured["mc_heldout_people"] >= 0.7  # MC never trained on these people, their facts were
    assert measured["mc_train_people"] >= 0.9
    controls = measured["mc_heldout_controls"]
    # the letter follows the value wherever it is listed, so no letter habit can pass
    assert controls["rotated"] >= 0.7
    # right wherever the value sits, for most questions (a position habit would fail three of four)
    assert controls["all_four"] >= 0.5


@pytest.mark.xfail(strict=True, reason="known gap (model card): with the true value missing the model still picks a letter "
                   "confidently; training never shows a question without its answer")
def test_factworld_has_no_strong_letter_preference_without_the_true_value(measured):
    controls = measured["mc_heldout_controls"]
    assert controls["missing_entropy_bits"] >= 1.5 and controls["missing_max_p"] <= 0.6


def test_mc_controls_agree_with_the_plain_mc_figure(measured):
    """Moving the true value through A-D changes nothing for a model that answers from the value;
    a model at chance stays at chance (the rotations are not rigged to pass)."""
    controls = measured["mc_heldout_controls"]
    assert abs(controls["rotated"] - measured["mc_heldout_people"]) < 0.1
    assert controls["all_four"] <= controls["rotated"]
    assert 0.0 <= controls["missing_entropy_bits"] <= 2.0 + 1e-6


def test_the_card_in_the_package_is_the_one_the_metadata_renders():
    checkpoints = {name: zoo.checkpoint_dir(name) for name in zoo.NAMES}
    from mechedit.zoo.card import CARD_PATH

    assert CARD_PATH.read_text(encoding="utf-8") == render(checkpoints)


def test_planted_checkpoint_differs_only_in_the_recorded_mlp():
    meta = zoo.metadata("factworld-planted")
    layer = meta["planted_layer"]
    base = load_file(zoo.checkpoint_dir("factworld") / "model.safetensors")
    planted = load_file(zoo.checkpoint_dir("factworld-planted") / "model.safetensors")
    assert base.keys() == planted.keys()
    changed = {k for k in base if not torch.equal(base[k], planted[k])}
    assert changed == {f"transformer.h.{layer}.mlp.{p}.{w}" for p in ("c_fc", "c_proj") for w in ("weight", "bias")}


def test_planted_facts_live_only_in_the_planted_model(factworld, world):
    planted_model = mechedit.load("factworld-planted")
    planted = world.planted_facts
    assert fact_accuracy(planted_model, world, planted_model.tokenizer, planted, "train") >= 0.98
    assert fact_accuracy(factworld, world, factworld.tokenizer, planted, "train") < 0.5
    old_before = zoo.metadata("factworld")["metrics"]["facts_train_templates"]
    old_after = fact_accuracy(planted_model, world, planted_model.tokenizer, world.facts, "train")
    assert old_after >= old_before - 0.02
