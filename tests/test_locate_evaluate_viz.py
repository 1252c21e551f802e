"""Gradient capture, neuron attribution, the fact-edit report and the figures, on a tiny model."""

from __future__ import annotations

import html
import re

import pytest
import torch

import mechedit
from mechedit.edit import ablate, zero_neurons
from mechedit.evaluate import EditReport, evaluate_fact_edit, fact_item_scores, fact_scores
from mechedit.gradients import activations_and_gradients
from mechedit.locate import NeuronAttributionConfig, neuron_attribution
from mechedit.metrics import target_logprob
from mechedit.prompts import FactPrompt
from mechedit.provenance import weights_hash
from mechedit.scores import Scores
from mechedit.tokens import tokenize_facts

FACTS = [FactPrompt(prompt="w1 w2 w3", target="w4"), FactPrompt(prompt="w5 w6", target="w7")]
RETAIN = [FactPrompt(prompt="w8 w9 w10", target="w11")]


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir):
    return mechedit.load(tiny_gpt2_dir)


def _mean_logprob(model, facts):
    batch = tokenize_facts(model, facts)
    with torch.no_grad():
        return target_logprob(model(batch.tokens), batch.target_ids, batch.last_positions).mean().item()


def test_captured_gradients_match_finite_differences(model):
    batch = tokenize_facts(model, FACTS[:1])
    name = "blocks.0.mlp.hook_post"

    def metric(logits):
        return target_logprob(logits, batch.target_ids, batch.last_positions).sum()

    cap = activations_and_gradients(model, batch.tokens, [name], metric)
    assert cap.activations[name].shape == (1, 4, model.cfg.d_mlp)
    # nudge the activation with the largest gradient both ways (central difference) and compare
    grad = cap.gradients[name][0]
    pos, unit = divmod(int(grad.abs().argmax()), grad.shape[1])
    eps = 1e-2

    def shifted(delta):
        def hook(act, hook):
            act = act.clone()
            act[0, pos, unit] += delta
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(name, hook)])
        return target_logprob(logits, batch.target_ids, batch.last_positions).sum().item()

    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert numeric == pytest.approx(grad[pos, unit].item(), rel=2e-2)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_capture_rejects_bad_hooks_and_frozen_models(model, tiny_gpt2_dir):
    tokens = tokenize_facts(model, FACTS[:1]).tokens
    with pytest.raises(ValueError, match="mlp.hook_post"):
        activations_and_gradients(model, tokens, ["blocks.0.mlp.hook_postt"], lambda lg: lg.sum())
    # frozen parameters are fine: only activations are differentiated (tests/test_gradients.py)
    frozen = mechedit.load(tiny_gpt2_dir).requires_grad_(False)
    cap = activations_and_gradients(frozen, tokens, ["blocks.0.mlp.hook_post"], lambda lg: lg.sum())
    assert cap.gradients["blocks.0.mlp.hook_post"].abs().sum() > 0
    model.train()
    try:
        with pytest.raises(RuntimeError, match=r"neuron_attribution needs the model in evaluation mode.*model\.eval\(\)"):
            neuron_attribution(model, FACTS, progress=False)
    finally:
        model.eval()


def test_neuron_attribution_predicts_the_exact_ablation_effect(model):
    scores = neuron_attribution(model, FACTS, config=NeuronAttributionConfig(retain_weight=0), progress=False)
    assert scores.axes == ("layer", "neuron") and scores.site == "neuron"
    assert scores.provenance.weights_hash == weights_hash(model)
    base = _mean_logprob(model, FACTS)
    top = list(scores.top_k(5))
    bottom = list(scores.top_k(5, largest=False))
    for comp in top + bottom:
        with ablate(model, [comp]):
            exact = base - _mean_logprob(model, FACTS)
        predicted = scores.values[comp.layer, comp.neuron].item()
        assert predicted == pytest.approx(exact, rel=0.25, abs=2e-4), comp
    # the top-5 together really lower the target more than the bottom-5 together
    with ablate(model, top):
        drop_top = base - _mean_logprob(model, FACTS)
    with ablate(model, bottom):
        drop_bottom = base - _mean_logprob(model, FACTS)
    assert drop_top > 0 > drop_bottom


def test_retain_set_is_subtracted(model):
    only = neuron_attribution(model, FACTS, config=NeuronAttributionConfig(retain_weight=0), progress=False)
    retain_only = neuron_attribution(model, RETAIN, config=NeuronAttributionConfig(retain_weight=0), progress=False)
    both = neuron_attribution(model, FACTS, RETAIN, config=NeuronAttributionConfig(retain_weight=0.5), progress=False)
    assert torch.allclose(both.values, only.values - 0.5 * retain_only.values, atol=1e-6)
    with pytest.raises(ValueError, match="forget is empty"):
        neuron_attribution(model, [], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        neuron_attribution(model, FACTS, config=NeuronAttributionConfig(layers=(5,)), progress=False)


def test_fact_report_is_the_same_for_weight_and_activation_edits(model, tmp_path):
    neurons = [(0, 3), (1, 17), (1, 40)]
    before_hash = weights_hash(model)
    with torch.no_grad():
        before_logits = model(tokenize_facts(model, FACTS).tokens)
    kwargs = dict(edited=FACTS, neighbours=RETAIN, fluency_texts=["w1 w2 w3 w4", "w9 w8 w7"])
    from mechedit.components import Component

    by_hook = evaluate_fact_edit(model, edit=ablate(model, [Component("neuron", layer, neuron=j) for layer, j in neurons]), **kwargs)
    by_weights = evaluate_fact_edit(model, edit=zero_neurons(model, neurons), **kwargs)
    a, b = by_hook.to_frame(), by_weights.to_frame()
    assert list(a["suite"]) == list(b["suite"]) and list(a["metric"]) == list(b["metric"])
    assert torch.allclose(torch.tensor(a["after"].values), torch.tensor(b["after"].values), atol=1e-5)
    assert (a["after"] != a["before"]).any()
    # the model is left exactly as it was
    assert weights_hash(model) == before_hash
    with torch.no_grad():
        assert torch.equal(model(tokenize_facts(model, FACTS).tokens), before_logits)
    # the before column is the unedited model's own scores, and per-item scores are the exact probabilities
    assert by_hook.get("efficacy", "p_target").before == pytest.approx(fact_scores(model, FACTS)["p_target"])
    items = fact_item_scores(model, FACTS)
    batch = tokenize_facts(model, FACTS)
    with torch.no_grad():
        expected = target_logprob(model(batch.tokens), batch.target_ids, batch.last_positions).exp()
    assert torch.allclose(items["p_target"], expected)
    assert items["p_target"].mean().item() == pytest.approx(fact_scores(model, FACTS)["p_target"])
    path = by_hook.save(tmp_path / "report.json")
    again = EditReport.load(path)
    assert again.rows == by_hook.rows
    path.write_text(path.read_text().replace('"version": 2', '"version": 7'))
    with pytest.raises(ValueError, match="unsupported version"):
        EditReport.load(path)


def test_heatmap_and_report_are_standalone(tmp_path):
    from mechedit.viz import before_after, heatmap, write_report

    values = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    scores = Scores(values, ("layer", "pos"), "resid_pre", "hand", labels={"pos": ("<bos>", "w1", "w2", "w1")})
    fig = heatmap(scores)
    trace = fig.data[0]
    assert trace.z.shape == (3, 4)
    assert list(trace.x) == ["0: <bos>", "1: w1", "2: w2", "3: w1"]
    assert "layer" in trace.hovertemplate
    # axes given the other way round transpose the picture
    assert heatmap(scores, y="pos", x="layer").data[0].z.shape == (4, 3)
    import pandas as pd

    table = pd.DataFrame({"suite": ["efficacy"], "metric": ["accuracy"], "before": [1.0], "after": [0.0]})
    bars = before_after(table)
    assert [t.name for t in bars.data] == ["before", "after"]
    path = write_report(tmp_path / "r" / "report.html", [("Scores", [fig, table, "some text"]), ("Bars", [bars])], title="t",
                        provenance={"model": "tiny-gpt2", "config": {"k": 3}})
    text = path.read_text()
    assert text.count("<h2>") == 3 and "<h2>Provenance</h2>" in text
    from importlib.metadata import version
    shown = html.unescape(text)
    for expected in ("tiny-gpt2", '{"k": 3}', version("torch"), version("transformer-lens"), version("transformers")):
        assert expected in shown, expected
    assert not re.search(r"<script[^>]+src=[\"']https?://", text), "the report must not load scripts from the network"
    assert len(text) > 1_000_000  # plotly.js is inline
    assert text.count("Plotly.newPlot") == 2


def test_heatmap_marks_exactly_the_selected_neurons(model):
    from mechedit.components import Component
    from mechedit.viz import heatmap

    scores = neuron_attribution(model, FACTS, config=NeuronAttributionConfig(retain_weight=0), progress=False)
    chosen = scores.top_k(7)
    fig = heatmap(scores, mark=chosen)
    marks = next(t for t in fig.data if t.name == "selected")
    cells = {(int(y), int(x)) for x, y in zip(marks.x, marks.y, strict=True)}
    assert cells == {(c.layer, c.neuron) for c in chosen} and len(cells) == 7
    heat = fig.data[0]
    for layer, neuron in cells:  # the marked cells hold the selected (largest) scores
        assert heat.z[layer][neuron] == pytest.approx(float(scores.values[layer, neuron]))
    assert min(heat.z[layer][neuron] for layer, neuron in cells) >= float(scores.values.flatten().sort().values[-7])
    with pytest.raises(ValueError, match="has no neuron"):
        heatmap(scores, mark=[Component("mlp", 0)])
    with pytest.raises(ValueError, match="outside the axis"):
        heatmap(scores, mark=[Component("neuron", 1, neuron=scores.values.shape[1])])
