"""Standalone HTML reports: figures, tables and text in one file that opens with no network.

plotly's JavaScript is embedded once, inline (about 4.5 MB), instead of linked from a CDN, so a
report written on an air-gapped machine opens the same anywhere.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

Block = go.Figure | pd.DataFrame | str

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em; }
.meta { color: #666; font-size: 0.9em; }
table.dataframe { border-collapse: collapse; font-size: 0.92em; margin: 0.5em 0; }
table.dataframe th, table.dataframe td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
table.dataframe th { background: #f4f4f4; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
"""


def _render(block: Block, include_js: bool) -> tuple[str, bool]:
    if isinstance(block, go.Figure):
        return block.to_html(full_html=False, include_plotlyjs=include_js, config={"responsive": True}), False
    if isinstance(block, pd.DataFrame):
        return block.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0), include_js
    if isinstance(block, str):
        return "".join(f"<p>{html.escape(p)}</p>" for p in block.split("\n\n") if p.strip()), include_js
    raise TypeError(f"a report block must be a plotly Figure, a DataFrame or a str, not {type(block).__name__}")


def write_report(
    path: str | Path,
    sections: Sequence[tuple[str, Sequence[Block]]],
    *,
    title: str = "mechedit report",
    subtitle: str = "",
    provenance: Mapping[str, object] | None = None,
) -> Path:
    """Write ``sections`` (``[(heading, [figure | DataFrame | text, ...]), ...]``) to one HTML file.

    A final "Provenance" section lists ``provenance`` (e.g. model, weights hash, method configs;
    nested values as JSON), the library versions (``mechedit.provenance.library_versions``) and
    the command or kernel that wrote the report, unless ``provenance`` gives them itself.
    Creates the parent folder; returns the path. The file is self-contained, and written to a
    temporary name and renamed (a crash leaves no half-written report).
    """
    from mechedit.artifacts import write_text_atomic
    from mechedit.provenance import invocation, library_versions

    given = dict(provenance or {})
    given.setdefault("command", invocation())
    for name, v in library_versions().items():
        given.setdefault(f"version: {name}", v)
    table = pd.DataFrame({
        "what": list(given),
        "value": [v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True) for v in given.values()],
    })
    sections = [*sections, ("Provenance", [table])]
    out = Path(path)
    include_js = True
    parts = []
    for heading, blocks in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            rendered, include_js = _render(block, include_js)
            parts.append(rendered)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><div class='meta'>{html.escape(subtitle)} &middot; written {stamp}</div>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    return write_text_atomic(out, page)
