"""Residual-stream attribute probes (``mechedit.probes``), on the fact world and tiny models."""

from __future__ import annotations

import pytest
import torch

import mechedit
from mechedit.probes import (
    attribute_probes,
    depth_labels,
    fit_probes,
    probe_positions,
    split_by_subject,
    subject_residuals,
)
from mechedit.zoo import load_world
from mechedit.zoo.prompts import fact_prompts
from mechedit.zoo.random_model import random_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def factworld():
    return mechedit.load("factworld"), load_world("factworld")


def _relation_facts(world, relation_id):
    return [fact_prompts(world, f)[0] for f in world.facts if f.relation_id == relation_id]


def test_probe_reads_answer_at_final_token_not_at_subject(factworld):
    # The fact world's final token reads the person through attention and looks the value up
    # there; nothing about the value is written at the subject's own tokens. Probes must show both.
    model, world = factworld
    facts = _relation_facts(world, "P19")
    at_final = attribute_probes(model, facts, position="last")
    at_subject = attribute_probes(model, facts, position="subject_last")
    assert at_final.depths == depth_labels(model.cfg.n_layers)
    assert at_final.test_accuracy[-1] >= 0.9 > at_final.chance + 0.5
    assert at_final.test_accuracy[0] <= at_final.chance + 0.1  # embeddings of the last prompt word
    assert at_subject.test_accuracy.max() <= at_subject.chance + 0.15
    frame = at_final.to_frame()
    assert list(frame.columns) == ["depth", "train_accuracy", "test_accuracy", "chance"]
    assert frame.test_accuracy.tolist() == pytest.approx(at_final.test_accuracy.tolist())


def test_frozen_probe_scores_new_rows(factworld):
    model, world = factworld
    facts = _relation_facts(world, "P19")
    result = attribute_probes(model, facts, position="last")
    test = split_by_subject(facts)
    feats = subject_residuals(model, [f for f, t in zip(facts, test.tolist(), strict=True) if t], position="last")
    acc = result.accuracy(feats, [f.target for f, t in zip(facts, test.tolist(), strict=True) if t])
    assert torch.allclose(acc, result.test_accuracy)


def test_split_holds_out_whole_subjects(factworld):
    _, world = factworld
    facts = [p for f in world.facts[:40] for p in fact_prompts(world, f)[:2]]
    test = split_by_subject(facts, test_fraction=0.3, seed=1)
    held = {f.subject for f, t in zip(facts, test.tolist(), strict=True) if t}
    kept = {f.subject for f, t in zip(facts, test.tolist(), strict=True) if not t}
    assert held and kept and not held & kept
    assert torch.equal(test, split_by_subject(facts, test_fraction=0.3, seed=1))


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_residuals_match_cache_on_each_architecture(tmp_path, arch):
    model = mechedit.load(random_checkpoint(tmp_path / arch, arch, n_layer=2, n_embd=64, n_head=4))
    facts = [
        mechedit.FactPrompt(prompt="w1 w2 w3 w4", subject="w2 w3", target="w5"),
        mechedit.FactPrompt(prompt="w7 w8 w9", subject="w7", target="w6"),
    ]
    feats = subject_residuals(model, facts)
    assert feats.shape == (3, 2, 64)
    pos = probe_positions(model, facts)
    for row, fact in enumerate(facts):
        _, cache = model.run_with_cache(model.to_tokens(fact.prompt))
        assert torch.allclose(feats[1, row], cache["blocks.1.hook_resid_pre"][0, pos[row]], atol=1e-5)
        assert torch.allclose(feats[2, row], cache["blocks.1.hook_resid_post"][0, pos[row]], atol=1e-5)


def test_bad_input_says_what_to_do():
    x = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="hold out some rows"):
        fit_probes(x, list("aabbcc"), torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="single label"):
        fit_probes(x, list("aaaaab"), torch.tensor([0, 0, 0, 0, 0, 1], dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 subjects"):
        split_by_subject([mechedit.FactPrompt(prompt="Ann lives in", subject="Ann", target="Rome")])
    with pytest.raises(ValueError, match="position must be"):
        probe_positions(None, [], position="first")


def test_probe_curves_draw_the_accuracies(factworld):
    from mechedit.viz import probe_curves

    model, world = factworld
    facts = _relation_facts(world, "P108")
    results = {"final": attribute_probes(model, facts, position="last"),
               "subject": attribute_probes(model, facts, position="subject_last")}
    fig = probe_curves(results)
    lines = {t.name: t for t in fig.data}
    assert list(lines["final"].y) == pytest.approx(results["final"].test_accuracy.tolist())
    assert list(lines["subject: chance"].y) == pytest.approx([results["subject"].chance] * 7)
    assert list(lines["final"].x) == list(depth_labels(model.cfg.n_layers))
    with pytest.raises(ValueError, match="no results"):
        probe_curves({})
