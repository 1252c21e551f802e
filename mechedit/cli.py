"""The ``mechedit`` command line: thin commands over the library's functions.

    mechedit demo [--subject NAME] [--relation P19] [--k 24] [--out runs/demo]
    mechedit circuits [--out circuits]
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from mechedit.demo import DemoConfig, run_demo, summary_table

    config = DemoConfig(
        model=args.model, subject=args.subject, relation_id=args.relation, k=args.k, seed=args.seed, out_dir=args.out
    )
    result = run_demo(config)
    print()
    print(summary_table(result))
    print(f"\nforgot '{result.fact.subject} -> {result.fact.value}' by zeroing {len(result.circuit)} neurons "
          f"in {result.seconds['total']:.1f} s")
    print(f"report: {result.paths['report_html'].resolve()}")
    return 0


def _circuits(args: argparse.Namespace) -> int:
    from mechedit.library import write_library

    for path in write_library(args.out):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mechedit", description="Locate and edit facts in transformer language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="locate and forget one fact of the fact world; writes runs/demo/report.html")
    demo.add_argument("--model", default="factworld", help="a zoo model (default: factworld)")
    demo.add_argument("--subject", help="the person whose fact to forget (default: a seeded pick)")
    demo.add_argument("--relation", default="P19", help="relation id, e.g. P19 birth city, P641 sport")
    demo.add_argument("--k", type=int, default=24, help="neurons to zero")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="run folder")
    circuits = sub.add_parser("circuits", help="rebuild the circuits/ library for the shipped models")
    circuits.add_argument("--out", default="circuits", help="folder to write (default: circuits)")
    args = parser.parse_args(argv)
    return {"demo": _demo, "circuits": _circuits}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
