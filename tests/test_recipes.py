"""The example recipes in ``recipes/``: every file validates against the schema and stands for valid
command lines (fast: nothing loads); two of them run end to end on the fact world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechedit.cli import build_parser, main
from mechedit.cli.locate import LOCATORS
from mechedit.cli.recipe import _prevalidate, load_recipe, step_argvs

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_is_an_example_recipe_for_every_locator():
    methods = {load_recipe(path).locate.method for path in RECIPES}
    assert methods == set(LOCATORS)
    edits = {r.edit.method for r in map(load_recipe, RECIPES) if r.edit is not None}
    assert {"pcgu", "f-learning"} <= edits
    suites = {e.suite for r in map(load_recipe, RECIPES) for e in r.evaluate}
    assert suites == {"facts", "privacy", "bias", "robustness"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_example_recipe_validates_and_says_what_it_does(path, tmp_path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# ") and f"mechedit run recipes/{path.name}" in text  # the comment header
    recipe = load_recipe(path)
    assert recipe.name == path.stem.replace("_", "-")
    # the steps parse as commands and pass their checks (options known to each method)
    steps = _prevalidate(build_parser(), step_argvs(recipe, tmp_path / "run"))
    assert [s.command for s in steps][:1] == ["locate"] and not (tmp_path / "run").exists()


def _run(capsys, path: Path, runs: Path) -> dict:
    code = main(["--json", "--quiet", "run", str(path), "--runs", str(runs)])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    folder = Path(summary["folder"])
    assert json.loads((folder / "summary.json").read_text())["steps"] == summary["steps"]
    assert (folder / "params.json").is_file() and (folder / "circuit.json").is_file()
    return {s["command"] if s["command"] != "eval" else f"eval-{s['suite']}": s for s in summary["steps"]}


@pytest.mark.slow
def test_the_knowledge_neurons_recipe_runs_and_forgets(capsys, tmp_path):
    steps = _run(capsys, RECIPES[[p.stem for p in RECIPES].index("factworld_knowledge_neurons_zero")], tmp_path)
    assert steps["locate"]["n_components"] == steps["edit"]["n_components"] == 8
    rows = {(r["suite"], r["metric"]): r for r in steps["eval-facts"]["rows"]}
    efficacy = rows[("efficacy", "exact_true")]
    assert efficacy["before"] == 1.0 and efficacy["after"] <= 0.5  # measured 0.14
    assert rows[("neighbourhood", "exact_true")]["after"] >= 0.9  # measured 1.0


@pytest.mark.slow
def test_the_depn_recipe_runs_and_lowers_exposure(capsys, tmp_path):
    steps = _run(capsys, RECIPES[[p.stem for p in RECIPES].index("factworld_depn_privacy")], tmp_path)
    metrics = steps["eval-privacy"]["metrics"]
    assert metrics["mrr"]["after"] < metrics["mrr"]["before"]  # measured 0.99 -> 0.83
    assert metrics["exposure"]["after"] < metrics["exposure"]["before"]
