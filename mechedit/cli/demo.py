"""``mechedit demo`` (the fact-world job end to end) and ``mechedit circuits`` (the circuits/ library)."""

from __future__ import annotations

import argparse
from typing import Any

from mechedit.cli._common import Context, UsageError, emit, quiet_loading


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo", parents=parents, help="locate and forget one fact of the fact world; writes runs/demo/report.html",
        epilog="example:\n  mechedit demo --relation P19 --k 24 --out runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--model", default="factworld", help="a zoo model with a recorded world (default: factworld)")
    demo.add_argument("--subject", help="the person whose fact to forget (default: a seeded pick)")
    demo.add_argument("--relation", default="P19", help="relation id, e.g. P19 birth city, P641 sport")
    demo.add_argument("--k", type=int, default=24, help="neurons to zero")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="run folder (created once the arguments check out)")
    demo.set_defaults(run=run_demo)
    circuits = sub.add_parser(
        "circuits", parents=parents, help="rebuild the circuits/ library for the shipped models",
        epilog="example:\n  mechedit circuits --out circuits", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    circuits.add_argument("--out", default="circuits", help="folder to write (default: circuits)")
    circuits.set_defaults(run=run_circuits)


def run_demo(args: argparse.Namespace, ctx: Context) -> int:
    from mechedit import zoo

    if args.model not in zoo.NAMES:
        raise UsageError(
            f"the demo runs on a zoo model with a recorded world ({', '.join(zoo.NAMES)}), not {args.model!r}; "
            "for your own checkpoint use `mechedit locate` / `edit` / `eval`"
        )
    if args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    # checked here, before the model loads, so a typo costs nothing and leaves no run folder
    world = zoo.load_world(args.model)
    if args.relation not in world.relation:
        raise UsageError(f"unknown relation {args.relation!r}; the world has {', '.join(sorted(world.relation))}")
    if args.subject is not None:
        from mechedit.cli.inputs import WorldSpec, world_facts

        world_facts(WorldSpec(args.model, args.relation, args.subject), None)
    from mechedit.demo import DemoConfig, run_demo, summary_table

    config = DemoConfig(
        model=args.model, subject=args.subject, relation_id=args.relation, k=args.k, seed=args.seed, out_dir=args.out
    )
    with quiet_loading(ctx):
        result = run_demo(config, progress=ctx.progress)
    summary = {
        "command": "demo", "fact": {"subject": result.fact.subject, "relation_id": result.fact.relation_id,
                                    "value": result.fact.value},
        "k": len(result.circuit), "files": {k: str(v) for k, v in result.paths.items()},
        "seconds": result.seconds, "report": result.report.to_frame().to_dict(orient="records"),
    }
    emit(ctx, summary, [
        "", summary_table(result),
        f"\nforgot '{result.fact.subject} -> {result.fact.value}' by zeroing {len(result.circuit)} neurons "
        f"in {result.seconds['total']:.1f} s",
        f"report: {result.paths['report_html'].resolve()}",
    ])
    return 0


def run_circuits(args: argparse.Namespace, ctx: Context) -> int:
    from mechedit.library import write_library

    paths = [str(p) for p in write_library(args.out)]
    emit(ctx, {"command": "circuits", "files": paths}, paths)
    return 0
