"""``mechedit eval``: measure a model, and with ``--edit`` the model before and with a saved edit.

Suites (``mechedit.evaluate``):

* ``facts``: ``evaluate_fact_edit``. With a fact-world selection (``--data factworld:P19:NAME``)
  the whole forget case of ``fact_edit_suites`` (or, with ``--new VALUE``, the edit case):
  efficacy, paraphrase, multiple choice, neighbourhood, same subject, fluency. With a file, the
  prompts are the efficacy suite and ``--paraphrases`` / ``--neighbours`` files add those suites.
* ``privacy``: ``privacy_report`` on the secrets of ``--data`` (``factworld:secrets[:kind]`` or a
  file of ``prefix``/``secret`` records): exposure, MRR, memorisation, extraction.
* ``bias``: ``pair_preference`` on contrastive pairs (``factworld:bias[:split]`` or a
  CrowS-Pairs CSV): how often the advantaged side is preferred, before and with the edit.
* ``robustness``: ``robustness_report`` (needs ``--edit``): the model as it is vs a second copy
  with the edit applied, on the forget (or, with ``--new``, edit) case of a fact-world selection
  (at least two subjects) and the retained facts of ``--retain`` (default: up to 12 other facts of
  the same relations), then attacks on the edited copy that try to bring the old answers back;
  the headline is each attack's recovery on the held-out half (0 = nothing back, 1 = all).

Without ``--edit`` the "after" columns repeat (facts) or are empty (privacy, bias).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
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

SUITES = ("facts", "privacy", "bias", "robustness")
EXAMPLES = """examples:
  mechedit eval --model factworld --edit edits/na-zero --suite facts --data "factworld:P19:NAME" --out reports/na.json
  mechedit eval --model ./my_gpt2 --edit edits/x --suite facts --data facts.jsonl --neighbours others.jsonl
  mechedit eval --model factworld --suite privacy --data factworld:secrets:phone --limit 10 --set el=false
  mechedit eval --model factworld --edit edits/pcgu --suite bias --data factworld:bias:test
  mechedit eval --model factworld --edit edits/na-ft --suite robustness --data factworld:P19 --limit 6 \
      --set 'attacks=["relearn_full", "latent_universal"]' --set relearn_steps=5 --set latent_steps=5 --out reports/rob.json

--set KEY=VALUE passes options to the suite's function: facts -> fact_edit_suites (fact-world data) or
evaluate_fact_edit (files), privacy -> privacy_report, bias -> pair_preference, robustness ->
RobustnessConfig's fields (attacks, relearn_steps, latent_steps, ...) and, for its cases, fact_edit_suites'
neighbours_per_fact, mc_rotations and candidates, same_subject=false (no other-facts suite) and fluency_texts=N."""


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval", parents=parents, help="evaluate a model, before and with a saved edit",
                       description=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a zoo name, a local HF checkpoint folder or a hub id")
    p.add_argument("--edit", help="an edit folder (from mechedit edit); omitted: the model as it is")
    p.add_argument("--suite", required=True, help="one of: " + ", ".join(SUITES))
    p.add_argument("--data", required=True, help="prompts, secrets or pairs: a file or a fact-world selection")
    p.add_argument("--limit", type=int, help="use only the first N records / selected facts")
    p.add_argument("--paraphrases", help="facts suite, file data: held-out phrasings of the same facts")
    p.add_argument("--neighbours", help="facts suite, file data: other subjects' facts that should stay")
    p.add_argument("--new", help="facts / robustness suite, fact-world data: the edit case's new answer (default: a forget case)")
    p.add_argument("--retain", help="robustness suite: the retained facts, a fact-world selection of the same world "
                                    "(default: up to 12 other facts of the forgotten facts' relations)")
    p.add_argument("--set", dest="options", action="append", metavar="KEY=VALUE", help="a suite option (repeatable)")
    p.add_argument("--out", help="write the report here (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(run=run)


def _check_options(function: Any, opts: dict[str, Any], reserved: set[str], what: str) -> None:
    params = inspect.signature(function).parameters
    known = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} - reserved
    unknown = sorted(set(opts) - known)
    if unknown:
        raise UsageError(f"{what} takes no option {unknown[0]!r}; its options: {', '.join(sorted(known))}")


def _finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _facts(model: Any, edit: Any, args: argparse.Namespace, opts: dict[str, Any]) -> tuple[Any, dict[str, Any], list[str]]:
    from mechedit.cli.inputs import WorldSpec, read_facts, world_facts
    from mechedit.evaluate import evaluate_fact_edit, fact_edit_suites

    spec = WorldSpec.parse(args.data)
    if spec is not None:
        if args.paraphrases or args.neighbours:
            raise UsageError("--paraphrases/--neighbours are for file data; a fact-world selection brings its own")
        _check_options(fact_edit_suites, opts, {"case"}, "the facts suite (fact_edit_suites)")
        world, facts = world_facts(spec, args.limit)
        new = None if args.new is None else [args.new] * len(facts)
        suites = fact_edit_suites(world, facts, new, **opts)
        report = evaluate_fact_edit(model, edit=edit, suites=suites)
    else:
        if args.new is not None:
            raise UsageError("--new is for fact-world data; in a file, give each record a target_new")
        _check_options(evaluate_fact_edit, opts, {"edit", "edited", "paraphrases", "neighbours", "suites", "progress"},
                       "the facts suite (evaluate_fact_edit)")
        report = evaluate_fact_edit(
            model, edit=edit, edited=read_facts(args.data, limit=args.limit),
            paraphrases=read_facts(args.paraphrases) if args.paraphrases else (),
            neighbours=read_facts(args.neighbours) if args.neighbours else (), **opts,
        )
    frame = report.to_frame()
    rows = frame.to_dict(orient="records")
    items = [{"eval": "facts", **item} for item in report.items]
    return report, {"rows": rows, "items": items}, [frame.to_string(index=False, float_format=lambda v: f"{v:.4f}")]


def _privacy(model: Any, edit: Any, args: argparse.Namespace, opts: dict[str, Any]) -> tuple[Any, dict[str, Any], list[str]]:
    from mechedit.cli.inputs import read_secrets
    from mechedit.evaluate import privacy_report

    _check_options(privacy_report, opts, {"edit"}, "the privacy suite (privacy_report)")
    report = privacy_report(model, read_secrets(args.data, limit=args.limit), edit=edit, **opts)
    metrics = {k: {"before": b, "after": a} for k, (b, a) in report.metrics.items()}
    lines = [f"{k:24s} {b:10.4f} {a:10.4f}" for k, (b, a) in report.metrics.items()]
    items = [_privacy_item(i, row) for i, row in enumerate(report.per_secret.to_dict(orient="records"))]
    return report, {"metrics": metrics, "n_secrets": report.n_secrets, "flips": report.flips, "items": items},\
        [f"{'metric':24s} {'before':>10s} {'after':>10s}", *lines]


def _bias(model: Any, edit: Any, args: argparse.Namespace, opts: dict[str, Any]) -> tuple[Any, dict[str, Any], list[str]]:
    from mechedit.cli.inputs import read_contrastive
    from mechedit.edit import applied_edit
    from mechedit.evaluate import pair_preference

    _check_options(pair_preference, opts, set(), "the bias suite (pair_preference)")
    pairs = read_contrastive(args.data, limit=args.limit)
    before = pair_preference(model, pairs, **opts)
    after = None
    if edit is not None:
        with applied_edit(model, edit):
            after = pair_preference(model, pairs, **opts)
    result = {"before": before.to_dict(), "after": None if after is None else after.to_dict(), "items": _bias_items(pairs, before, after)}
    line = f"advantaged side preferred: {before.percent:.1f} % of {before.n_pairs} pairs"
    if after is not None:
        line += f" -> {after.percent:.1f} % with the edit"
    return None, result, [line]


def _privacy_item(i: int, row: dict[str, Any]) -> dict[str, Any]:
    """A ``per_secret`` row with its ``<metric>_before`` / ``_after`` columns as ``before`` / ``after`` dicts."""
    out: dict[str, Any] = {"eval": "privacy", "suite": "privacy", "item": i, "before": {}, "after": {}}
    for key, value in row.items():
        stem, _, when = key.rpartition("_")
        if when in ("before", "after") and stem:
            out[when][stem] = value
        else:
            out[key] = value
    return out


def _bias_items(pairs: list[Any], before: Any, after: Any) -> list[dict[str, Any]]:
    """One dict per scored pair: its score difference (advantaged - disadvantaged) before/after.

    The pair's texts are given when no pair was skipped (only then do scores line up with ``pairs``).
    """
    aligned = not before.skipped
    out = []
    for i, diff in enumerate(before.differences.tolist()):
        row: dict[str, Any] = {"eval": "bias", "suite": "bias", "item": i}
        if aligned:
            row.update(advantaged=pairs[i].advantaged, disadvantaged=pairs[i].disadvantaged)
        row["before"] = {"difference": diff, "preferred": float(diff > 0)}
        if after is not None:
            d = float(after.differences[i])
            row["after"] = {"difference": d, "preferred": float(d > 0)}
        out.append(row)
    return out


# fact_edit_suites' keywords, plus two that only shrink the cases (a quick run): same_subject=false
# drops the people's other facts, fluency_texts=N keeps the first N held-out texts for perplexity
_ROBUSTNESS_CASE_OPTIONS = ("neighbours_per_fact", "mc_rotations", "candidates", "same_subject", "fluency_texts")
_ROBUSTNESS_RETAIN = 12


def _robustness_options(opts: dict[str, Any]) -> None:
    import dataclasses

    from mechedit.evaluate.robustness import RobustnessConfig

    known = {f.name for f in dataclasses.fields(RobustnessConfig)} | set(_ROBUSTNESS_CASE_OPTIONS)
    unknown = sorted(set(opts) - known)
    if unknown:
        raise UsageError(f"the robustness suite takes no option {unknown[0]!r}; its options: {', '.join(sorted(known))}")
    n = opts.get("fluency_texts")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise UsageError(f"fluency_texts is a count of the world's held-out texts (an int >= 0), got {n!r}")
    if not isinstance(opts.get("same_subject", True), bool):
        raise UsageError(f"same_subject is true or false, got {opts['same_subject']!r}")


def _robustness(model: Any, edit: Any, args: argparse.Namespace, opts: dict[str, Any],
                ctx: Context) -> tuple[Any, dict[str, Any], list[str]]:
    import dataclasses

    from mechedit.cli.inputs import WorldSpec, world_facts
    from mechedit.evaluate import fact_edit_suites
    from mechedit.evaluate.robustness import RobustnessConfig, robustness_report

    spec = WorldSpec.parse(args.data)
    if spec is None:
        raise UsageError("the robustness suite needs a fact-world selection as --data (e.g. factworld:P19 --limit 6): "
                         "its cases come from the world's templates, neighbours and multiple choice")
    case_opts = {k: opts[k] for k in _ROBUSTNESS_CASE_OPTIONS if k in opts}
    config = RobustnessConfig(**{k: v for k, v in opts.items() if k not in case_opts})
    world, facts = world_facts(spec, args.limit)
    same_subject = case_opts.pop("same_subject", True)
    if "fluency_texts" in case_opts:
        case_opts["fluency_texts"] = list(world.text_heldout[: case_opts["fluency_texts"]])
    forgotten = set(facts)
    if args.retain is not None:
        retain_spec = WorldSpec.parse(args.retain)
        if retain_spec is None or retain_spec.world != spec.world:
            raise UsageError(f"--retain must be a selection of the same fact world as --data ({spec.world}:...)")
        _, retain = world_facts(retain_spec, None)
    else:
        relations = {f.relation_id for f in facts}
        retain = [f for f in world.facts if f.relation_id in relations and f not in forgotten][:_ROBUSTNESS_RETAIN]
    new = None if args.new is None else [args.new] * len(facts)
    forget_case = fact_edit_suites(world, facts, new, exclude=retain, **case_opts)
    retain_case = fact_edit_suites(world, retain, case="retain", neighbours_per_fact=0,
                                   **{k: v for k, v in case_opts.items() if k != "neighbours_per_fact"})
    if not same_subject:
        forget_case = dataclasses.replace(forget_case, same_subject=())
        retain_case = dataclasses.replace(retain_case, same_subject=())
    # the attacks need the original and the edited model side by side: a second load, never a copy
    edited = load_model(ctx, args.model)
    edit.apply(edited)
    report = robustness_report(model, edited, forget_case, retain_case, config=config, progress=ctx.progress)
    result = {"headline": robustness_headline(report), "rows": report.to_frame().to_dict(orient="records")}
    h = result["headline"]
    lines = [f"{'':28s} {'original':>9s} {'edited':>9s}"]
    lines += [f"{case + ' ' + h['measure']:28s} {h[case]['original']:9.4f} {h[case]['edited']:9.4f}" for case in ("forget", "retain")]
    lines += [f"recovery {name:19s} {value:9.4f}" for name, value in h["recovery"].items()]
    return report, result, lines


def robustness_headline(report: Any) -> dict[str, Any]:
    """A robustness report's headline: forget (or edit) and retain efficacy of the true answers
    (original vs edited; ``case`` is the forget case's label) and each attack's recovery on the
    held-out half (``choice_accuracy_true`` where the prompts list candidates, else greedy
    ``exact_true``; NaN recovery: the edit did not move that score)."""
    measures = {r.measure for r in report.rows if r.suite == "efficacy"}
    measure = "choice_accuracy_true" if "choice_accuracy_true" in measures else "exact_true"
    # the forget case is labelled "edit" when it carries new answers (fact_edit_suites' case)
    forget = next(r.case for r in report.rows if r.case not in ("retain", "forget_heldout"))
    out: dict[str, Any] = {"measure": measure, "case": forget}
    for key, case in (("forget", forget), ("retain", "retain")):
        row = report.get("efficacy", measure, "none", case=case)
        out[key] = {"original": row.original, "edited": row.edited, "n": row.n}
    attacks = report.context.get("config", {}).get("attacks", [])
    recovery = {}
    for name in attacks:
        rows = [r for r in report.rows if r.attack == name and r.case == "forget_heldout"
                and (r.suite == "probe" or (r.suite, r.measure) == ("efficacy", measure))]
        if rows:
            recovery[name] = rows[0].recovery
    out["recovery"] = recovery
    return out


def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.suite not in SUITES:
        raise UsageError(f"unknown suite {args.suite!r}; choose one of {', '.join(SUITES)}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.suite != "facts" and (args.paraphrases or args.neighbours):
        raise UsageError("--paraphrases and --neighbours belong to the facts suite")
    if args.suite not in ("facts", "robustness") and args.new:
        raise UsageError("--new belongs to the facts and robustness suites")
    if args.retain is not None and args.suite != "robustness":
        raise UsageError("--retain belongs to the robustness suite")
    if args.suite == "robustness" and args.edit is None:
        raise UsageError("the robustness suite attacks an edit: pass --edit edits/NAME (from mechedit edit)")
    if args.out is not None:
        check_new_output(args.out, what="--out", overwrite=args.overwrite)
        if args.suite == "bias" and not args.out.endswith(".json"):
            raise UsageError("--out must be a .json file")
    if args.edit is not None and not (Path(args.edit) / "manifest.json").is_file():
        raise FileNotFoundError(f"--edit {args.edit!r} is not an edit folder (no manifest.json)")
    opts = parse_options(args.options)
    if args.suite == "robustness":
        _robustness_options(opts)

    model = load_model(ctx, args.model)
    edit = None
    if args.edit is not None:
        from mechedit.edit import load_edit

        edit = load_edit(args.edit)
    ctx.say(f"evaluating the {args.suite} suite ...")
    if args.suite == "robustness":
        report, result, lines = _robustness(model, edit, args, opts, ctx)
    else:
        suite = {"facts": _facts, "privacy": _privacy, "bias": _bias}[args.suite]
        facts_edit = edit if edit is not None or args.suite != "facts" else contextlib.nullcontext
        report, result, lines = suite(model, facts_edit, args, opts)
    items = result.pop("items", [])  # per-item rows (a suite may have none): only `mechedit run` keeps them
    files = {}
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if report is not None:
            files["report"] = str(report.save(args.out))
        else:
            from mechedit.artifacts import write_json_atomic

            files["report"] = str(write_json_atomic(args.out, _finite(result)))
    summary = {"command": "eval", "suite": args.suite, "model": args.model, "edit": args.edit,
               "data": args.data, **result, "files": files}
    if ctx.record is not None:
        summary["items"] = items
    emit(ctx, _finite(summary), lines + [f"report -> {files['report']}" for _ in files])
    return 0
