"""How long the command line takes to answer ``--help`` / ``--version``, each in a fresh process.

    python bench/cli_startup.py [--repeats 5]

Prints a table of wall times (best and median of ``--repeats`` runs). The last two rows are the
reference: importing torch alone, and what ``mechedit --help`` paid before the command line
imported the library lazily (``mechedit/__init__`` imported the core, hence torch and
TransformerLens, before argparse ran). A speed claim, so it lives here, not in a timed test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("mechedit --help", ["-m", "mechedit", "--help"]),
    ("mechedit --version", ["-m", "mechedit", "--version"]),
    ("mechedit locate --help", ["-m", "mechedit", "locate", "--help"]),
    ("mechedit eval --help", ["-m", "mechedit", "eval", "--help"]),
    ("python -c 'import torch' (reference)", ["-c", "import torch"]),
    ("old --help: import the core first (reference)", ["-c", "import mechedit; mechedit.load; mechedit.Circuit"]),
]


def time_command(args: list[str], repeats: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per row")
    args = parser.parse_args()
    print(f"| command | best (s) | median (s) |   ({args.repeats} fresh processes each)")
    print("|---|---|---|")
    for label, command in CASES:
        times = time_command(command, args.repeats)
        print(f"| {label} | {min(times):.3f} | {statistics.median(times):.3f} |", flush=True)


if __name__ == "__main__":
    main()
