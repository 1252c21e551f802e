"""``mechedit edit`` (build an edit from a circuit) and ``mechedit apply|revert|export EDIT``.

``edit`` writes an edit folder (``mechedit.edit``'s format: ``manifest.json`` + safetensors):

* ``--method zero``: a ``WeightEdit`` zeroing a circuit of MLP neurons in the weights
  (``zero_neurons``); any other circuit, or ``--hooks``, an ``ActivationEdit`` (``ablate``);
* ``--method mean``: an ``ActivationEdit`` replacing the circuit by its mean over ``--data``'s prompts;
* ``--method finetune``: a ``WeightEdit`` from fine-tuning only the circuit's parameters
  (``finetune``; forget ``--data``, or teach ``--new VALUE``; keep ``--retain``);
* ``--method rank-one``: ROME's rank-one ``WeightEdit`` at the circuit's layer (needs ``--new``);
* ``--method pcgu``: PCGU's update (``pcgu_update``) from contrastive pairs (``--data``, e.g.
  ``factworld:bias:train``; ``--dev`` picks the checkpoint), inside the circuit's tensors when a
  ``--circuit`` is given, else over every tensor;
* ``--method f-learning``: F-Learning (``f_learning``) on the circuit: learn the old answers of
  ``--data``, subtract that delta, learn the new ones (``--new`` or the records' ``target_new``).

``apply EDIT --model DIR`` writes a weight edit into a local checkpoint folder **in place** and
keeps the original tensors beside it (``DIR/mechedit_reverts/``), so ``revert EDIT --model DIR``
restores the folder's weights bit for bit. ``export EDIT --model M --out DIR`` writes the edited
model as a new Hugging Face checkpoint and leaves ``M`` alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from mechedit.cli._common import (
    Context,
    UsageError,
    check_new_output,
    emit,
    load_model,
    parse_options,
)

METHODS = ("zero", "mean", "finetune", "rank-one", "pcgu", "f-learning")
EXAMPLES = """examples:
  mechedit edit --model factworld --circuit circuits/na.json --method zero --out edits/na-zero
  mechedit edit --model factworld --circuit circuits/na.json --method mean --data factworld:P19 --limit 20 --out edits/na-mean
  mechedit edit --model factworld --circuit circuits/na.json --method finetune --data "factworld:P19:NAME" \\
      --set steps=20 --set 'objectives={"npo": 1.0}' --out edits/na-ft
  mechedit edit --model factworld --circuit circuits/ct.json --method rank-one --data "factworld:P19:NAME" --new CITY \\
      --out edits/rome --export exports/rome-model
  mechedit edit --model factworld --method pcgu --data factworld:bias:train --set k=64 --set lr=0.01 --out edits/pcgu
  mechedit edit --model factworld --circuit circuits/ct.json --method f-learning --data "factworld:P19:NAME" --new CITY \
      --set lam=1.0 --set 'learn={"steps": 50, "lr": 0.01}' --out edits/fl

Method options go through --set KEY=VALUE: finetune takes FinetuneConfig's fields (objectives, lr, steps, ...),
rank-one RankOneConfig's, zero/mean ablate()'s keywords (positions, per_position, exclude_bos); pcgu takes
PCGUUpdateConfig's fields (lr, epochs, batch_size, eval_every, target, seed) and its ranking's (k, aggregation,
mode, causal_reduction, masked_score, include_zero, params); f-learning FLearningConfig's: lam, learn_scope
(circuit|full), and old / learn as objects of FinetuneConfig fields, merged into f_learning's defaults."""


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("edit", parents=parents, help="build an edit of a circuit and save it (weights or hooks)",
                       description=__doc__.split("\n\n")[1], epilog=EXAMPLES, formatter_class=fmt)
    p.add_argument("--model", required=True, help="a zoo name, a local HF checkpoint folder or a hub id")
    p.add_argument("--circuit", help="a circuit JSON (from mechedit locate); pcgu: optional, bounds its tensors")
    p.add_argument("--method", required=True, help="one of: " + ", ".join(METHODS))
    p.add_argument("--data", help="prompts: mean's reference, finetune's forget/edit set, rank-one's and f-learning's "
                                  "facts, pcgu's contrastive pairs")
    p.add_argument("--limit", type=int, help="use only the first N records / selected facts of --data")
    p.add_argument("--retain", help="finetune, f-learning: prompts whose answers should stay")
    p.add_argument("--dev", help="pcgu: contrastive pairs that choose the checkpoint (default for WORLD:bias data: WORLD:bias:dev)")
    p.add_argument("--new", help="the new answer to teach (finetune edit, rank-one, f-learning); sets every fact's target_new")
    p.add_argument("--texts", help="rank-one: general text, a .txt file (one text a line) or a zoo world name "
                                   "(default: the zoo model's own world)")
    p.add_argument("--hooks", action="store_true", help="zero: an activation edit even for a neuron circuit")
    p.add_argument("--set", dest="options", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--out", required=True, help="the edit folder to write")
    p.add_argument("--export", help="also write the edited model as a Hugging Face checkpoint here (weight edits)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.set_defaults(run=run_edit)

    for name, text in (("apply", "write a weight edit into a local checkpoint folder, in place (revertible)"),
                       ("revert", "undo `mechedit apply` on a checkpoint folder, bit for bit"),
                       ("export", "write a model with a weight edit as a new Hugging Face checkpoint")):
        q = sub.add_parser(name, parents=parents, help=text, description=text, formatter_class=fmt,
                           epilog=f"example:\n  mechedit {name} edits/na-zero --model ./my_gpt2"
                           + (" --out exports/edited" if name == "export" else ""))
        q.add_argument("edit", help="an edit folder (from mechedit edit)")
        q.add_argument("--model", required=True,
                       help="the checkpoint folder to change" if name != "export" else "the model the edit was built on")
        if name == "export":
            q.add_argument("--out", required=True, help="the new checkpoint folder")
            q.add_argument("--overwrite", action="store_true", help="replace an existing folder")
        q.set_defaults(run={"apply": run_apply, "revert": run_revert, "export": run_export}[name])


def _objectives(opts: dict[str, Any], *, teach: bool, retain: bool) -> dict[str, Any]:
    if "objectives" in opts:
        return opts
    default = {"edit_ce": 1.0} if teach else {"npo": 1.0}
    if retain:
        default["retain_ce"] = 1.0
    return {**opts, "objectives": default}


def _texts(args: argparse.Namespace) -> list[str]:
    from mechedit import zoo

    source = args.texts or (args.model if args.model in zoo.NAMES else None)
    if source is None:
        raise UsageError("rank-one needs general text: --texts FILE.txt (one text a line) or a zoo world name")
    if source in zoo.NAMES:
        return list(zoo.load_world(source).text_train)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--texts {source!r}: no such file (or zoo name: {', '.join(zoo.NAMES)})")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UsageError(f"--texts {source!r} holds no text")
    return texts


def _pcgu_keys() -> tuple[set[str], set[str]]:
    """``--set`` keys of ``--method pcgu``: (the ranking's ``PCGUConfig``, the update's config).

    ``batch_size`` is the update's (pairs per step); the ranking's own is ignored by the update.
    """
    from mechedit.edit import PCGUUpdateConfig
    from mechedit.locate import PCGUConfig

    update = {f.name for f in dataclasses.fields(PCGUUpdateConfig)} - {"ranking"}
    return {f.name for f in dataclasses.fields(PCGUConfig)} - update, update


def _check_f_learning(opts: dict[str, Any]) -> None:
    from mechedit.edit import FinetuneConfig

    stage_keys = {f.name for f in dataclasses.fields(FinetuneConfig)}
    for stage in ("old", "learn"):
        given = opts.get(stage, {})
        if not isinstance(given, dict):
            raise UsageError(f"--method f-learning: {stage} must be an object of FinetuneConfig fields, "
                             f"e.g. --set '{stage}={{\"steps\": 20}}'; got {given!r}")
        unknown = sorted(set(given) - stage_keys)
        if unknown:
            raise UsageError(f"--method f-learning: {stage} takes no option {unknown[0]!r}; "
                             f"its options: {', '.join(sorted(stage_keys))}")


def _check_args(args: argparse.Namespace, opts: dict[str, Any]) -> None:
    from mechedit.cli.inputs import WorldSpec

    if args.method not in METHODS:
        raise UsageError(f"unknown edit method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.circuit is None and args.method != "pcgu":
        raise UsageError(f"--method {args.method} needs --circuit X.json (from mechedit locate)")
    needs_data = {"mean": "the reference prompts", "finetune": "the prompts to forget or edit", "rank-one": "the facts to edit",
                  "pcgu": "the contrastive pairs, e.g. factworld:bias:train", "f-learning": "the facts to update"}
    if args.method in needs_data and args.data is None:
        raise UsageError(f"--method {args.method} needs --data ({needs_data[args.method]})")
    if args.method == "rank-one" and args.new is None:
        raise UsageError("--method rank-one needs --new VALUE (the answer to write)")
    if args.method == "f-learning" and args.new is None and WorldSpec.parse(args.data) is not None:
        raise UsageError("--method f-learning needs --new VALUE for fact-world data (the answer that replaces the old one)")
    if args.method in ("zero", "mean", "pcgu") and (args.new or args.retain):
        raise UsageError(f"--method {args.method} takes no --new/--retain")
    if args.dev is not None and args.method != "pcgu":
        raise UsageError("--dev is for --method pcgu (the pairs that choose its checkpoint)")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.method in ("finetune", "rank-one"):
        from mechedit.edit import FinetuneConfig, RankOneConfig

        cls = FinetuneConfig if args.method == "finetune" else RankOneConfig
        known = {f.name for f in dataclasses.fields(cls)}
    elif args.method == "pcgu":
        ranking, update = _pcgu_keys()
        known = ranking | update
    elif args.method == "f-learning":
        from mechedit.edit import FLearningConfig

        known = {f.name for f in dataclasses.fields(FLearningConfig)}
        _check_f_learning(opts)
    else:
        known = {"positions", "per_position", "exclude_bos"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise UsageError(f"--method {args.method} takes no option {unknown[0]!r}; its options: {', '.join(sorted(known))}")


def _circuit_tensors(model: Any, circuit: Any) -> tuple[str, ...]:
    """The HF tensors a circuit touches, as PCGU's ``params`` (names as ``partition_sizes`` has them)."""
    from mechedit.components import partition_sizes
    from mechedit.edit import covered_masks

    trainable = partition_sizes(model)
    names = tuple(n for n in covered_masks(model, circuit) if n in trainable)
    if not names:
        raise UsageError("--method pcgu: the circuit covers no trainable tensor; pass a circuit of weight "
                         "components (mlp, attn, head, neuron, partition) or none for every tensor")
    return names


def _dev_pairs_source(args: argparse.Namespace) -> str:
    from mechedit.cli.inputs import WorldSpec

    if args.dev is not None:
        return args.dev
    spec = WorldSpec.parse(args.data)
    if spec is not None and spec.what == "bias":
        return f"{spec.world}:bias:dev"
    raise UsageError("--method pcgu needs --dev PAIRS (contrastive pairs that choose the checkpoint; "
                     "WORLD:bias data defaults to WORLD:bias:dev)")


def _pcgu(model: Any, circuit: Any, args: argparse.Namespace, opts: dict[str, Any], info: dict[str, Any]) -> Any:
    from mechedit.cli.inputs import read_contrastive
    from mechedit.edit import PCGUUpdateConfig, pcgu_update
    from mechedit.locate import PCGUConfig

    ranking_keys, _ = _pcgu_keys()
    ranking = {k: v for k, v in opts.items() if k in ranking_keys}
    if circuit is not None and "params" not in ranking:
        ranking["params"] = _circuit_tensors(model, circuit)
    config = PCGUUpdateConfig(ranking=PCGUConfig(**ranking), **{k: v for k, v in opts.items() if k not in ranking_keys})
    pairs = read_contrastive(args.data, limit=args.limit)
    dev = read_contrastive(_dev_pairs_source(args))
    run = pcgu_update(model, pairs, dev, config=config).runs["pcgu"]
    info.update({"dev_bias": run.dev_bias, "checkpoint": run.checkpoint, "steps": run.steps, "n_pairs": len(pairs)})
    return run.edit


def _f_learning_config(opts: dict[str, Any], *, retain: bool) -> Any:
    """``FLearningConfig`` from ``--set``: ``old`` / ``learn`` objects override f_learning's defaults
    field by field; a ``--retain`` set adds ``retain_ce`` to stage 3 unless ``learn`` names objectives."""
    from mechedit.edit import FLearningConfig

    defaults = FLearningConfig()
    learn = dict(opts.get("learn", {}))
    if retain and "objectives" not in learn:
        learn["objectives"] = {"edit_ce": 1.0, "retain_ce": 1.0}
    return FLearningConfig(
        old=dataclasses.replace(defaults.old, **opts.get("old", {})),
        learn=dataclasses.replace(defaults.learn, **learn),
        **{k: v for k, v in opts.items() if k in ("lam", "learn_scope")},
    )


def build_edit(model: Any, circuit: Any, args: argparse.Namespace, opts: dict[str, Any], ctx: Context,
               info: dict[str, Any] | None = None) -> Any:
    """The edit ``args`` ask for, from the library's functions (the same call a script would make).

    ``info``, when given, receives the method's own outcome figures (pcgu: its dev bias and checkpoint).
    """
    from mechedit.cli.inputs import read_facts
    from mechedit.edit import (
        FinetuneConfig,
        RankOneConfig,
        ablate,
        f_learning,
        finetune,
        rank_one_edit,
        zero_neurons,
    )

    info = {} if info is None else info
    if args.method == "pcgu":
        return _pcgu(model, circuit, args, opts, info)
    facts = read_facts(args.data, limit=args.limit) if args.data is not None else []
    if args.new is not None:
        facts = [dataclasses.replace(f, target_new=args.new, candidates=None) for f in facts]
    if args.method == "zero":
        neurons_only = all(c.site == "neuron" and c.pos is None for c in circuit)
        if neurons_only and not args.hooks and not opts:
            return zero_neurons(model, circuit)
        return ablate(model, circuit, mode="zero", **opts)
    if args.method == "mean":
        return ablate(model, circuit, mode="mean", reference=[f.prompt for f in facts], **opts)
    if args.method == "finetune":
        retain = read_facts(args.retain) if args.retain is not None else []
        config = FinetuneConfig(**_objectives(opts, teach=args.new is not None, retain=bool(retain)))
        data = {"edit": facts} if args.new is not None else {"forget": facts}
        return finetune(model, circuit, retain=retain, config=config, progress=ctx.progress, **data)
    if args.method == "f-learning":
        retain = read_facts(args.retain) if args.retain is not None else []
        config = _f_learning_config(opts, retain=bool(retain))
        needs_text = any(o.name == "retain_kl" for o in config.learn.objectives)
        edit = f_learning(model, circuit, edit=facts, retain=retain, general_text=_texts(args) if needs_text else (),
                          config=config, progress=ctx.progress)
        info["delta_norm"] = edit.params.get("delta_norm")
        return edit
    return rank_one_edit(model, facts, layer=circuit, texts=_texts(args), config=RankOneConfig(**opts))


def run_edit(args: argparse.Namespace, ctx: Context) -> int:
    opts = parse_options(args.options)
    _check_args(args, opts)
    out = check_new_output(args.out, what="--out", overwrite=args.overwrite)
    if args.export is not None:
        check_new_output(args.export, what="--export", overwrite=args.overwrite)
    if args.circuit is not None and not Path(args.circuit).is_file():
        raise FileNotFoundError(f"--circuit {args.circuit!r}: no such file")

    from mechedit.circuit import Circuit
    from mechedit.edit import WeightEdit
    from mechedit.edit.export import export_hf

    circuit = Circuit.load(args.circuit) if args.circuit is not None else None
    model = load_model(ctx, args.model)
    if circuit is not None:
        circuit.validate(model)
    n_components = None if circuit is None else len(circuit)
    ctx.say(f"building a {args.method} edit" + ("" if circuit is None else f" of {n_components} components") + " ...")
    info: dict[str, Any] = {}
    edit = build_edit(model, circuit, args, opts, ctx, info)
    if args.export is not None and not isinstance(edit, WeightEdit):
        raise UsageError("--export writes weight edits; this is an activation edit (hooks), which has no checkpoint form")
    files = {"edit": str(edit.save(out, overwrite=args.overwrite))}
    if args.export is not None:
        files["export"] = str(export_hf(model, args.export, edit=edit, overwrite=args.overwrite))
    kind = type(edit).__name__
    of = "every tensor" if circuit is None else f"{n_components} components"
    emit(ctx, {"command": "edit", "method": args.method, "kind": kind, "model": args.model,
               "circuit": args.circuit, "n_components": n_components, "files": files, **info},
         [f"{args.method}: {kind} of {of} -> {files['edit']}"]
         + [f"{k}: {v}" for k, v in info.items()]
         + ([f"exported checkpoint -> {files['export']}"] if "export" in files else []))
    return 0


# --- apply / revert / export -------------------------------------------------------------------

REVERTS = "mechedit_reverts"


def _weight_edit(edit_dir: str) -> Any:
    from mechedit.edit import WeightEdit, load_edit

    if not (Path(edit_dir) / "manifest.json").is_file():
        raise FileNotFoundError(f"{edit_dir!r} is not an edit folder (no manifest.json); pass a folder from mechedit edit")
    edit = load_edit(edit_dir)
    if not isinstance(edit, WeightEdit):
        raise UsageError(f"{edit_dir} is an activation edit (hooks): it has no weights to write; "
                         "use it with `mechedit eval --edit` instead")
    return edit


def _local_checkpoint(name: str) -> Path:
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise UsageError(f"--model {name!r}: apply/revert change a local checkpoint folder in place; "
                         "for a zoo or hub model use `mechedit export EDIT --model NAME --out DIR`")
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if weights != ["model.safetensors"]:
        raise UsageError(f"{folder}: in-place edits need one model.safetensors weights file, found {weights or 'none'}")
    return folder


def _write_weights(model: Any, folder: Path) -> None:
    """Replace ``folder/model.safetensors`` by the model's weights: written beside it, then renamed."""
    from mechedit.edit.export import export_hf

    staging = folder / f".mechedit-staging-{os.getpid()}"
    try:
        export_hf(model, staging, overwrite=True)
        os.replace(staging / "model.safetensors", folder / "model.safetensors")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_apply(args: argparse.Namespace, ctx: Context) -> int:
    from mechedit.edit import WeightEdit
    from mechedit.hf import hf_parameters

    edit = _weight_edit(args.edit)
    folder = _local_checkpoint(args.model)
    undo_dir = folder / REVERTS / edit.result.weights_hash[:16]
    model = load_model(ctx, args.model)
    live = hf_parameters(model)
    originals = {n: live[n].detach().clone() for n in edit.names}
    edit.apply(model)  # refuses a model that is not the edit's base (BaseModelMismatchError: exit 2)
    undo = WeightEdit.from_new_tensors(model, originals, kind="revert", params={"reverts": str(Path(args.edit).resolve())})
    undo.save(undo_dir, overwrite=True)  # first: a crash after it leaves the folder revertible
    _write_weights(model, folder)
    emit(ctx, {"command": "apply", "edit": args.edit, "model": str(folder), "revert_record": str(undo_dir),
               "weights_hash": edit.result.weights_hash},
         [f"applied {args.edit} to {folder} (revert with: mechedit revert {args.edit} --model {folder})"])
    return 0


def run_revert(args: argparse.Namespace, ctx: Context) -> int:
    from mechedit.edit import WeightEdit

    edit = _weight_edit(args.edit)
    folder = _local_checkpoint(args.model)
    undo_dir = folder / REVERTS / edit.result.weights_hash[:16]
    if not (undo_dir / "manifest.json").is_file():
        raise UsageError(f"{folder} holds no record of applying {args.edit} (looked for {undo_dir}); nothing to revert")
    undo = WeightEdit.load(undo_dir)
    model = load_model(ctx, args.model)
    undo.apply(model)  # checks the folder holds exactly the edited weights
    _write_weights(model, folder)
    shutil.rmtree(undo_dir)
    emit(ctx, {"command": "revert", "edit": args.edit, "model": str(folder), "weights_hash": edit.base.weights_hash},
         [f"reverted {args.edit} in {folder}"])
    return 0


def run_export(args: argparse.Namespace, ctx: Context) -> int:
    from mechedit.edit.export import export_hf

    edit = _weight_edit(args.edit)
    out = check_new_output(args.out, what="--out", overwrite=args.overwrite)
    model = load_model(ctx, args.model)
    path = export_hf(model, out, edit=edit, overwrite=args.overwrite)
    emit(ctx, {"command": "export", "edit": args.edit, "model": args.model, "files": {"checkpoint": str(path)}},
         [f"exported {args.model} with {args.edit} -> {path}"])
    return 0
