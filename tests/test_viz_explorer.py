"""The neuron explorer on the fact world: a neuron's detail reads the model, its per-prompt
attribution aggregates to the locator's score, and the widget redraws what it located."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mechedit
from mechedit import zoo
from mechedit.components import Component
from mechedit.unembedding import promoted_tokens
from mechedit.viz import (
    fact_prompt_set,
    locate_neurons,
    neuron_detail,
    neuron_explorer,
    text_prompt_set,
)
from mechedit.viz.explorer import PromptSet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return mechedit.load("factworld")


@pytest.fixture(scope="module")
def world():
    return zoo.load_world("factworld")


@pytest.fixture(scope="module")
def prompts(world):
    return fact_prompt_set(world, world.people[3].name, "sport", n_neighbours=4)


@pytest.fixture(scope="module")
def attribution(model, prompts):
    return locate_neurons(model, prompts, "neuron_attribution")


def test_prompt_set_is_the_fact_its_paraphrases_and_neighbours(world, prompts):
    person = world.people[3]
    value = person.facts["P641"]
    assert prompts.groups.count("fact") == len(world.relation["P641"].train_templates)
    assert prompts.groups.count("paraphrase") == len(world.relation["P641"].heldout_templates)
    assert prompts.groups.count("neighbour") == 4
    assert all(p.target == value for p in prompts.prompts)
    assert {p.subject for p in prompts.of("fact") + prompts.of("paraphrase")} == {person.name}
    assert person.name not in {p.subject for p in prompts.of("neighbour")}
    assert fact_prompt_set(world, person.name, "P641").prompts[:3] == prompts.prompts[:3]  # id or name
    # a planted person has one fact; joined sets keep every prompt and its group
    planted = world.planted[0]
    (rid, value), = planted.facts.items()
    one = fact_prompt_set(world, planted.name, rid, n_neighbours=2)
    assert one.of("fact")[0].target == value and one.of("fact")[0].subject == planted.name
    joined = PromptSet.join([prompts, one], title="both")
    assert joined.prompts == prompts.prompts + one.prompts and joined.groups == prompts.groups + one.groups
    other = next(r.id for r in world.relations if r.id != rid)
    with pytest.raises(ValueError, match=f"{planted.name} has no .* fact"):
        fact_prompt_set(world, planted.name, other)


def test_detail_reads_the_neurons_activation_and_promoted_tokens_from_the_model(model, prompts, attribution):
    top = attribution.top_k(1).components[0]
    detail = neuron_detail(model, prompts, top)
    name = f"blocks.{top.layer}.mlp.hook_post"
    for i, fact in enumerate(prompts.prompts):
        logits, cache = model.run_with_cache(fact.prompt, names_filter=[name])
        acts = cache[name][0, :, top.neuron]
        assert detail.frame.at[i, "activation"] == pytest.approx(acts[-1].item(), abs=1e-5)
        subject_last = mechedit.tokens.subject_token_positions(model, fact)[-1]
        assert detail.frame.at[i, "subject_activation"] == pytest.approx(acts[subject_last].item(), abs=1e-5)
        target = mechedit.tokens.answer_id(model, fact.prompt, fact.target)
        assert detail.frame.at[i, "p_target"] == pytest.approx(logits[0, -1].softmax(-1)[target].item(), abs=1e-5)
    assert detail.promoted == promoted_tokens(model, [top], k=8)[top]
    assert detail.frame["group"].tolist() == list(prompts.groups)


def test_neuron_attribution_per_prompt_aggregates_to_the_locators_score(model, prompts, attribution):
    for component in attribution.top_k(3, by="abs").components:
        detail = neuron_detail(model, prompts, component)
        by_group = detail.frame.groupby("group")["attribution"].mean()
        expected = attribution.values[component.layer, component.neuron].item()
        assert by_group["fact"] - by_group["neighbour"] == pytest.approx(expected, abs=1e-6)
        assert detail.score == pytest.approx(expected, abs=1e-6)
        assert detail.unit == "nats"
    # the subject variant sums over the subject's tokens only: a different ranking, still exact
    subject = locate_neurons(model, prompts, "neuron_attribution_subject")
    component = subject.top_k(1).components[0]
    detail = neuron_detail(model, prompts, component, method="neuron_attribution_subject")
    assert detail.score == pytest.approx(subject.values[component.layer, component.neuron].item(), abs=1e-6)
    assert not torch.equal(subject.values, attribution.values)


def test_knowledge_neurons_per_prompt_averages_to_the_locators_score(model, prompts):
    small = PromptSet(prompts.of("fact")[:2] + prompts.of("neighbour")[:1], ("fact", "fact", "neighbour"), "small")
    scores = locate_neurons(model, small, "knowledge_neurons", site="pre", steps=3)
    assert scores.site == "neuron_pre"
    component = scores.top_k(1).components[0]
    detail = neuron_detail(model, small, component, method="knowledge_neurons", steps=3)
    assert detail.component.site == "neuron_pre" and detail.unit == "probability"
    facts = detail.frame[detail.frame["group"] == "fact"]["attribution"]
    assert facts.mean() == pytest.approx(scores.values[component.layer, component.neuron].item(), rel=1e-4)
    assert detail.score == pytest.approx(facts.mean())
    figure = detail.figure()
    bars = [t for t in figure.data if t.type == "bar" and t.yaxis == "y2"]
    assert [v for t in bars for v in t.y] == pytest.approx(detail.frame["attribution"].tolist())


def test_widget_locates_redraws_and_shows_a_neuron(model, world, prompts, attribution):
    explorer = neuron_explorer(model, world, person=world.people[3].name, relation="sport", n_neighbours=4, steps=2, k=5)
    explorer.locate_button.click()
    assert explorer.status.value == ""
    assert torch.equal(explorer.scores.values, attribution.values)
    heat = explorer.figure.data[0]
    assert torch.equal(torch.as_tensor(heat.z), attribution.values)
    marked = explorer.figure.data[1]
    top = attribution.top_k(5, by="abs").components
    assert [(int(y), int(x)) for x, y in zip(marked.x, marked.y)] == [(c.layer, c.neuron) for c in top]
    assert explorer.detail.component == top[0]

    explorer.method.value = "knowledge_neurons"
    assert list(explorer.site.options) == ["post", "pre"]
    explorer.site.value = "pre"
    explorer.locate_button.click()
    assert explorer.status.value == ""
    assert explorer.scores.method == "knowledge_neurons" and explorer.scores.site == "neuron_pre"
    assert torch.equal(torch.as_tensor(explorer.figure.data[0].z), explorer.scores.values)
    assert not torch.equal(explorer.scores.values, attribution.values)

    # a click on the heatmap (plotly's FigureWidget callback) picks that layer and neuron
    explorer._on_heatmap_click(None, SimpleNamespace(xs=["17"], ys=["4"]), None)
    assert explorer.detail.component == Component("neuron_pre", 4, neuron=17)

    # the free prompt replaces the fact; a missing target is reported in the panel, not raised
    explorer.prompt.value = world.relation["P641"].train_templates[0].format(world.people[3].name)
    explorer.locate_button.click()
    assert "target" in explorer.status.value
    assert explorer.scores.method == "knowledge_neurons"  # unchanged by the failed run


def test_bad_input_is_refused_with_what_to_do(model, world, prompts):
    with pytest.raises(ValueError, match="unknown person"):
        fact_prompt_set(world, "nobody here", "sport")
    with pytest.raises(ValueError, match="unknown relation.*P641 \\(sport\\)"):
        fact_prompt_set(world, world.people[0].name, "favourite colour")
    with pytest.raises(ValueError, match="unknown method.*knowledge_neurons"):
        locate_neurons(model, prompts, "causal_tracing")
    with pytest.raises(ValueError, match="scores sites \\('post',\\), not 'pre'"):
        locate_neurons(model, prompts, "neuron_attribution", site="pre")
    with pytest.raises(ValueError, match="layer 6 out of range: the model has 6 layers"):
        neuron_detail(model, prompts, (6, 0))
    with pytest.raises(ValueError, match="neuron 512 out of range: each MLP has 512 neurons"):
        neuron_detail(model, prompts, (0, 512))
    with pytest.raises(ValueError, match="needs an MLP neuron"):
        neuron_detail(model, prompts, Component("mlp_out", 1))
    with pytest.raises(ValueError, match="give the target"):
        text_prompt_set("kasim plays the sport of", " ")
    with pytest.raises(ValueError, match="unknown methods"):
        neuron_explorer(model, world, methods=("neuron_attribution", "rome"))
    explorer = neuron_explorer(model)  # no world: free prompt only
    with pytest.raises(ValueError, match="no world given"):
        explorer.locate()
    with pytest.raises(ValueError, match="locate first"):
        explorer.show_neuron()
