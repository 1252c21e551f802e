"""Edit-effect tables and figures on the fact world: top predictions, predicted vs observed, the k
sweep against random neurons, exposure before/after."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest
import torch

import mechedit
from mechedit import zoo
from mechedit.components import Component
from mechedit.edit import ablate
from mechedit.evaluate import (
    ExposureResult,
    fact_item_scores,
    k_sweep,
    predicted_vs_observed,
    top_predictions,
)
from mechedit.locate import neuron_attribution
from mechedit.scores import Scores
from mechedit.viz import effect_scatter, exposure_strip, k_sweep_lines
from mechedit.zoo.prompts import fact_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world_case():
    """The demo's setting, smaller: one known birthplace, 4 neighbours to keep, 3 held out."""
    model = mechedit.load("factworld")
    world = zoo.load_world("factworld")
    fact = next(f for f in world.facts if f.relation_id == "P19" and f.subject == "brisa wexley")
    neighbours = world.neighbours(fact)
    random.Random(0).shuffle(neighbours)
    forget = fact_prompts(world, fact)
    retain = [p for f in neighbours[:4] for p in fact_prompts(world, f)]
    held = [p for f in neighbours[4:7] for p in fact_prompts(world, f)]
    scores = neuron_attribution(model, forget, retain, progress=False)
    return model, forget, retain, held, scores


def _logprob(model, facts):
    return fact_item_scores(model, facts)["p_target"].log().double().cpu()


def test_observed_effect_equals_zeroing_the_neuron_directly(world_case):
    model, forget, retain, _, scores = world_case
    frame = predicted_vs_observed(model, scores, forget, retain, k=2, n_random=1, seed=3)
    assert list(frame["group"]) == ["selected", "selected", "random", "all selected"]
    top = scores.top_k(2)
    assert [(r.layer, r.neuron) for r in frame.iloc[:2].itertuples()] == [(c.layer, c.neuron) for c in top]
    lp_forget, lp_retain = _logprob(model, forget), _logprob(model, retain)
    weight = scores.config["retain_weight"]
    for row in frame.iloc[:3].itertuples():
        assert row.predicted == pytest.approx(float(scores.values[row.layer, row.neuron]))
        # the direct computation: the library's reversible zero edit of that one neuron
        with ablate(model, [Component("neuron", row.layer, neuron=row.neuron)]):
            drop_f = (lp_forget - _logprob(model, forget)).mean().item()
            drop_r = (lp_retain - _logprob(model, retain)).mean().item()
        assert row.observed_forget == pytest.approx(drop_f, abs=2e-5)
        assert row.observed_retain == pytest.approx(drop_r, abs=2e-5)
        assert row.observed == pytest.approx(drop_f - weight * drop_r, abs=3e-5)
    joint = frame.iloc[3]
    with ablate(model, top):
        drop_f = (lp_forget - _logprob(model, forget)).mean().item()
    assert joint["observed_forget"] == pytest.approx(drop_f, abs=2e-5)
    assert joint["predicted"] == pytest.approx(frame["predicted"].iloc[:2].sum())
    # the model is left as it was
    assert torch.allclose(_logprob(model, forget), lp_forget)


def test_top_k_zeroing_removes_the_fact_and_random_k_does_not(world_case):
    model, forget, _, held, scores = world_case
    sweep = k_sweep(model, scores, forget, held, ks=(4, 24), n_seeds=3, seed=0)
    at = sweep.set_index(["selection", "k", "suite"])
    base = at.loc[("none", 0, "forget"), "p_target"]
    top24 = at.loc[("top-k", 24, "forget"), "p_target"]
    random24 = sweep[(sweep["selection"] == "random") & (sweep["k"] == 24) & (sweep["suite"] == "forget")]
    assert base > 0.95 and top24 < 0.3
    assert len(random24) == 3 and (random24["p_target"] > 0.9).all()  # any 24 neurons: the fact stays
    assert at.loc[("top-k", 24, "forget"), "accuracy"] < at.loc[("none", 0, "forget"), "accuracy"]
    # neighbours keep their answer under the selected 24
    assert at.loc[("top-k", 24, "neighbours"), "accuracy"] >= 0.9
    # the sweep's top-24 is the edit: the same probability as the reversible activation edit
    with ablate(model, scores.top_k(24)):
        assert top24 == pytest.approx(fact_item_scores(model, forget)["p_target"].mean().item(), abs=1e-5)
    fig = k_sweep_lines(sweep)
    traces = {t.name: t for t in fig.data}
    assert list(traces["forget: top-k"].x) == [4, 24]
    assert list(traces["forget: top-k"].y) == pytest.approx([at.loc[("top-k", k, "forget"), "p_target"] for k in (4, 24)])
    assert traces["forget: random k"].y[1] == pytest.approx(random24["p_target"].mean())
    assert list(traces["forget: unedited"].y) == pytest.approx([base, base])
    assert fig.layout.xaxis.type == "log"


def test_top_predictions_show_what_the_edited_model_says(world_case):
    model, forget, _, held, scores = world_case
    circuit = scores.top_k(24)
    frame = top_predictions(model, forget + held[:2], n=3, edit=ablate(model, circuit))
    assert len(frame) == 3 * (len(forget) + 2)
    assert list(frame.columns) == ["prompt", "target", "rank", "token_before", "p_before", "token_after", "p_after"]
    first = frame[frame["rank"] == 1]
    assert (first["token_before"].str.strip() == first["target"]).all()  # known before
    gone = first.iloc[: len(forget)]
    assert (gone["token_after"].str.strip() != gone["target"]).mean() >= 0.8  # forgotten after
    kept = first.iloc[len(forget) :]
    assert (kept["token_after"].str.strip() == kept["target"]).all()  # neighbours keep theirs
    # probabilities are sorted within a prompt and agree with the scorer's p of the target
    for _, part in frame.groupby("prompt", sort=False):
        assert list(part["p_before"]) == sorted(part["p_before"], reverse=True)
    p_target = fact_item_scores(model, forget)["p_target"].cpu()
    assert list(first["p_before"].iloc[: len(forget)]) == pytest.approx(p_target.tolist(), abs=1e-5)
    plain = top_predictions(model, [p.prompt for p in forget[:2]], n=2)
    assert list(plain.columns) == ["prompt", "target", "rank", "token_before", "p_before"]
    assert (plain["target"] == "").all()


def test_effect_scatter_reads_back_the_table(world_case):
    model, forget, retain, _, scores = world_case
    frame = predicted_vs_observed(model, scores, forget, retain, k=24, n_random=4, seed=0)
    fig = effect_scatter(frame)
    traces = {t.name: t for t in fig.data}
    selected = frame[frame["group"] == "selected"]
    assert list(traces["selected (24)"].x) == pytest.approx(list(selected["predicted"]))
    assert list(traces["selected (24)"].y) == pytest.approx(list(selected["observed"]))
    assert len(traces["random (4)"].x) == 4
    bars = next(t for t in fig.data if t.type == "bar")
    joint = frame[frame["group"] == "all selected"].iloc[0]
    assert list(bars.y) == pytest.approx([joint["predicted"], joint["observed"]])
    line = traces["y = x (prediction exact)"]
    assert list(line.x) == list(line.y)
    assert "nats" in fig.layout.xaxis.title.text and "nats" in fig.layout.yaxis.title.text
    # the attribution is additive, the model is not: all 24 zeroed cost far more than the sum
    # of their predictions (the demo's report states this ratio)
    assert joint["observed"] > 10 * joint["predicted"] > 0


def test_exposure_strip_reads_back_and_marks_the_maximum():
    space = torch.full((4,), 3 * math.log2(10), dtype=torch.float64)
    before = ExposureResult(torch.tensor([9.0, 8.5, math.nan, 2.0], dtype=torch.float64), torch.ones(4, dtype=torch.float64), space, "lexicographic")
    after = ExposureResult(torch.tensor([1.0, 0.5, math.nan, 2.0], dtype=torch.float64), torch.ones(4, dtype=torch.float64), space, "lexicographic")
    fig = exposure_strip(before, after)
    traces = {t.name: t for t in fig.data}
    assert list(traces["before"].y) == [9.0, 8.5, 2.0] and list(traces["before"].customdata) == [0, 1, 3]
    assert list(traces["after"].y) == [1.0, 0.5, 2.0]
    (top,) = [t for t in fig.data if t.name.startswith("maximum")]
    assert list(top.y) == pytest.approx([3 * math.log2(10)] * 2)
    # plain per-secret columns (a run folder's privacy report) draw without the maximum
    plain = exposure_strip([9.0, None], [1.0, None])
    assert [t.name for t in plain.data] == ["before", "after"]


def test_run_report_privacy_section_draws_exposure():
    from mechedit.viz.run_report import _privacy_suite

    data = {"metrics": {"exposure": {"before": 6.0, "after": 1.0}}, "n_secrets": 2, "flips": 1,
            "per_secret": [{"secret": "1 2 3", "exposure_before": 9.0, "exposure_after": 1.5},
                           {"secret": "4 5 6", "exposure_before": 3.0, "exposure_after": 0.5}]}
    figures = [b for b in _privacy_suite(data) if hasattr(b, "data") and b.data[0].type == "box"]
    assert len(figures) == 1 and list(figures[0].data[0].y) == [9.0, 3.0]
    data["per_secret"] = [{"secret": "w1", "exposure_before": None, "exposure_after": None}]
    assert not [b for b in _privacy_suite(data) if hasattr(b, "data") and b.data[0].type == "box"]


def test_bad_input_raises_clear_errors(world_case):
    model, forget, retain, held, scores = world_case
    n = model.cfg.n_layers * model.cfg.d_mlp
    with pytest.raises(ValueError, match=f"k must be an int in 1..{n}"):
        k_sweep(model, scores, forget, held, ks=(4, n + 1))
    with pytest.raises(ValueError, match="k must be an int in 1"):
        predicted_vs_observed(model, scores, forget, retain, k=n + 1)
    with pytest.raises(ValueError, match="forget is empty"):
        predicted_vs_observed(model, scores, [], retain)
    with pytest.raises(ValueError, match="forget is empty"):
        k_sweep(model, scores, [], held)
    with pytest.raises(ValueError, match="no prompts"):
        top_predictions(model, [])
    with pytest.raises(ValueError, match="ks is empty"):
        k_sweep(model, scores, forget, held, ks=())
    with pytest.raises(ValueError, match="n must be"):
        top_predictions(model, forget, n=0)
    per_layer = Scores(scores.values.mean(1), ("layer",), "mlp_out", "test")
    with pytest.raises(ValueError, match="axes"):
        k_sweep(model, per_layer, forget, held)
    space = torch.full((2,), 6.0, dtype=torch.float64)
    a = ExposureResult(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64), space, "lexicographic")
    b = ExposureResult(torch.tensor([1.0], dtype=torch.float64), torch.ones(1, dtype=torch.float64), space[:1], "lexicographic")
    with pytest.raises(ValueError, match="same secrets"):
        exposure_strip(a, b)
    c = ExposureResult(a.exposure, a.rank, space * 2, "lexicographic")
    with pytest.raises(ValueError, match="candidate spaces"):
        exposure_strip(a, c)
    with pytest.raises(ValueError, match="lacks columns"):
        effect_scatter(pd.DataFrame({"group": ["selected"]}))
    with pytest.raises(ValueError, match="no 'top-k' rows"):
        k_sweep_lines(pd.DataFrame({"selection": ["none"], "k": [0], "seed": [-1], "suite": ["forget"], "p_target": [1.0]}))
