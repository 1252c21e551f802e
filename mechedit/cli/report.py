"""``mechedit report RUN_DIR``: rebuild the standalone HTML report of a ``mechedit run`` folder.

The page (``mechedit.viz.write_run_report``) shows the circuit's scores heatmap with the selected
components outlined, the edit, each evaluation suite before and with the edit, and the run's
provenance (params.json, library versions, model hash, command lines), from the folder's files
alone: no model is loaded. plotly's JavaScript is inline, so the file opens with no network.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mechedit.cli._common import Context, UsageError, emit

EXAMPLES = """examples:
  mechedit report runs/factworld-forget-city-20260101-120000            # -> that folder's report.html
  mechedit report runs/factworld-forget-city-20260101-120000 --out forget.html"""


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("report", parents=parents, help="rebuild the HTML report of a run folder",
                       description=__doc__.split("\n\n", 1)[1], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by mechedit run (runs/<name>-<timestamp>)")
    p.add_argument("--out", metavar="FILE.html", help="where to write the page (default: RUN_DIR/report.html)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.out is not None and not args.out.endswith((".html", ".htm")):
        raise UsageError(f"--out {args.out!r}: the report is HTML; give a .html file name")
    from mechedit.viz.run_report import check_run_folder, write_run_report

    folder = check_run_folder(args.run_dir)  # before plotly loads: a wrong folder costs nothing
    ctx.say(f"writing the report of {folder} ...")
    path = write_run_report(folder, args.out)
    emit(ctx, {"command": "report", "run": str(folder), "files": {"report": str(path)}},
         [f"report: {Path(path).resolve()}"])
    return 0
