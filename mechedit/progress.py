"""Progress bars that survive a saved notebook.

``tqdm.auto`` draws Jupyter widget bars, whose state a saved or exported notebook does not keep:
reopened or converted with ``jupyter nbconvert --to html`` they read 0 %. With the environment
variable ``MECHEDIT_PROGRESS=text`` (``mechedit.viz.notebook_setup()`` sets it) every mechedit bar
is a plain text bar instead, whose last state is ordinary cell output. The choice is read when a
bar is created, so it can be changed at any time.
"""

from __future__ import annotations

import os
from typing import Any

import tqdm.auto as _auto_bars
import tqdm.std as _text_bars

ENV = "MECHEDIT_PROGRESS"


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """A ``tqdm`` bar: ``tqdm.auto``'s by default, a text bar when ``MECHEDIT_PROGRESS=text``."""
    mode = os.environ.get(ENV, "auto")
    if mode not in ("auto", "text"):
        raise ValueError(f"{ENV}={mode!r}: use 'auto' (widgets in notebooks) or 'text'")
    bar = _text_bars.tqdm if mode == "text" else _auto_bars.tqdm
    return bar(*args, **kwargs)
