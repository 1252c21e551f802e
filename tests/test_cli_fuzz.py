"""Fuzzed recipes and circuit files (hypothesis): each one loads, or is refused with the command
line's clear error (exit code 2, one line on stderr naming the file, no traceback) - never another
exception type."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechedit.circuit import Circuit, CircuitFormatError
from mechedit.cli import main
from mechedit.cli._common import UsageError
from mechedit.cli.recipe import load_recipe
from mechedit.components import Component

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

RECIPE: dict[str, Any] = {
    "name": "fuzz",
    "model": "factworld",
    "data": "factworld:P19",
    "seed": 0,
    "locate": {"method": "neuron-attribution", "limit": 2, "options": {"layers": [1]}},
    "select": {"top_k": 8, "by": "abs"},
    "edit": {"method": "f-learning", "data": "factworld:P19", "new": "paris", "options": {"lam": 1.0}},
    "evaluate": [{"suite": "facts", "limit": 2}, {"suite": "robustness", "options": {"relearn_steps": 2}}],
}

# any JSON-like value, NaN and infinities included
values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Every key path of a nested dict/list (the places a mutation can hit)."""
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*path, i))
    return out


@st.composite
def mutated(draw: Any, base: dict[str, Any]) -> Any:
    """``base`` with one to three mutations: a key removed, a value of a wrong type, an extra key."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        kind = draw(st.sampled_from(["delete", "retype", "extra"]))
        if kind == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif kind == "retype":
            parent[path[-1]] = draw(values)
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(values)
    return doc


def _one_line_exit_2(argv: list[str], capsys: Any) -> str:
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("mechedit ") and "Traceback" not in err, err
    return err


def _check_recipe_text(text: str, capsys: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_recipe(path)
        except UsageError as err:
            message = str(err)
            assert message.startswith(str(path)) and "\n" not in message, message
            # the same file through the command line: exit 2, one line, no run folder
            err_line = _one_line_exit_2(["run", str(path), "--runs", str(Path(tmp) / "runs")], capsys)
            assert str(path) in err_line
            assert not (Path(tmp) / "runs").exists()


@FUZZ
@given(doc=mutated(RECIPE))
def test_mutated_recipes_load_or_exit_2_naming_the_file(capsys, doc):
    _check_recipe_text(yaml.safe_dump(doc, allow_unicode=True), capsys)


@FUZZ
@given(cut=st.integers(0, 600), junk=st.text(max_size=6))
def test_truncated_recipes_load_or_exit_2(capsys, cut, junk):
    text = Path(__file__).resolve().parents[1].joinpath("recipes", "factworld_fact_lookup_f_learning.yaml").read_text()
    _check_recipe_text(text[:cut] + junk, capsys)


@pytest.mark.parametrize(
    "text",
    [
        "name: a\nmodel: m\ndata: d\nlocate: &x {method: pcgu, options: {self: *x}}\n",  # an alias inside itself
        "name: a\nmodel: m\ndata: d\nlocate: {method: pcgu}\n1: 2\n",  # a non-string key
        "\x00\x01",
        "[1, 2",
        "!!python/object:os.system {}",
    ],
)
def test_odd_recipe_files_exit_2(capsys, text):
    _check_recipe_text(text, capsys)


def test_a_recipe_that_is_not_utf8_exits_2(capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError, match="UTF-8"):
        load_recipe(path)
    _one_line_exit_2(["run", str(path), "--runs", str(tmp_path / "runs")], capsys)


# --- circuit files ---------------------------------------------------------------------------------

CIRCUIT = Circuit(
    (Component("neuron", 0, neuron=3), Component("neuron", 1, neuron=7), Component("mlp", 1), Component("head", 0, head=2)),
    method="manual", config={"note": "fuzz"},
).to_dict()


@st.composite
def circuit_docs(draw: Any) -> Any:
    doc = draw(mutated(CIRCUIT))
    if isinstance(doc, dict) and draw(st.booleans()):
        key = draw(st.sampled_from(["version", "format", "site", "nan_row"]))
        if key == "version":
            doc["version"] = draw(st.integers(-3, 9) | st.floats() | st.text(max_size=3))
        elif key == "format":
            doc["format"] = draw(st.text(max_size=20))
        elif key == "site" and isinstance(doc.get("components"), dict):
            groups = doc["components"]
            if groups:
                site = draw(st.sampled_from(sorted(groups, key=str)))
                groups[draw(st.text(max_size=10))] = groups.pop(site)
        elif key == "nan_row" and isinstance(doc.get("components"), dict):
            doc["components"].setdefault("neuron", {"columns": ["layer", "neuron"], "rows": []})
            group = doc["components"]["neuron"]
            if isinstance(group, dict) and isinstance(group.get("rows"), list):
                group["rows"].append([draw(st.sampled_from([math.nan, math.inf, -1, 0.5, "0"])), 1])
    return doc


def _check_circuit_text(text: str, capsys: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "circuit.json"
        path.write_text(text, encoding="utf-8")
        try:
            Circuit.load(path)
            loaded = True
        except CircuitFormatError as err:
            assert "\n" not in " ".join(str(err).split("\n")[:1]) and str(path) in str(err), str(err)
            loaded = False
        # through the command line: a bad circuit is refused before any model loads (exit 2,
        # naming the file); a good one reaches the (missing) model, also exit 2
        out = Path(tmp) / "out"
        err_line = _one_line_exit_2(["edit", "--model", str(Path(tmp) / "no_model"), "--circuit", str(path),
                                     "--method", "zero", "--out", str(out)], capsys)
        assert (str(path) in err_line) != loaded, err_line
        assert not out.exists()


@FUZZ
@given(doc=circuit_docs())
def test_mutated_circuit_files_load_or_exit_2(capsys, doc):
    _check_circuit_text(json.dumps(doc), capsys)


@FUZZ
@given(cut=st.integers(0, 400))
def test_truncated_circuit_files_exit_2(capsys, cut):
    text = json.dumps(CIRCUIT)
    if cut < len(text):
        _check_circuit_text(text[:cut], capsys)
