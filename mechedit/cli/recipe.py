"""``mechedit run RECIPE.yaml``: locate -> select -> edit -> evaluate in one go, into a run folder.

A recipe is YAML validated against ``Recipe`` (pydantic): unknown keys are rejected, and every
error names the key and its line. The run folder ``<runs>/<name>-<UTC timestamp>/`` (``-2``, ``-3``, ... for
more runs of the recipe within the same second) holds
``params.json`` (the resolved recipe, the seed and library versions), ``circuit.json`` (+ scores),
``edit/``, ``report-<suite>.json`` per evaluation, ``results.jsonl`` (one line per evaluated item:
each prompt of the facts suites, each secret, each bias pair, with its before/after values) and
``summary.json`` (every step's summary). It
is built under a hidden ``.<name>-<timestamp>.partial`` name and renamed when complete, so a crash
leaves nothing that looks like a finished run; ``report.html`` (``mechedit report``'s page) is
then written into the finished folder (``--no-report``: not). ``mechedit run runs/X/params.json`` reruns it.

The steps are the commands ``locate``, ``edit`` and ``eval`` with the recipe's settings, so a
recipe means exactly what the same command lines mean.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from mechedit.cli._common import Context, UsageError, emit, stamped_folder

EXAMPLES = """example:
  mechedit run recipes/factworld_forget_city.yaml            # -> runs/factworld-forget-city-<timestamp>/
  mechedit run runs/factworld-forget-city-<timestamp>/params.json   # the same run again"""


def _models() -> dict[str, Any]:
    """The schema, built on first use (pydantic is imported only by ``mechedit run``)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Locate(Strict):
        method: str
        data: str | None = None  # default: the recipe's data
        site: str | None = None
        template: int | None = None
        limit: int | None = Field(default=None, ge=1)
        retain: str | None = None
        options: dict[str, Any] = {}

    class Select(Strict):
        top_k: int | None = Field(default=None, ge=1)
        threshold: float | None = None
        by: Literal["value", "abs"] = "value"
        per_layer: bool = False

        @model_validator(mode="after")
        def _one_rule(self) -> Select:
            if self.top_k is not None and self.threshold is not None:
                raise ValueError("give top_k or threshold, not both")
            return self

    class Edit(Strict):
        method: Literal["zero", "mean", "finetune", "rank-one", "pcgu", "f-learning"]
        data: str | None = None
        dev: str | None = None  # pcgu's checkpoint pairs
        limit: int | None = Field(default=None, ge=1)
        new: str | None = None
        retain: str | None = None
        texts: str | None = None
        hooks: bool = False
        options: dict[str, Any] = {}

    class Evaluate(Strict):
        suite: Literal["facts", "privacy", "bias", "robustness"]
        data: str | None = None
        retain: str | None = None  # robustness's retained facts
        limit: int | None = Field(default=None, ge=1)
        new: str | None = None
        options: dict[str, Any] = {}

    class Recipe(Strict):
        name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
        model: str
        data: str
        seed: int = 0
        device: str | None = None
        locate: Locate
        select: Select = Select()
        edit: Edit | None = None
        evaluate: list[Evaluate] = []

    return {"Recipe": Recipe}


# --- reading -------------------------------------------------------------------------------------


def _lines(node: Any, path: tuple = (), seen: frozenset[int] = frozenset()) -> dict[tuple, int]:
    """YAML key path -> 1-based line, from the composed node tree (for error messages).

    ``seen`` holds the nodes on the current path: an alias of its own ancestor (``&a [*a]``) is a
    cycle, not a tree, and is walked once.
    """
    import yaml

    out = {path: node.start_mark.line + 1}
    if id(node) in seen:
        return out
    seen = seen | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            out.update(_lines(value, (*path, name), seen))
            out[(*path, name)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_lines(item, (*path, i), seen))
    return out


def load_recipe(path: str | os.PathLike) -> Any:
    """The validated ``Recipe`` in a YAML file (or a run folder's ``params.json``).

    Raises ``UsageError`` naming the file, line and key of the first problem.
    """
    import yaml
    from pydantic import ValidationError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no recipe file {str(p)!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{p}: not a UTF-8 text file, so not a recipe: {err}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise UsageError(f"{where}: not valid YAML: {problem}") from None
    lines = _lines(node) if node is not None else {}
    if p.name == "params.json" and isinstance(data, dict) and "recipe" in data:
        data, lines = data["recipe"], {k[1:]: v for k, v in lines.items() if k[:1] == ("recipe",)}
    if not isinstance(data, dict):
        raise UsageError(f"{p}: a recipe is a mapping of keys (name, model, data, locate, ...), got {type(data).__name__}")
    try:
        return _models()["Recipe"].model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(first["loc"])
        key = ".".join(map(str, loc)) or "(top level)"
        # YAML keys are text in the node tree; a key like 1 reaches pydantic as an int
        line = next((lines[found[:n]] for found in (loc, tuple(map(str, loc))) for n in range(len(found), 0, -1)
                     if found[:n] in lines), lines.get(()))
        what = "unknown key (not in the recipe schema)" if first["type"] == "extra_forbidden" else first["msg"]
        extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        where = str(p) if line is None else f"{p}:{line}"
        raise UsageError(f"{where}: {key}: {' '.join(str(what).split())}{extra}") from None


# --- running -------------------------------------------------------------------------------------


def _argv(step: str, fields: dict[str, Any], flags: dict[str, str]) -> list[str]:
    import json

    argv = [step]
    for key, flag in flags.items():
        value = fields.get(key)
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    for key, value in (fields.get("options") or {}).items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return argv


def step_argvs(recipe: Any, folder: Path) -> list[list[str]]:
    """The ``locate`` / ``edit`` / ``eval`` command lines the recipe stands for, writing into ``folder``."""
    r = recipe.model_dump()
    loc = {**r["locate"], **r["select"], "model": r["model"], "data": r["locate"]["data"] or r["data"],
           "seed": r["seed"], "out": folder / "circuit.json"}
    argvs = [[*_argv("locate", loc, {"model": "--model", "data": "--data", "site": "--site", "template": "--template",
                                     "limit": "--limit", "retain": "--retain", "top_k": "--top-k",
                                     "threshold": "--threshold", "by": "--by", "per_layer": "--per-layer",
                                     "seed": "--seed", "out": "--out"}), r["locate"]["method"]]]
    if r["edit"] is not None:
        ed = {**r["edit"], "model": r["model"], "circuit": folder / "circuit.json", "out": folder / "edit"}
        argvs.append(_argv("edit", ed, {"model": "--model", "circuit": "--circuit", "method": "--method",
                                        "data": "--data", "dev": "--dev", "limit": "--limit", "new": "--new", "retain": "--retain",
                                        "texts": "--texts", "hooks": "--hooks", "out": "--out"}))
    for ev in r["evaluate"]:
        fields = {**ev, "model": r["model"], "data": ev["data"] or r["data"], "out": folder / f"report-{ev['suite']}.json",
                  "edit": folder / "edit" if r["edit"] is not None else None}
        argvs.append(_argv("eval", fields, {"model": "--model", "edit": "--edit", "suite": "--suite", "data": "--data",
                                           "limit": "--limit", "new": "--new", "retain": "--retain", "out": "--out"}))
    return argvs


def _prevalidate(parser: argparse.ArgumentParser, argvs: list[list[str]]) -> list[argparse.Namespace]:
    """Parse every step and run its checks before anything loads or any folder exists."""
    from mechedit.cli import edit as edit_cmd
    from mechedit.cli import locate as locate_cmd
    from mechedit.cli._common import parse_options

    parsed = []
    for argv in argvs:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            raise UsageError(f"the recipe's {argv[0]} step is not a valid command: mechedit {' '.join(argv)}") from None
        opts = parse_options(args.options)
        if args.command == "locate":
            if args.method not in locate_cmd.LOCATORS:
                raise UsageError(f"locate.method: unknown locator {args.method!r}; choose one of {', '.join(locate_cmd.LOCATORS)}")
            locate_cmd.check_options(args.method, locate_cmd.LOCATORS[args.method], opts)
        elif args.command == "edit":
            edit_cmd._check_args(args, opts)
        parsed.append(args)
    return parsed


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", parents=parents, help="run a YAML recipe (locate, select, edit, evaluate) into a run folder",
                       description=__doc__.split("\n\n")[1], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe .yaml, or a run folder's params.json to rerun it")
    p.add_argument("--runs", default="runs", help="where run folders go (default: runs)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report (`mechedit report RUN_DIR` writes it later)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from mechedit.artifacts import write_json_atomic, write_jsonl_atomic
    from mechedit.cli import build_parser
    from mechedit.provenance import library_versions

    recipe = load_recipe(args.recipe)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    runs = Path(args.runs)
    final, partial = stamped_folder(runs, recipe.name, stamp)
    steps = _prevalidate(build_parser(), step_argvs(recipe, partial))

    import torch

    torch.manual_seed(recipe.seed)
    inner = Context(device=recipe.device or ctx.device, quiet=ctx.quiet, json=ctx.json, record=[])
    made_runs = not runs.exists()
    partial.mkdir(parents=True)
    try:
        write_json_atomic(partial / "params.json", {"recipe": recipe.model_dump(), "versions": library_versions(),
                                                   "steps": [["mechedit", *map(str, s)] for s in step_argvs(recipe, final)]})
        for step in steps:
            inner.say(f"== {step.command}")
            step.run(step, inner)
        # the evaluations' per-item rows go to results.jsonl, not into summary.json
        write_jsonl_atomic(partial / "results.jsonl", [row for step in inner.record for row in step.pop("items", [])])
        summary = {"name": recipe.name, "recipe": str(args.recipe), "steps": _relocated(inner.record, partial, final)}
        write_json_atomic(partial / "summary.json", summary)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays behind
        if made_runs and not any(runs.iterdir()):
            runs.rmdir()  # nor the runs folder this call created
        raise
    report = None if getattr(args, "no_report", False) else _html_report(final)
    emit(ctx, {"command": "run", "folder": str(final), **summary, **({"report": str(report)} if report else {})},
         [f"run folder: {final}", *([f"report: {report}"] if report else [])])
    return 0


def _html_report(folder: Path) -> Path | None:
    """``folder/report.html`` (``mechedit report``'s page), written once the run is complete.

    A failure here is reported and leaves the finished run folder as it is.
    """
    import sys

    try:
        from mechedit.viz.run_report import write_run_report

        return write_run_report(folder)
    except Exception as err:
        sys.stderr.write(f"mechedit run: the HTML report failed ({type(err).__name__}: {err}); "
                         f"write it with `mechedit report {folder}`\n")
        return None


def _relocated(value: Any, old: Path, new: Path) -> Any:
    """``value`` with paths inside the partial folder rewritten to the final folder's."""
    if isinstance(value, str):
        return value.replace(str(old), str(new))
    if isinstance(value, dict):
        return {k: _relocated(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocated(v, old, new) for v in value]
    return value
