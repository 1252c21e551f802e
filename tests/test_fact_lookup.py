"""Fact lookup (``mechedit.locate.fact_lookup``) and equal-budget circuits (``mechedit.budget``)."""

from __future__ import annotations

import pytest
import torch

import mechedit
from mechedit import Component, FactPrompt, PromptPair, circuit_size, grow_to_budget, zoo
from mechedit.artifacts import ModelMismatchError
from mechedit.hf import hf_parameter
from mechedit.locate import (
    FactLookupConfig,
    attribution_patching,
    causal_tracing,
    fact_lookup,
    knockout_logits,
)
from mechedit.tokens import answer_id
from mechedit.zoo import load_world
from mechedit.zoo.prompts import control_facts, fact_pairs, fact_prompts
from mechedit.zoo.random_model import random_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"progress": False, "hook_check": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fact_lookup")
    return {
        arch: mechedit.load(random_checkpoint(root / arch, arch, n_layer=2, n_embd=64, n_head=4))
        for arch in ("gpt2", "neox", "llama")
    }


def _tiny_facts(n: int = 6) -> list[FactPrompt]:
    # one-token subjects right before the final token, each with its own answer
    return [
        FactPrompt(prompt=f"w1 w2 w{10 + i} w3", subject=f"w{10 + i}", target=f"w{30 + i}", relation_id="r")
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def factworld():
    return mechedit.load("factworld"), load_world("factworld")


@pytest.fixture(scope="module")
def factworld_lookup(factworld):
    model, world = factworld
    facts = [fact_prompts(world, f)[1] for f in world.facts if f.relation_id == "P19"][:96]
    return fact_lookup(model, facts, n_corrupt=1, **QUIET)


# -- attention knockout ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_full_knockout_makes_final_token_blind_to_the_subject(tiny, arch):
    # With the subject right before the final token, the final token sees the subject only by
    # attending to it: blocking that at every head of every layer must make the logits equal.
    model = tiny[arch]
    a = FactPrompt(prompt="w1 w2 w7 w8 w3", subject="w7 w8", target="w5")
    b = FactPrompt(prompt="w1 w2 w20 w21 w3", subject="w20 w21", target="w5")
    blind = knockout_logits(model, [a, b])
    assert torch.allclose(blind[0], blind[1], atol=1e-5)
    # zeroing without renormalising keeps the other keys' softmax weights, whose denominator
    # still holds the subject's attention logits: not blind
    zeroed = knockout_logits(model, [a, b], renormalize=False)
    assert (zeroed[0] - zeroed[1]).abs().max() > 1e-5
    none = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    seeing = knockout_logits(model, [a, b], knock=none)
    assert (seeing[0] - seeing[1]).abs().max() > 1e-3
    with torch.no_grad():
        plain = model(model.to_tokens(a.prompt))[0, -1]
    assert torch.allclose(seeing[0], plain, atol=1e-5)


def test_batched_head_effects_match_single_knockouts(tiny):
    # fact_lookup's knockout variants run batched (split across forwards by batch_size=5); each
    # head's effect must equal the direct knockout of that head alone.
    model = tiny["gpt2"]
    facts = _tiny_facts()
    result = fact_lookup(model, facts, n_corrupt=2, probes=False, batch_size=5, **QUIET)
    clean = [FactPrompt(prompt=p.clean, subject=facts[i].subject, target=p.answer)
             for p, i in zip(result.pairs, result.fact_index, strict=True)]
    answer = torch.tensor([answer_id(model, p.clean, p.answer) for p in result.pairs])
    wrong = torch.tensor([answer_id(model, p.clean, p.wrong_answer) for p in result.pairs])
    gap = result.clean_logit_diff - result.corrupt_logit_diff
    rows = torch.arange(len(clean))
    for layer, head in [(0, 0), (1, 3)]:
        knock = torch.zeros(2, 4, dtype=torch.bool)
        knock[layer, head] = True
        logits = knockout_logits(model, clean, knock=knock)
        ld = (logits[rows, answer] - logits[rows, wrong]).mean()
        expected = (result.clean_logit_diff - float(ld)) / gap
        assert float(result.head_effects.values[layer, head]) == pytest.approx(expected, abs=1e-4)


# -- path patching --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_path_effects_by_construction(tiny, arch):
    model = tiny[arch]
    result = fact_lookup(model, _tiny_facts(), n_corrupt=3, probes=False, extraction_layer=1, **QUIET)
    # the prompts differ only at the subject: its whole clean residual at layer 0 is the clean run
    assert float(result.subject_state.values[0]) == pytest.approx(1.0, abs=1e-4)
    assert result.extraction_layer == 1 and result.extraction_layer_source == "given"
    paths = result.paths.values
    assert torch.isnan(paths[0]).all() and torch.isnan(paths[1, 1])
    assert float(result.mlp_effects.values[0]) == pytest.approx(float(paths[1, 0]))


def test_mlp_without_subject_dependence_has_zero_effect(tmp_path):
    # Zeroing MLP 0's output weight leaves only its bias, the same in clean and corrupt runs:
    # patching that path changes nothing, so its effect is exactly 0 and it is not selected
    # (unless min_mlps asks for the best candidates, which flags it below the threshold).
    model = mechedit.load(random_checkpoint(tmp_path / "m", "gpt2", n_layer=2, n_embd=64, n_head=4))
    with torch.no_grad():
        hf_parameter(model, "transformer.h.0.mlp.c_proj.weight").zero_()
    facts = _tiny_facts()
    result = fact_lookup(model, facts, n_corrupt=2, probes=False, extraction_layer=1, **QUIET)
    assert float(result.mlp_effects.values[0]) == 0.0
    assert len(result.mlps) == 0
    kept = fact_lookup(model, facts, n_corrupt=2, probes=False, extraction_layer=1, min_mlps=1, **QUIET)
    assert list(kept.mlps) == [Component("mlp", 0)]
    assert kept.mlps.config["fact_lookup"]["below_threshold"] == [0]


# -- the fact world -------------------------------------------------------------------------------


def test_factworld_reads_the_subject_after_mlp_0_which_is_its_fact_lookup_mlp(factworld_lookup):
    # Measured on the shipped model (issue 7's recipe), 96 birth-city facts: the final token reads
    # the person through heads of layers 1-3 (knockout effects 0.26 / 0.15 / 0.14 at most, layer 0
    # at most 0.004), so the earliest extraction layer is 1 and MLP 0 is the one candidate; its
    # subject-token output alone, path-patched into resid_pre 1, restores the whole gap (1.00).
    r = factworld_lookup
    assert r.extraction_layer == 1 and r.extraction_layer_source == "measured"
    assert len(r.heads) >= 1 and all(1 <= c.layer <= 3 for c in r.heads)
    layer_effects = r.layer_effects.values
    assert int(layer_effects.argmax()) == 1 and float(layer_effects[1]) > 0.3 and float(layer_effects[0]) < 0.05
    assert list(r.mlps) == [Component("mlp", 0)] and float(r.mlp_effects.values[0]) > 0.9
    # what the subject tokens carry at layer 1 is MLP 0's output, and the final token has read it
    # all by layer 4 (the subject state fades to ~0 there)
    state, paths = r.subject_state.values, r.paths.values
    assert float(state[0]) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(paths[1, 0] - state[1])) < 0.05
    assert all(float(state[i + 1]) <= float(state[i]) + 0.01 for i in range(len(state) - 1))
    assert float(state[1]) > 0.9 and float(state[4]) < 0.05
    # probes: the answer is not written at the subject's last token, it is at the final token
    subj, last = r.probes_subject, r.probes_last
    assert float(subj.test_accuracy.max()) <= subj.chance + 0.15
    assert float(last.test_accuracy[-1]) >= 0.9
    summary = r.summary()
    assert summary["extraction_layer"] == 1 and summary["mlps"] == [0]
    assert summary["probes"]["subject_last"]["depths"][0] == "resid_pre 0"


def _planted_and_control(name: str):
    """``name``'s model, its planted facts' prompts and as many control prompts (trained people,
    the same relations and template): the control subtracts what is common to every subject."""
    model, world = mechedit.load(name), load_world(name)
    control = control_facts(world, world.planted_facts)
    return model, [fact_prompts(world, f)[1] for f in world.planted_facts], [fact_prompts(world, f)[1] for f in control]


def test_planted_at_every_position_is_not_a_fact_lookup_mlp():
    # factworld-planted trained MLP 2 at every position, so it acts where the answer is produced,
    # not by enriching the subject. Against control facts (trained people) nothing before the
    # measured extraction layer is specific to the planted facts: no fact-lookup MLP, and MLP 2's
    # subject-token output into resid_pre 3 restores no more for them than for the control
    # (measured: -0.007; the subject-mode model's MLP 1, below, +0.37). Without the control MLP 0
    # is returned, as for any fact of the base model (the shared part the control removes).
    from mechedit.library import planted_ground_truth

    model, planted, control = _planted_and_control("factworld-planted")
    assert list(planted_ground_truth().components) == [Component("mlp", 2)]
    result = fact_lookup(model, planted, control=control, probes=False, **QUIET)
    assert result.extraction_layer_source == "measured" and len(result.mlps) == 0
    assert float(result.mlp_effects.values[: result.extraction_layer].max()) < result.config.threshold
    assert abs(float(result.paths.values[3, 2])) < 0.02
    assert result.control_paths is not None and result.mlps.config["fact_lookup"]["control"]["n_facts"] == 20
    assert float(result.control_paths.values[1, 0]) > 0.9  # the control's own MLP 0 path
    alone = fact_lookup(model, planted, probes=False, **QUIET)
    assert list(alone.mlps) == [Component("mlp", 0)]


@pytest.mark.skipif("factworld-planted-subject" not in zoo.NAMES, reason="factworld-planted-subject is not shipped (MODEL_CARD.md)")
def test_subject_planted_layer_is_the_measured_fact_lookup_mlp():
    # factworld-planted-subject stored its facts as enrichment of the name tokens by MLP 1. Against
    # control facts the extraction layer is measured after it (3) and MLP 1 is the one fact-lookup
    # MLP (measured: path effect 0.37, MLPs 0 and 2 -0.04 / -0.01).
    from mechedit.library import planted_ground_truth

    truth = planted_ground_truth("factworld-planted-subject")
    model, planted, control = _planted_and_control("factworld-planted-subject")
    result = fact_lookup(model, planted, control=control, probes=False, **QUIET)
    assert result.extraction_layer_source == "measured" and result.extraction_layer >= 2
    assert all(h.layer >= result.extraction_layer for h in result.heads)
    assert list(result.mlps) == list(truth.components) == [Component("mlp", 1)]
    effects = result.mlp_effects.values[: result.extraction_layer]
    assert float(effects[1]) > 0.3 and float(effects.abs().sort().values[-2]) < 0.1
    # without the control the extraction layer is 1 (heads that read every name) and the shared
    # MLP 0 is returned instead: the planted layer shows only as the contrast
    alone = fact_lookup(model, planted, probes=False, **QUIET)
    assert alone.extraction_layer == 1 and list(alone.mlps) == [Component("mlp", 0)]


def test_grow_to_budget_on_causal_tracing_and_attribution(factworld):
    model, world = factworld
    people = [f for f in world.facts if f.relation_id == "P19"][:8]
    trace = causal_tracing(model, [fact_prompts(world, f)[1] for f in people], kinds=("mlp",), n_noise=2, **QUIET)
    budget = circuit_size(model, [Component("mlp", 0)]) + 5
    circuit = grow_to_budget(trace.mlp, model, n_params=budget)
    top = int(trace.mlp.values.abs().amax(1).argmax())
    assert circuit.components[0] == Component("mlp", top)
    size = circuit_size(model, circuit)
    assert size == circuit.config["selection"]["size"]
    assert 0 <= size - budget < circuit_size(model, [circuit.components[-1]])
    attribution = attribution_patching(model, fact_pairs(world, people), sites=("neuron",), per_position=False, **QUIET)
    neurons = grow_to_budget(attribution["neuron"], model, n_params=50_000)
    values = attribution["neuron"].values.abs()
    best = divmod(int(values.argmax()), values.shape[1])
    assert neurons.components[0] == Component("neuron", best[0], neuron=best[1])
    size = circuit_size(model, neurons)
    assert 0 <= size - 50_000 < circuit_size(model, [neurons.components[-1]])
    nearest = grow_to_budget(attribution["neuron"], model, n_params=50_000, rule="nearest")
    assert abs(circuit_size(model, nearest) - 50_000) <= size - 50_000


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_says_what_to_do(tiny):
    model = tiny["gpt2"]
    facts = _tiny_facts()
    with pytest.raises(ValueError, match="is empty"):
        fact_lookup(model, [], **QUIET)
    with pytest.raises(ValueError, match="has no subject"):
        fact_lookup(model, [FactPrompt(prompt="w1 w2", target="w3")], **QUIET)
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\]"):
        fact_lookup(model, facts, threshold=1.5, **QUIET)
    with pytest.raises(ValueError, match=r"head_threshold must be"):
        FactLookupConfig(head_threshold=0)
    with pytest.raises(ValueError, match="different lengths"):
        pairs = [PromptPair(clean=f.prompt, corrupt=f.prompt.replace(f.subject, "w40 w41"), answer=f.target,
                            wrong_answer="w50") for f in facts]
        fact_lookup(model, facts, pairs=pairs, probes=False, **QUIET)
    with pytest.raises(ValueError, match="clean prompt is facts"):
        fact_lookup(model, facts[:2], pairs=[PromptPair(clean="w1", corrupt="w2", answer="w3", wrong_answer="w4")] * 2,
                    **QUIET)
    with pytest.raises(ValueError, match="has no partner"):
        fact_lookup(model, [*facts[:1], FactPrompt(prompt="w1 w9 w3", subject="w9", target=facts[0].target,
                                                   relation_id="r")], **QUIET)
    with pytest.raises(ValueError, match="reaches the final token"):
        knockout_logits(model, [FactPrompt(prompt="w1 w2", subject="w2", target="w3")])


def test_budget_refuses_other_models_and_residual_scores(tiny, factworld):
    model, world = factworld
    other = tiny["gpt2"]
    facts = _tiny_facts()
    scores = fact_lookup(other, facts, n_corrupt=2, probes=False, extraction_layer=1, **QUIET)
    with pytest.raises(ModelMismatchError):
        grow_to_budget(scores.mlp_effects, model, n_params=1000)
    with pytest.raises(ModelMismatchError):
        circuit_size(model, scores.heads if len(scores.heads) else mechedit.Circuit.of(other, [Component("mlp", 0)]))
    with pytest.raises(ValueError, match="name no trainable component"):
        grow_to_budget(scores.subject_state, other, n_params=1000)
    with pytest.raises(ValueError, match="n_params must be a positive int"):
        grow_to_budget(scores.mlp_effects, other, n_params=0)
