"""``mechedit demo``: the fact-world job end to end (``mechedit circuits`` is in ``mechedit.cli.circuits``)."""

from __future__ import annotations

import argparse
from typing import Any

from mechedit.cli._common import Context, UsageError, emit, quiet_loading


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo", parents=parents, help="locate and forget one fact of the fact world; writes runs/demo/report.html",
        epilog="examples:\n  mechedit demo --relation P19 --k 24 --out runs/demo\n"
               "  mechedit demo --model ./my-gpt2 --data facts.jsonl --retain keep.jsonl --k 24   # any checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--model", default="factworld",
                      help="a zoo model (default: factworld), or any local checkpoint / hub name with --data")
    demo.add_argument("--data", help="for a model outside the zoo: the facts to forget (JSON/JSONL/CSV records with "
                                     "prompt and target, optionally subject; or a dataset name)")
    demo.add_argument("--retain", help="for a model outside the zoo: facts to keep, subtracted when locating")
    demo.add_argument("--subject", help="the person whose fact to forget (default: a seeded pick)")
    demo.add_argument("--relation", default="P19", help="relation id, e.g. P19 birth city, P641 sport")
    demo.add_argument("--k", type=int, default=24, help="neurons to zero")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="run folder (created once the arguments check out)")
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace, ctx: Context) -> int:
    from mechedit import zoo

    if args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    if args.model not in zoo.NAMES:
        return _demo_on_checkpoint(args, ctx)
    if args.data is not None or args.retain is not None:
        raise UsageError("--data / --retain are for a model outside the zoo; on a zoo model the demo picks its fact "
                         "with --relation / --subject")
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


def _demo_on_checkpoint(args: argparse.Namespace, ctx: Context) -> int:
    """The demo's steps on any checkpoint: locate (neuron attribution) -> top-k -> zero -> facts suite
    -> report, run as a recipe into ``<out>/demo-<timestamp>/`` (its params.json reruns it)."""
    import tempfile
    from pathlib import Path

    import yaml

    from mechedit.cli import recipe as recipe_cmd

    if args.data is None:
        raise UsageError(
            f"{args.model!r} is not a zoo model, so the demo needs the facts to forget: --data FILE "
            "(records with prompt and target, optionally subject), and optionally --retain FILE"
        )
    if args.subject is not None:
        raise UsageError("--subject picks a fact of a zoo world; on your checkpoint --data says what to forget")
    def absolute(name: str) -> str:  # files become absolute paths; hub and dataset names stay as given
        return str(Path(name).resolve()) if Path(name).exists() else name

    locate = {"method": "neuron-attribution", **({"retain": absolute(args.retain)} if args.retain else {})}
    recipe = {
        "name": "demo", "model": absolute(args.model), "data": absolute(args.data), "seed": args.seed,
        "locate": locate, "select": {"top_k": args.k}, "edit": {"method": "zero"}, "evaluate": [{"suite": "facts"}],
    }
    # the recipe file lives only for the run (params.json in the run folder keeps it, and reruns it),
    # so bad input leaves no folder behind
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return recipe_cmd.run(argparse.Namespace(recipe=str(path), runs=args.out, no_report=False), ctx)

