"""Notebooks: each .ipynb is paired with its jupytext .py, committed without outputs, and executes."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from queue import Empty

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def _sliced(get_msg):
    """``get_msg`` polled in 1-second slices up to its timeout. With widgets on a page, a kernel's
    reply can sit on the socket unseen until the poll's timeout ends (jupyter/nbclient#312): one
    CI run waited 10 minutes on notebook 07's explorer cell. A new poll sees it at once."""

    async def polled(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await get_msg(timeout=1.0 if left is None else min(1.0, left))
            except Empty:
                if left is not None and left <= 1.0:
                    raise

    return polled


def _client(nbclient, notebook, **options):
    """An ``nbclient.NotebookClient`` whose shell and iopub reads are ``_sliced``."""

    class Client(nbclient.NotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            for channel in (kc.shell_channel, kc.iopub_channel):
                channel.get_msg = _sliced(channel.get_msg)
            return kc

    return Client(notebook, **options)


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
    client = _client(nbclient, notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    client.execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    _check_renders_anywhere(notebook)


PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _check_renders_anywhere(notebook) -> None:
    """Every figure also has a text/html form that `nbconvert --to html` keeps (with plotly.js
    inline, no CDN), and progress bars are saved as text at their final state, not as widgets."""
    from nbconvert import HTMLExporter

    outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
    figures = [o for o in outputs if PLOTLY_MIME in o.get("data", {})]
    assert figures, "the notebook draws no figure"
    assert all("text/html" in o["data"] for o in figures), "a figure has only plotly's JupyterLab MIME type"
    # a cell tagged "live-widget" shows an interactive widget on purpose (e.g. the neuron explorer)
    widgets = [o for c in notebook.cells if "live-widget" not in c.get("metadata", {}).get("tags", [])
               for o in c.get("outputs", []) if WIDGET_MIME in o.get("data", {})]
    assert not widgets, "a widget progress bar would save at 0 % (tag a cell 'live-widget' to show a widget on purpose)"
    page, _ = HTMLExporter().from_notebook_node(notebook)
    assert page.count('class="plotly-graph-div"') >= len(figures)
    assert len(page) > 3_000_000, "plotly.js (about 4.5 MB) should be inline in the exported page"
    assert not re.search(r"<script[^>]+src=[\"']https?://cdn\.plot\.ly", page), "plotly.js must be inline, not from a CDN"
