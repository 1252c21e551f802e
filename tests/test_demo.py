"""The main job on the fact world: the chosen fact is forgotten, the rest stays, the files are real."""

from __future__ import annotations

import json

import pytest
import torch

import mechedit
from mechedit.circuit import Circuit
from mechedit.demo import DemoConfig, run_demo, summary_table
from mechedit.edit import WeightEdit
from mechedit.evaluate import EditReport
from mechedit.scores import Scores


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(DemoConfig(out_dir=str(out)), progress=False)


def test_demo_forgets_the_fact_and_keeps_the_rest(demo):
    r = demo.report
    assert r.get("efficacy", "accuracy").before == 1.0
    assert r.get("efficacy", "accuracy").after <= 0.2
    assert r.get("efficacy", "p_target").after < 0.5 * r.get("efficacy", "p_target").before
    assert r.get("generalisation", "accuracy").after <= 0.5  # held-out paraphrases forget too
    spec = r.get("specificity", "accuracy")
    assert spec.n >= 20
    assert spec.after >= spec.before - 0.05  # unseen neighbours within a few points
    ppl = r.get("fluency", "perplexity")
    assert ppl.after <= ppl.before * 1.05


def test_demo_writes_a_complete_run_folder(demo):
    paths = demo.paths
    circuit = Circuit.load(paths["circuit"])
    assert len(circuit) == demo.config.k and circuit.sites == ("neuron",)
    assert [(c.layer, c.neuron) for c in circuit] == [(c.layer, c.neuron) for c in demo.circuit]
    scores = Scores.load(paths["scores"])
    assert torch.equal(scores.values.nan_to_num(), demo.scores.values.nan_to_num())
    assert EditReport.load(paths["report_json"]).rows == demo.report.rows
    params = json.loads(paths["params"].read_text())
    assert params["fact"]["subject"] == demo.fact.subject
    html = paths["report_html"].read_text()
    assert demo.fact.subject in html and "Plotly.newPlot" in html
    table = summary_table(demo)
    assert "efficacy" in table and "specificity" in table


def test_saved_weight_edit_reproduces_the_activation_edit(demo):
    model = mechedit.load("factworld")
    edit = WeightEdit.load(demo.paths["weight_edit"])
    from mechedit.evaluate import fact_scores
    from mechedit.zoo import load_world
    from mechedit.zoo.prompts import fact_prompts

    prompts = fact_prompts(load_world("factworld"), demo.fact)
    with edit.applied(model):
        after = fact_scores(model, prompts)
    assert after["accuracy"] == pytest.approx(demo.report.get("efficacy", "accuracy").after)
    assert after["p_target"] == pytest.approx(demo.report.get("efficacy", "p_target").after, abs=1e-5)


def test_demo_command_line_prints_the_table_and_the_report(tmp_path, capsys):
    from mechedit.cli import main

    assert main(["demo", "--out", str(tmp_path / "run"), "--k", "8", "--relation", "P19"]) == 0
    out = capsys.readouterr().out
    assert "efficacy" in out and "specificity" in out and "report:" in out
    assert (tmp_path / "run" / "report.html").is_file()


def test_demo_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown relation"):
        run_demo(DemoConfig(relation_id="P999", out_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="no person"):
        run_demo(DemoConfig(subject="nobody here", out_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="k must be"):
        DemoConfig(k=0)


def test_per_relation_breakdown_explains_the_suite_numbers(demo):
    """The "same subject, other relations" row is the mean over its items; per relation, each
    relation's items agree with it, and the report page shows the breakdown and the marked neurons."""
    from mechedit.viz import relation_bars

    report = demo.report
    per = report.by_relation("accuracy").set_index(["suite", "relation_id"])
    others = per.loc["same_subject_other_relations"]
    assert demo.fact.relation_id not in others.index and len(others) >= 3
    row = report.get("same_subject_other_relations", "accuracy")
    # the suite's number is the item-weighted mean of its relations' numbers
    assert (others["after"] * others["n"]).sum() / others["n"].sum() == pytest.approx(row.after)
    assert (others["before"] * others["n"]).sum() / others["n"].sum() == pytest.approx(row.before)
    assert per.loc[("efficacy", demo.fact.relation_id), "after"] == pytest.approx(report.get("efficacy", "accuracy").after)
    fig = relation_bars(report)
    assert [t.name for t in fig.data] == ["before", "after"] and len(fig.data[0].x) == len(per)
    html = demo.paths["report_html"].read_text()
    assert "per suite and relation" in html and '"name":"selected"' in html.replace(" ", "")
    with pytest.raises(KeyError, match="per-item metrics"):
        report.by_relation("no_such_metric")


def test_demo_measures_and_reports_the_edit_effects(demo):
    """Top predictions, predicted vs observed and the k sweep: consistent with the edit's report,
    saved beside it and shown (with what they mean) on the page."""
    import pandas as pd

    effects = demo.effects
    k = demo.config.k
    sweep = effects.k_sweep.set_index(["selection", "k", "suite"])
    # the sweep's top-k zeroing is the demo's edit, measured by another code path
    assert sweep.loc[("top-k", k, "forget"), "p_target"] == pytest.approx(demo.report.get("efficacy", "p_target").after, abs=1e-5)
    random_k = effects.k_sweep.query("selection == 'random' and k == @k and suite == 'forget'")["p_target"]
    assert len(random_k) == demo.config.n_seeds and random_k.min() > 0.9 > 0.2 > sweep.loc[("top-k", k, "forget"), "p_target"]
    pvo = effects.predicted_vs_observed
    assert (pvo["group"] == "selected").sum() == k and (pvo["group"] == "random").sum() == 12
    joint = pvo[pvo["group"] == "all selected"].iloc[0]
    assert joint["observed"] > 10 * joint["predicted"] > 0  # far from additive
    top = effects.top_predictions
    forgotten = top[(top["rank"] == 1) & (top["target"] == demo.fact.value) & top["prompt"].str.contains(demo.fact.subject)]
    assert len(forgotten) >= 7 and (forgotten["token_before"].str.strip() == demo.fact.value).all()
    assert (forgotten["token_after"].str.strip() != demo.fact.value).all()
    for name in ("top_predictions", "predicted_vs_observed", "k_sweep"):
        saved = pd.read_csv(demo.paths[name], keep_default_na=False)
        assert saved.shape == getattr(effects, name).shape
    html = demo.paths["report_html"].read_text()
    assert "Predicted vs observed" in html and "k sweep with a random control" in html
    assert f"with {k} random neurons zeroed" in html and "x the sum" in html
    assert html.count('class="plotly-graph-div"') == 5  # heatmap, before/after, per relation, scatter, sweep


def test_demo_report_renders_offline_in_chromium_with_relations_and_controls(demo, chromium, tmp_path):
    """The demo's own page in a real browser: every figure drawn, the per-relation view and the
    random control on it, no console error."""
    from conftest import open_offline, screenshot

    page, errors = open_offline(chromium, demo.paths["report_html"])
    plots = page.locator(".js-plotly-plot")
    assert plots.count() == 5
    for i in range(5):
        assert plots.nth(i).locator(".main-svg").count() >= 1
    text = page.locator("body").inner_text()
    assert "Per relation" in text and "random" in text
    # the heatmap outlines the circuit: one open square per selected neuron
    assert plots.first.locator(".scatterlayer .point").count() == len(demo.circuit)
    screenshot(page, "demo_report.png", tmp_path)
    assert not errors, errors
    page.context.close()
