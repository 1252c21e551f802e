"""Make a notebook's figures and progress bars survive saving, exporting and reopening anywhere."""

from __future__ import annotations

import os

import plotly.io as pio

from mechedit.progress import ENV

# "plotly_mimetype" is what JupyterLab draws live; "notebook" adds each figure as text/html
# with plotly.js inline (once per notebook), which `jupyter nbconvert --to html`, GitHub and
# VS Code show and which needs no network.
RENDERER = "plotly_mimetype+notebook"


def notebook_setup(*, text_progress: bool = True) -> str:
    """Call once at the top of a notebook: figures render in any viewer, progress bars save.

    Sets plotly's default renderer to ``RENDERER`` and, with ``text_progress``, mechedit's bars to
    text (``MECHEDIT_PROGRESS=text``, see ``mechedit.progress``), whose final state is saved with
    the cell, and turns off transformers' own weight-loading bars (widgets too; a one-second
    "Loading weights" bar is not worth a broken saved output). These are settings of this kernel
    (plotly's renderer and transformers' bars are those libraries' own globals). Returns the
    renderer set.
    """
    pio.renderers.default = RENDERER
    if text_progress:
        from transformers.utils import logging as hf_logging

        os.environ[ENV] = "text"
        hf_logging.disable_progress_bar()
    return RENDERER
