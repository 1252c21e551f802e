"""``mechedit world show|export|train|card``: the fact-world zoo from the command line.

* ``show [NAME]``: the zoo's models (folder, size, key figures), or one world's summary.
* ``export NAME --out DIR``: the world as the files ``--data`` reads (facts in training and
  held-out templates, planted facts, private records, bias pairs); ``--format standard`` writes
  the CounterFact / known_1000 / CrowS-Pairs files instead.
* ``train NAME --out DIR``: a zoo recipe (``mechedit.zoo.build.train_zoo_model``, the function
  behind ``python -m mechedit.zoo train``), with ``--config FILE.json`` for other sizes.
* ``card``: the model card, rendered from the checkpoints' metadata.

``NAME`` is a zoo name or a checkpoint folder with a ``metadata.json`` (e.g. one ``train`` wrote).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mechedit.cli._common import Context, UsageError, check_new_output, emit

EXAMPLES = """examples:
  mechedit world show                                   # the zoo's models and their figures
  mechedit world show factworld-planted --people 3      # one world: relations, records, planted people
  mechedit world export factworld --out data/factworld --format jsonl
  mechedit locate knowledge-neurons --model factworld --data data/factworld/facts.jsonl --limit 7 --out c.json
  mechedit world train factworld --config tiny.json --out models/tiny      # {"world": {...}, "train": {...}}
  mechedit world train factworld-planted --layer 4 --out models/planted-l4
  mechedit world card --out MODEL_CARD.md"""

EXPORT_FORMATS = ("jsonl", "json", "csv", "standard")


def add_train_arguments(p: argparse.ArgumentParser, *, out_required: bool) -> None:
    """The options of ``train`` (shared with ``python -m mechedit.zoo train``)."""
    p.add_argument("name", help="factworld, factworld-planted, factworld-planted-subject or factworld-mlm")
    p.add_argument("--out", required=out_required,
                   help="checkpoint folder to write" + ("" if out_required else " (default: the shipped one)"))
    p.add_argument("--config", metavar="FILE.json",
                   help='settings replacing the recipe\'s: {"world": {WorldConfig fields}, "train": {TrainConfig '
                        '(MLMTrainConfig) fields, "shape": {...}}, "plant": {PlantConfig fields}, "occupations": '
                        '[[name, pct_female], ...]}; unknown keys are refused')
    p.add_argument("--epochs", type=int, help="factworld / factworld-mlm: training epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (quick runs)")
    p.add_argument("--threads", type=int, help="torch threads (results are reproducible per thread count)")
    p.add_argument("--layer", type=int, help="planted models: the MLP layer that learns the new facts (default 2, subject mode 1)")
    p.add_argument("--at", choices=["all", "subject"],
                   help="planted models: where the trained MLP acts while planting: every position (factworld-planted) "
                        "or only the name tokens (factworld-planted-subject); default: from the name")
    p.add_argument("--base", help="planted models: the factworld folder to start from (default: the shipped one)")
    p.add_argument("--winogender", help="factworld: path of WinoGender's occupations-stats.tsv (default ../shared/data/...)")
    p.add_argument("--no-measure", action="store_true", help="skip measuring the saved checkpoint's figures")


def train_from_args(args: argparse.Namespace, out: Path, *, progress: bool) -> dict:
    """Run ``train_zoo_model`` with the parsed ``add_train_arguments`` options; returns the metadata."""
    from mechedit.zoo.build import read_settings, train_zoo_model

    for flag in ("epochs", "max_steps", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.base is not None and not (Path(args.base) / "metadata.json").is_file():
        raise FileNotFoundError(f"--base {args.base!r} is not a zoo checkpoint folder (no metadata.json)")
    settings = read_settings(args.config) if args.config else None
    return train_zoo_model(
        args.name, out, base=args.base, settings=settings, epochs=args.epochs, max_steps=args.max_steps,
        threads=args.threads, layer=args.layer, at=args.at, winogender=args.winogender, progress=progress,
        measure=not args.no_measure,
    )


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    world = sub.add_parser("world", parents=parents, help="the fact-world zoo: show, export, train, card",
                           description=__doc__.split("\n\n", 1)[1], epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    # the global options again under each action, so `mechedit world show --json` works
    actions = world.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(world))
    show = actions.add_parser("show", parents=parents, help="the zoo's models, or one world's summary",
                              epilog="examples:\n  mechedit world show\n  mechedit world show factworld --people 5 --json",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("name", nargs="?", help="a zoo name or a checkpoint folder (omitted: every zoo model)")
    show.add_argument("--people", type=int, default=3, help="list the facts of this many people (default 3)")
    show.set_defaults(run=run_show)

    export = actions.add_parser(
        "export", parents=parents, help="write a world as --data files (facts, paraphrases, private records, bias pairs)",
        epilog="examples:\n  mechedit world export factworld --out data/factworld\n"
               "  mechedit world export factworld-planted --out data/planted --format csv\n"
               "  mechedit world export factworld --out data/standard --format standard   # counterfact.json, known.json, ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("name", help="a zoo name or a checkpoint folder")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--format", default="jsonl", choices=EXPORT_FORMATS,
                        help="jsonl / json / csv: facts, paraphrases, planted, private in that format and "
                             "bias_pairs.csv; standard: CounterFact, known_1000, CrowS-Pairs files (default jsonl)")
    export.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    export.set_defaults(run=run_export)

    train = actions.add_parser(
        "train", parents=parents, help="train a zoo model (the recipe of python -m mechedit.zoo train)",
        epilog="examples:\n  mechedit world train factworld --out models/factworld            # ~21 min on 2 cores\n"
               "  mechedit world train factworld --config tiny.json --out models/tiny  # seconds\n"
               "  mechedit world train factworld-planted --layer 4 --base models/factworld --out models/planted-l4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(train, out_required=True)
    train.add_argument("--overwrite", action="store_true", help="replace a checkpoint folder that is not empty")
    train.set_defaults(run=run_train)

    card = actions.add_parser("card", parents=parents, help="render the zoo's model card from the checkpoints' metadata",
                              epilog="examples:\n  mechedit world card                 # print it\n"
                                     "  mechedit world card --out mechedit/zoo/MODEL_CARD.md",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    card.add_argument("--out", help="write the card (Markdown) here instead of printing it")
    card.set_defaults(run=run_card)


# --- show ----------------------------------------------------------------------------------------

#: metadata figures shown per model, in this order, when recorded
_FIGURES = (
    "facts_train_templates", "facts_heldout_templates", "planted_facts", "mc_heldout_people",
    "bias_rate_heldout_templates", "text_perplexity_heldout", "text_pseudo_perplexity_heldout",
)


def _folder(name: str) -> Path:
    from mechedit import zoo

    if name in zoo.NAMES:
        return zoo.checkpoint_dir(name)
    folder = Path(name)
    if not (folder / "metadata.json").is_file():
        raise UsageError(f"{name!r} is neither a zoo model ({', '.join(zoo.NAMES)}) nor a checkpoint folder with a metadata.json")
    return folder


def _model_row(name: str, folder: Path) -> dict[str, Any]:
    from mechedit.zoo.metadata import read_metadata

    meta = read_metadata(folder)
    metrics = meta.get("metrics", {})
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {
        "name": name, "path": str(folder), "size_mb": round(size / 1e6, 2), "description": meta.get("description", ""),
        "people": meta["world_config"].get("n_people"),
        "figures": {k: metrics[k] for k in _FIGURES if isinstance(metrics.get(k), (int, float))},
    }


def _world_summary(name: str, folder: Path, n_people: int) -> dict[str, Any]:
    from collections import Counter

    from mechedit.zoo.metadata import read_metadata, world_from_metadata

    meta = read_metadata(folder)
    world = world_from_metadata(meta)
    kinds = Counter(r.kind for r in world.private)
    return {
        **_model_row(name, folder),
        "people_total": len(world.people),
        "facts": len(world.facts),
        "relations": [{"id": r.id, "name": r.name, "values": len(r.values), "train_templates": len(r.train_templates),
                       "heldout_templates": len(r.heldout_templates)} for r in world.relations],
        "private_records": dict(sorted(kinds.items())),
        "planted_people": [{"name": p.name, "facts": p.facts} for p in world.planted],
        "planted_layer": meta.get("planted_layer"),
        "occupations": len(world.biases),
        "text": {"train": len(world.text_train), "heldout": len(world.text_heldout)},
        "sample_people": [{"name": p.name, "facts": p.facts} for p in world.people[:max(0, n_people)]],
    }


def _figure(key: str, x: float) -> str:
    return f"{key} {x:.3f}" if "perplexity" in key else f"{key} {100 * x:.1f} %"


def run_show(args: argparse.Namespace, ctx: Context) -> int:
    from mechedit import zoo

    if args.name is None:
        rows = [_model_row(n, zoo.CHECKPOINTS / n) for n in zoo.NAMES if (zoo.CHECKPOINTS / n / "metadata.json").is_file()]
        lines = []
        for r in rows:
            figures = ", ".join(_figure(k, v) for k, v in r["figures"].items())
            lines += [f"{r['name']}  ({r['size_mb']:.1f} MB, {r['path']})", f"  {r['description']}", f"  {figures}"]
        emit(ctx, {"command": "world show", "models": rows}, lines)
        return 0
    s = _world_summary(args.name, _folder(args.name), args.people)
    lines = [
        f"{s['name']}: {s['description']}",
        f"  {s['people_total']} people, {s['facts']} facts, {s['occupations']} biased occupations, "
        f"{s['text']['train']} / {s['text']['heldout']} general sentences (train / held out)",
        "  relations: " + ", ".join(f"{r['id']} {r['name']} ({r['values']} values)" for r in s["relations"]),
        "  private records: " + ", ".join(f"{n} {k}" for k, n in s["private_records"].items()),
        f"  planted people ({len(s['planted_people'])}"
        + (f", taught to blocks.{s['planted_layer']}.mlp" if s["planted_layer"] is not None else "") + "): "
        + ", ".join(f"{p['name']} ({', '.join(f'{k}={v}' for k, v in p['facts'].items())})" for p in s["planted_people"]),
        *[f"  {p['name']}: " + ", ".join(f"{k}={v}" for k, v in p["facts"].items()) for p in s["sample_people"]],
        "  figures: " + ", ".join(_figure(k, v) for k, v in s["figures"].items()),
    ]
    emit(ctx, {"command": "world show", **s}, lines)
    return 0


# --- export --------------------------------------------------------------------------------------


def run_export(args: argparse.Namespace, ctx: Context) -> int:
    out = check_new_output(args.out, what="--out", overwrite=args.overwrite)
    folder = _folder(args.name)
    from mechedit.zoo.metadata import read_metadata, world_from_metadata

    world = world_from_metadata(read_metadata(folder))
    if args.format == "standard":
        from mechedit.zoo.formats import export_world

        paths = export_world(world, out)
    else:
        from mechedit.zoo.formats import export_records

        paths = export_records(world, out, args.format)
    files = [str(p) for p in paths]
    emit(ctx, {"command": "world export", "name": args.name, "format": args.format, "files": files}, files)
    return 0


# --- train ---------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace, ctx: Context) -> int:
    out = check_new_output(args.out, what="--out", overwrite=args.overwrite)
    ctx.say(f"training {args.name} into {out} ...")
    from mechedit.cli._common import quiet_loading

    with quiet_loading(ctx):  # without progress, no "Writing model shards" bar from transformers either
        meta = train_from_args(args, out, progress=ctx.progress)
    summary = {"command": "world train", "name": args.name, "out": str(out), "steps": meta.get("plant_steps", meta.get("steps")),
               "metrics": meta.get("metrics", {})}
    emit(ctx, summary, [f"checkpoint: {out}", *(f"  {k}: {v}" for k, v in summary["metrics"].items()
                                                if isinstance(v, (int, float)))])
    return 0


# --- card ----------------------------------------------------------------------------------------


def run_card(args: argparse.Namespace, ctx: Context) -> int:
    from mechedit.zoo import CHECKPOINTS, NAMES
    from mechedit.zoo.card import render

    checkpoints = {n: CHECKPOINTS / n for n in NAMES if (CHECKPOINTS / n / "metadata.json").is_file()}
    if "factworld" not in checkpoints:
        raise FileNotFoundError(f"the card is rendered from the factworld checkpoint, which is missing from {CHECKPOINTS}")
    text = render(checkpoints)
    if args.out is None:
        if ctx.json:
            emit(ctx, {"command": "world card", "card": text, "models": list(checkpoints)}, [])
        else:
            print(text)
        return 0
    from mechedit.zoo.card import write_card

    path = write_card(checkpoints, Path(args.out))
    emit(ctx, {"command": "world card", "file": str(path), "models": list(checkpoints)}, [f"model card: {path}"])
    return 0
