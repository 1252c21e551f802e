"""A report opened in a real headless Chromium: no console errors, every figure drawn, the
heatmap's hover works and the selected neurons are on it.

Driven by playwright with Debian's ``chromium`` (``.ci/run`` installs it when missing); skipped,
with the reason, only where neither is available. Screenshots go to ``$MECHEDIT_SCREENSHOTS``
(default: the test's temporary folder), outside git.
"""

from __future__ import annotations

import pandas as pd
from conftest import open_offline, screenshot

import mechedit
from mechedit.locate import NeuronAttributionConfig, neuron_attribution
from mechedit.prompts import FactPrompt
from mechedit.unembedding import promoted_tokens
from mechedit.viz import before_after, heatmap, write_report

FACTS = [FactPrompt(prompt="w1 w2 w3", target="w4"), FactPrompt(prompt="w5 w6", target="w7")]


def test_report_renders_offline_in_chromium_with_hover_and_marks(chromium, tmp_path, tiny_gpt2_dir):
    model = mechedit.load(tiny_gpt2_dir)
    scores = neuron_attribution(model, FACTS, config=NeuronAttributionConfig(retain_weight=0), progress=False)
    chosen = list(scores.top_k(5))
    notes = {c: "promotes " + " ".join(t) for c, t in promoted_tokens(model, chosen, k=3).items()}
    table = pd.DataFrame({"suite": ["efficacy", "neighbours"], "metric": ["accuracy"] * 2, "before": [1.0, 1.0], "after": [0.0, 0.9]})
    path = write_report(
        tmp_path / "report.html",
        [("Where", [heatmap(scores, mark=chosen, notes=notes)]), ("Effect", [before_after(table), table])],
        title="browser check",
    )
    page, errors = open_offline(chromium, path)
    assert page.locator(".js-plotly-plot").count() == 2
    assert page.locator(".js-plotly-plot .main-svg").count() >= 2  # plotly drew an SVG for each
    # the selected neurons: one open square each, on the heatmap
    assert page.locator(".js-plotly-plot").first.locator(".scatterlayer .point").count() == len(chosen)
    # hover a heatmap cell: plotly's hover label names the layer, the neuron and the score
    grid = page.locator(".js-plotly-plot").first.locator(".nsewdrag").first.bounding_box()
    page.mouse.move(grid["x"] + grid["width"] * 0.5, grid["y"] + grid["height"] * 0.25)
    page.wait_for_selector(".hoverlayer .hovertext", timeout=5000)
    hover = page.locator(".hoverlayer .hovertext").first.text_content()
    assert "layer" in hover and "neuron" in hover and "score" in hover, hover
    screenshot(page, "report_heatmap_hover.png", tmp_path)
    assert not errors, errors
    page.context.close()


def test_a_7b_sized_neuron_map_renders_hovers_and_keeps_its_marks(chromium, tmp_path):
    """32 x 11,008 neurons (Llama-2-7B's MLPs): shown in bins of 3 adjacent neurons (the one of largest
    |score| each), so the page stays small and responsive; a marked neuron is still on its bin and
    the hover names the neuron the bin shows."""
    import torch

    from mechedit.components import Component
    from mechedit.scores import Scores

    values = torch.randn(32, 11_008, generator=torch.Generator().manual_seed(0)) * 0.01
    planted = [Component("neuron", 3, neuron=5_000), Component("neuron", 30, neuron=11_007)]
    for c in planted:
        values[c.layer, c.neuron] = 1.0  # the largest |score| of its bin, so its bin shows it
    scores = Scores(values, ("layer", "neuron"), site="neuron", method="synthetic")
    figure = heatmap(scores, mark=planted)
    z = figure.data[0].z
    assert z.shape == (32, 3_670)  # ceil(11,008 / 3) bins
    assert z[3, 5_000 // 3] == 1.0 and z[30, 11_007 // 3] == 1.0
    path = write_report(tmp_path / "big.html", [("Where", [figure])], title="7B-sized map")
    assert path.stat().st_size < 12_000_000  # plotly.js (~4.6 MB) + the binned map, not 32 x 11,008 cells
    page, errors = open_offline(chromium, path)
    assert page.locator(".js-plotly-plot .scatterlayer .point").count() == len(planted)
    grid = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
    # layer 3's row, mid-width (the page is 720 px high, the 32-row map taller)
    page.mouse.move(grid["x"] + grid["width"] * 0.5, grid["y"] + grid["height"] * 3.5 / 32)
    page.wait_for_selector(".hoverlayer .hovertext", timeout=5000)
    hover = page.locator(".hoverlayer .hovertext").first.text_content()
    assert "layer 3" in hover and "neuron" in hover and "bin" in hover, hover
    screenshot(page, "report_7b_map_hover.png", tmp_path)
    assert not errors, errors
    page.context.close()


def test_edit_effect_figures_render_offline_in_chromium(chromium, tmp_path):
    """The demo report's edit-effect figures (predicted vs observed, the k sweep, exposure) draw
    every point with no console error."""
    import torch

    from mechedit.evaluate import ExposureResult
    from mechedit.viz import effect_scatter, exposure_strip, k_sweep_lines

    pvo = pd.DataFrame({
        "group": ["selected"] * 3 + ["random"] * 2 + ["all selected"], "rank": [1, 2, 3, 40, 900, -1],
        "layer": [0, 4, 5, 2, 1, -1], "neuron": [117, 377, 74, 9, 300, -1],
        "predicted": [2e-3, 1.8e-3, 1.7e-3, 1e-4, -2e-5, 5.5e-3], "observed": [5e-3, 2e-3, 2.4e-3, 1.2e-4, -1e-5, 3.1],
    })
    sweep = pd.DataFrame(
        [{"selection": "none", "k": 0, "seed": -1, "suite": "forget", "p_target": 0.99}]
        + [{"selection": "top-k", "k": k, "seed": -1, "suite": "forget", "p_target": p} for k, p in ((1, 0.98), (8, 0.6), (24, 0.05))]
        + [{"selection": "random", "k": k, "seed": s, "suite": "forget", "p_target": 0.99 - 0.001 * s} for k in (1, 8, 24) for s in range(3)]
    )
    space = torch.full((3,), 6 * 3.3219, dtype=torch.float64)
    exp = [ExposureResult(torch.tensor(v, dtype=torch.float64), torch.ones(3, dtype=torch.float64), space, "lexicographic")
           for v in ([19.0, 15.5, 3.0], [2.0, 1.0, 3.0])]
    path = write_report(tmp_path / "effects.html", [("Effects", [effect_scatter(pvo), k_sweep_lines(sweep), exposure_strip(*exp)])])
    page, errors = open_offline(chromium, path)
    plots = page.locator(".js-plotly-plot")
    assert plots.count() == 3
    assert plots.nth(0).locator(".scatterlayer .point").count() == 5  # every neuron drawn
    assert plots.nth(0).locator(".barlayer .point").count() == 2  # sum of predictions, observed
    assert plots.nth(2).locator(".boxlayer .point").count() == 6  # every secret, before and after
    screenshot(page, "edit_effect_figures.png", tmp_path)
    assert not errors, errors
    page.context.close()
