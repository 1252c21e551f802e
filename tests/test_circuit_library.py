"""``mechedit circuits``: the committed circuits/ library is what the example recipes' locate + select
steps rebuild today (components exactly, scores within tolerance), and ``--check`` names a change."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from mechedit.circuit import Circuit
from mechedit.cli import main
from mechedit.cli.circuits import ATOL, RTOL, differences
from mechedit.cli.recipe import load_recipe
from mechedit.library import PLANTED

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# every recipe's circuit and the planted ground truth; the demo's circuit (`mechedit demo` end to
# end, ~10 s) is checked by `mechedit circuits --check` only
CHECKED = [load_recipe(p).name for p in RECIPES] + [f"{n}_ground_truth" for n in PLANTED]


def _cli(*argv) -> tuple[int, dict | None, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--json", "--quiet", *map(str, argv)])
    return code, json.loads(out.getvalue()) if out.getvalue().strip() else None, err.getvalue()


def test_the_committed_library_is_what_the_recipes_rebuild():
    code, summary, err = _cli("circuits", "--check", "--recipes", ROOT / "recipes", "--out", ROOT / "circuits",
                              "--only", *CHECKED)
    assert code == 0, (err, [(r["name"], r["differences"]) for r in summary["circuits"] if r["differences"]])
    assert [(r["name"], r["status"]) for r in summary["circuits"]] == [(n, "same") for n in CHECKED]
    for path in RECIPES:  # one circuit per recipe, naming its recipe, with the locator's scores
        circuit = Circuit.load(ROOT / "circuits" / f"{load_recipe(path).name}.json")
        assert circuit.provenance.extra["recipe"] == f"recipes/{path.name}"
        assert circuit.provenance.model_name == load_recipe(path).model and circuit.provenance.seed == 0
        assert circuit.provenance.data_hash is not None
        scores = circuit.config.get("component_scores")
        if circuit.config.get("selection", {}).get("rule") == "top_k":
            key = [abs(s) for s in scores] if circuit.config["selection"]["by"] == "abs" else scores
            assert len(scores) == len(circuit) and key == sorted(key, reverse=True), path.name  # rank order


def test_check_exits_1_naming_the_file_and_the_changed_component(tmp_path):
    name = "factworld-forget-city"
    shutil.copy(ROOT / "circuits" / f"{name}.json", tmp_path)
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    rows = doc["components"]["neuron"]["rows"]
    original = list(rows[3])
    rows[3] = [original[0], (original[1] + 1) % 512]
    (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    code, summary, err = _cli("circuits", "--check", "--recipes", ROOT / "recipes", "--out", tmp_path, "--only", name)
    assert code == 1, err
    (row,) = summary["circuits"]
    assert row["status"] == "differs" and row["file"] == str(tmp_path / f"{name}.json")
    assert f"committed neuron{rows[3]}, rebuilt neuron{original}" in row["differences"][0]
    assert "first difference at #3" in row["differences"][0]
    # the text output says the same, file first
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["--quiet", "circuits", "--check", "--recipes", str(ROOT / "recipes"), "--out", str(tmp_path),
                     "--only", name]) == 1
    assert f"{tmp_path / name}.json: DIFFERS" in out.getvalue()
    assert f"{tmp_path / name}.json: components:" in out.getvalue()


def test_differences_compare_numbers_within_the_tolerance_and_everything_else_exactly():
    base = json.loads((ROOT / "circuits" / "factworld-knowledge-neurons-zero.json").read_text())

    def changed(edit):
        doc = json.loads(json.dumps(base))
        edit(doc)
        return differences(base, doc)

    assert differences(base, base) == []
    first = base["config"]["component_scores"][0]
    assert changed(lambda d: d["config"]["component_scores"].__setitem__(0, first * (1 + RTOL / 2))) == []
    (diff,) = changed(lambda d: d["config"]["component_scores"].__setitem__(0, first * (1 + 10 * RTOL)))
    assert diff.startswith("config.component_scores[0]: committed") and f"rtol {RTOL:g} / atol {ATOL:g}" in diff
    assert changed(lambda d: d["provenance"].__setitem__("mechedit_version", "9.9.9")) == []  # not compared
    (diff,) = changed(lambda d: d["provenance"].__setitem__("weights_hash", "0" * 16))
    assert diff.startswith(f"provenance.weights_hash: committed '{base['provenance']['weights_hash']}'")
    (diff,) = changed(lambda d: d["components"]["neuron"]["rows"].reverse())  # same set, another order
    assert "first difference at #0" in diff and "not rebuilt" not in diff and "new:" not in diff
    (diff,) = changed(lambda d: d["config"]["selection"].pop("k"))
    assert diff == "config.selection.k: only in the committed file"


def test_bad_circuits_arguments_exit_2_with_one_line(tmp_path):
    code, _, err = _cli("circuits", "--recipes", ROOT / "recipes", "--only", "no-such-circuit", "--out", tmp_path / "x")
    assert code == 2 and "no-such-circuit" in err and "factworld-pcgu-bias" in err and err.count("\n") == 1
    code, _, err = _cli("circuits", "--recipes", tmp_path / "none")
    assert code == 2 and "is not a folder of recipe" in err
    code, _, err = _cli("circuits", "--check", "--recipes", ROOT / "recipes", "--out", tmp_path / "none")
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "x").exists()


def test_equally_scored_components_may_swap_but_nothing_else():
    """Float noise between CPUs swaps components whose scores tie to ~1e-7 (measured: PCGU's
    cosines -0.99951911 / -0.99951899); that is no difference, any other reordering is."""
    from mechedit.cli.circuits import component_differences

    doc = json.loads((ROOT / "circuits" / "factworld-pcgu-bias.json").read_text())
    ((site, group),) = [(s, g) for s, g in doc["components"].items() if len(g["rows"]) > 20][:1]
    scores = doc["config"]["component_scores"]
    swapped = json.loads(json.dumps(doc))
    rows = swapped["components"][site]["rows"]
    i = next(i for i in range(len(rows) - 1) if abs(scores[i] - scores[i + 1]) < 1e-6)
    rows[i], rows[i + 1] = rows[i + 1], rows[i]
    assert component_differences(doc, swapped) == []
    j = next(j for j in range(len(rows) - 1) if abs(scores[j] - scores[j + 1]) > 1e-3)
    far = json.loads(json.dumps(doc))
    rows = far["components"][site]["rows"]
    rows[j], rows[j + 1] = rows[j + 1], rows[j]
    assert component_differences(doc, far) and "first difference at" in component_differences(doc, far)[0]
