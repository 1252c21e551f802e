"""``mechedit report RUN_DIR``: the HTML page of a run folder, rebuilt from its files alone.

A short recipe runs on a random local checkpoint (not from the zoo; every suite on file data),
then the page is rebuilt and checked against the numbers in the folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mechedit.circuit import Circuit
from mechedit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """\
name: tiny-report
model: {model}
data: {root}/facts.jsonl
seed: 0
locate:
  method: knowledge-neurons
  options: {{steps: 3}}
select:
  top_k: 6
edit:
  method: zero
evaluate:
  - suite: facts
  - suite: privacy
    data: {root}/secrets.jsonl
    options: {{el: false}}
  - suite: bias
    data: {root}/pairs.csv
"""


def _run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["--json", "--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A finished run folder of a short recipe on a random 2-layer GPT-2 (words w0..w58)."""
    from mechedit.zoo.random_model import random_checkpoint

    root = tmp_path_factory.mktemp("report")
    model = random_checkpoint(root / "model", "gpt2", n_layer=2, n_embd=64, n_head=4)
    facts = [{"prompt": f"w{i} w{i + 1} w{i + 2} w{i + 3}", "subject": f"w{i + 1}", "target": f"w{i + 7}", "id": i}
             for i in range(1, 7)]
    (root / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in facts))
    secrets = [{"prefix": f"w{i} w{i + 2} w{i + 4}", "secret": f"w{i + 9} w{i + 11}"} for i in range(1, 4)]
    (root / "secrets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in secrets))
    rows = ["sent_more,sent_less,stereo_antistereo,bias_type"]
    rows += [f"w{i} w40 w{i + 2},w{i} w41 w{i + 2},stereo,gender" for i in range(1, 5)]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    (root / "r.yaml").write_text(RECIPE.format(model=model, root=root))
    code = main(["--quiet", "run", str(root / "r.yaml"), "--runs", str(root / "runs")])
    assert code == 0
    (folder,) = (root / "runs").iterdir()
    return folder


def _section(page: str, heading: str) -> str:
    """The HTML from ``<h2>heading`` up to the next ``<h2>``."""
    start = page.index(f"<h2>{heading}")
    end = page.find("<h2>", start + 4)
    return page[start: end if end != -1 else len(page)]


def _g(value: float) -> str:
    return f"{value:.4g}"  # how the report's tables print floats


def test_run_writes_the_report_and_report_rebuilds_it_from_the_folder(capsys, run_folder):
    written = run_folder / "report.html"
    assert written.is_file()  # `mechedit run` wrote it at the end
    written.unlink()
    code, summary, err = _run(capsys, "report", run_folder)
    assert code == 0, err
    assert summary["files"]["report"] == str(written) and written.is_file()
    page = written.read_text(encoding="utf-8")
    assert [p.name for p in run_folder.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    # where: the heatmap of the circuit's scores, the selected components outlined and listed
    circuit = Circuit.load(run_folder / "circuit.json")
    where = _section(page, "Where")
    assert 'class="plotly-graph-div"' in where and '"type":"heatmap"' in where
    assert '"name":"selected"' in where  # the outline trace of viz.heatmap(mark=...)
    for component in circuit:
        assert str(component) in where
    # the edit, with the weights hashes before and after from its manifest
    manifest = json.loads((run_folder / "edit" / "manifest.json").read_text())
    edit = _section(page, "The edit")
    assert manifest["base"]["weights_hash"] in edit and manifest["result"]["weights_hash"] in edit

    steps = {s["suite"]: s for s in json.loads((run_folder / "summary.json").read_text())["steps"] if s["command"] == "eval"}
    assert set(steps) == {"facts", "privacy", "bias"}
    facts = _section(page, "Evaluation: facts")
    assert 'class="plotly-graph-div"' in facts  # the before/after bars
    for row in steps["facts"]["rows"]:
        assert row["metric"] in facts
        for key in ("before", "after"):
            if row[key] is not None:
                assert _g(row[key]) in facts, (row, key)
    # per relation, from results.jsonl's items: each suite's mean accuracy after the edit is on the page
    items = [json.loads(line) for line in (run_folder / "results.jsonl").read_text().splitlines() if line.strip()]
    facts_items = [i for i in items if i.get("eval") == "facts" and "accuracy" in i["after"]]
    assert facts_items and "Per relation" in facts and facts.count('class="plotly-graph-div"') >= 2
    for suite in {i["suite"] for i in facts_items}:
        after = [i["after"]["accuracy"] for i in facts_items if i["suite"] == suite]
        assert _g(sum(after) / len(after)) in facts, suite
    privacy = _section(page, "Evaluation: privacy")
    numbers = [v for values in steps["privacy"]["metrics"].values() for v in values.values() if v is not None]
    assert numbers
    for name in steps["privacy"]["metrics"]:
        assert name in privacy
    for value in numbers:
        assert _g(value) in privacy, value
    bias = _section(page, "Evaluation: bias")
    for side in ("before", "after"):
        assert _g(steps["bias"][side]["mean_difference"]) in bias and _g(steps["bias"][side]["percent"]) in bias

    # provenance: params.json's recipe and versions, the model hash, the commands
    params = json.loads((run_folder / "params.json").read_text())
    prov = _section(page, "Provenance")
    for library, version in params["versions"].items():
        assert library in prov and version in prov
    assert circuit.provenance.weights_hash in prov
    assert "knowledge-neurons" in prov and "mechedit locate" in prov and "params.json" in prov
    # standalone: plotly inline, nothing fetched (plotly.js itself names cdn.plot.ly as its default
    # topojson URL for geo maps, which a report never draws, so the check is on script tags)
    assert "<script" in page and not re.search(r"<script[^>]*\bsrc=", page)


def test_report_to_another_file_and_bad_folders_exit_2(capsys, run_folder, tmp_path):
    out = tmp_path / "elsewhere" / "r.html"
    code, summary, err = _run(capsys, "report", run_folder, "--out", out)
    assert code == 0, err
    assert summary["files"]["report"] == str(out) and out.is_file()
    assert "tiny-report" in out.read_text(encoding="utf-8")

    unfinished = tmp_path / ".tiny-report-20260101-000000.partial"
    unfinished.mkdir()
    (unfinished / "params.json").write_text((run_folder / "params.json").read_text())
    for argv, message in [
        ((unfinished,), "has no summary.json, circuit.json (an unfinished run's .partial folder?)"),
        ((tmp_path / "missing",), "no run folder"),
        ((run_folder / "params.json",), "is a file"),
        ((run_folder, "--out", tmp_path / "r.txt"), "give a .html file name"),
    ]:
        code = main(["--quiet", "report", *map(str, argv)])
        _, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in unfinished.iterdir()) == ["params.json"]  # nothing written


def test_the_run_report_renders_offline_in_chromium(run_folder, chromium, tmp_path):
    """``mechedit run``'s page in a real browser: every figure drawn (heatmap with the circuit
    outlined, the facts suite's bars and its per-relation view, privacy, bias), no console error."""
    from conftest import open_offline, screenshot

    path = run_folder / "report.html"
    expected = path.read_text(encoding="utf-8").count('class="plotly-graph-div"')
    page, errors = open_offline(chromium, path)
    plots = page.locator(".js-plotly-plot")
    assert plots.count() == expected >= 4
    for i in range(expected):
        assert plots.nth(i).locator(".main-svg").count() >= 1
    circuit = Circuit.load(run_folder / "circuit.json")
    assert plots.first.locator(".scatterlayer .point").count() == len(circuit)
    assert "Per relation" in page.locator("body").inner_text()
    screenshot(page, "run_report.png", tmp_path)
    assert not errors, errors
    page.context.close()
