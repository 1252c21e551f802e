"""Notebooks: each .ipynb is paired with its jupytext .py, committed without outputs, and executes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def _sources(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.slow
@pytest.mark.parametrize("script", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_paired_clean_and_executes(script, tmp_path):
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    paired = script.with_suffix(".ipynb")
    assert paired.is_file(), f"{paired.name} missing: run `jupytext --sync {script.name}`"
    notebook = nbformat.read(paired, as_version=4)
    assert _sources(notebook) == _sources(jupytext.read(script)), f"{paired.name} is out of sync with {script.name}"
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "commit notebooks without outputs"

    work = tmp_path / "run"
    work.mkdir()
    shutil.copy(paired, work / paired.name)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    client.execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
