"""A report opened in a real headless Chromium: no console errors, every figure drawn, the
heatmap's hover works and the selected neurons are on it.

Driven by playwright with Debian's ``chromium`` (``.ci/run`` installs it when missing); skipped,
with the reason, only where neither is available. Screenshots go to ``$MECHEDIT_SCREENSHOTS``
(default: the test's temporary folder), outside git.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

import mechedit
from mechedit.locate import NeuronAttributionConfig, neuron_attribution
from mechedit.prompts import FactPrompt
from mechedit.unembedding import promoted_tokens
from mechedit.viz import before_after, heatmap, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FACTS = [FactPrompt(prompt="w1 w2 w3", target="w4"), FactPrompt(prompt="w5 w6", target="w7")]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's `chromium`)"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as pw:
        instance = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield instance
        instance.close()


def _open(browser, path: Path):
    context = browser.new_context(offline=True)  # a fresh profile; the page must need no network
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    page.wait_for_selector(".main-svg")
    return page, errors


def test_report_renders_offline_in_chromium_with_hover_and_marks(browser, tmp_path, tiny_gpt2_dir):
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
    page, errors = _open(browser, path)
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
    screens = Path(os.environ.get("MECHEDIT_SCREENSHOTS", tmp_path))
    screens.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screens / "report_heatmap_hover.png"), full_page=True)
    assert not errors, errors
    page.context.close()
