"""The example recipes in ``recipes/``: every file validates against the schema and stands for valid
command lines (fast: nothing loads); each runs end to end on the fact world and reruns from its
params.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechedit.cli import build_parser, main
from mechedit.cli.circuits import component_differences
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


def _run(capsys, recipe: Path, runs: Path) -> tuple[Path, dict]:
    """``(run folder, {step name: step summary})`` of ``mechedit run RECIPE`` (exit 0 asserted)."""
    code = main(["--json", "--quiet", "run", str(recipe), "--runs", str(runs)])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    folder = Path(summary["folder"])
    assert json.loads((folder / "summary.json").read_text())["steps"] == summary["steps"]
    assert (folder / "params.json").is_file() and (folder / "circuit.json").is_file()
    return folder, {s["command"] if s["command"] != "eval" else f"eval-{s['suite']}": s for s in summary["steps"]}


# what each example recipe must achieve (measured values in the comments); the rest of each run
# is checked by test_every_example_recipe_runs_and_reruns_from_its_params
OUTCOMES = {
    "factworld_knowledge_neurons_zero": lambda steps: (
        steps["locate"]["n_components"] == steps["edit"]["n_components"] == 12
        and _row(steps, "efficacy", "exact_true")["before"] == 1.0
        and _row(steps, "efficacy", "exact_true")["after"] <= 0.5  # measured 0.43
        and _row(steps, "neighbourhood", "exact_true")["after"] >= 0.9  # measured 0.96
    ),
    "factworld_depn_privacy": lambda steps: (
        steps["eval-privacy"]["metrics"]["mrr"]["after"] < steps["eval-privacy"]["metrics"]["mrr"]["before"]  # 0.99 -> 0.83
        and steps["eval-privacy"]["metrics"]["exposure"]["after"] < steps["eval-privacy"]["metrics"]["exposure"]["before"]
    ),
}


def _row(steps: dict, suite: str, metric: str) -> dict:
    (row,) = [r for r in steps["eval-facts"]["rows"] if (r["suite"], r["metric"]) == (suite, metric)]
    return row


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_example_recipe_runs_and_reruns_from_its_params(capsys, tmp_path, path):
    """From a fresh checkout: the run finishes with every step, its report and per-item results;
    its circuit is the committed library's (circuits/<name>.json); rerunning its params.json gives
    the same summary, number for number."""
    from mechedit.circuit import Circuit

    folder, steps = _run(capsys, path, tmp_path / "runs")
    recipe = load_recipe(path)
    assert list(steps)[:1] == ["locate"] and ("edit" in steps) == (recipe.edit is not None)
    assert {f"eval-{e.suite}" for e in recipe.evaluate} <= set(steps)
    assert (folder / "report.html").is_file() and (folder / "results.jsonl").is_file()
    committed = Path(__file__).resolve().parents[1] / "circuits" / f"{recipe.name}.json"
    # the same components in the same order, equally scored ones (float noise between CPUs) in any order
    assert not component_differences(json.loads(committed.read_text()), json.loads((folder / "circuit.json").read_text()))
    assert len(Circuit.load(folder / "circuit.json")) == len(Circuit.load(committed))
    if path.stem in OUTCOMES:
        assert OUTCOMES[path.stem](steps), steps
    again, _ = _run(capsys, folder / "params.json", tmp_path / "again")

    def numbers(run: Path) -> list:  # the steps with the run's own folder name taken out of the paths
        return json.loads((run / "summary.json").read_text().replace(str(run), "RUN"))["steps"]

    assert numbers(again) == numbers(folder)
