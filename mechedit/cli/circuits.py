"""``mechedit circuits``: rebuild (or ``--check``) the ``circuits/`` library of the shipped models.

The library holds, one JSON circuit file each (``mechedit.circuit`` format):

* ``<recipe name>.json`` for every example recipe in ``recipes/``: the recipe's ``locate`` and
  ``select`` steps only, run exactly as ``mechedit run`` runs them (same command line, seed
  ``torch.manual_seed(recipe.seed)``), with one torch thread so the numbers do not depend on the
  machine's core count. Its provenance is the locator's (model name, weights hash, data hash) with
  ``seed`` the recipe's seed where the locator records none, and ``extra["recipe"]`` the recipe
  file. ``config["component_scores"]`` holds the locator's score of each selected component, in
  the circuit's order (absent for DEPN, which selects by votes and keeps no scores);
* ``factworld-planted_ground_truth.json`` and ``factworld_demo.json`` (``mechedit.library``): the
  planted model's ground-truth MLP, and the demo's circuit.

``--check`` rebuilds into a temporary folder and compares with the files in ``--out``: the
selected components must be equal and in the same order; every other value equal, numbers within
``|fresh - committed| <= ATOL + RTOL * |committed|`` (``RTOL = 1e-4``, ``ATOL = 1e-5``: far above
float32 reordering noise between BLAS builds and CPUs, and one unit of the fifth decimal the files
round to, far below any change of method or data); the
``mechedit_version`` of the provenance is not compared. Exit code 1 lists each difference
(file, key, both values); 0 when every file matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechedit.cli._common import Context, UsageError, emit, quiet_loading

RTOL = 1e-4
ATOL = 1e-5
#: provenance keys not compared by --check: a new release does not change a circuit
_IGNORED = (("provenance", "mechedit_version"),)

EXAMPLES = """examples:
  mechedit circuits                                   # rewrite circuits/*.json from recipes/*.yaml
  mechedit circuits --check                           # rebuild in a temp folder, compare; exit 1 on a difference
  mechedit circuits --only factworld-knowledge-neurons-zero --check
  mechedit circuits --out /tmp/lib --recipes my_recipes"""


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("circuits", parents=parents, help="rebuild (or --check) the circuits/ library from the example recipes",
                       description=__doc__, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="circuits", help="the library folder: written, or with --check compared (default: circuits)")
    p.add_argument("--recipes", default="recipes", help="the folder of example recipes (default: recipes)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these circuits (file stems, e.g. factworld-pcgu-bias)")
    p.add_argument("--check", action="store_true", help="compare a fresh rebuild with --out instead of writing; exit 1 on a difference")
    p.set_defaults(run=run)


# --- the entries ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One library file: its name (the file stem), where it comes from, and how to build it."""

    name: str
    source: str
    build: Callable[[Context], Any]


def entries(recipes: Path) -> list[Entry]:
    """Every circuit of the library: one per recipe in ``recipes`` (sorted), then ground truth and demo."""
    from mechedit.cli.recipe import load_recipe

    if not recipes.is_dir():
        raise UsageError(f"--recipes {str(recipes)!r} is not a folder of recipe .yaml files")
    out = []
    for path in sorted(recipes.glob("*.yaml")):
        recipe = load_recipe(path)
        out.append(Entry(recipe.name, f"{recipes.name}/{path.name}",
                         lambda ctx, path=path: recipe_circuit(path, ctx)))
    from mechedit import library, zoo

    for name in library.PLANTED:
        if name in zoo.NAMES:
            out.append(Entry(f"{name}_ground_truth", f"mechedit.library.planted_ground_truth({name!r})",
                             lambda ctx, name=name: library.planted_ground_truth(name)))
    out.append(Entry("factworld_demo", "mechedit.library.demo_circuit()",
                     lambda ctx: library.demo_circuit(progress=ctx.progress)))
    names = [e.name for e in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"two library circuits would be named {twice[0]!r}: give the recipes distinct names")
    return out


def recipe_circuit(path: Path, ctx: Context) -> Any:
    """The circuit of a recipe's ``locate`` + ``select`` steps, with the library's provenance."""
    import torch

    from mechedit.circuit import Circuit
    from mechedit.cli import build_parser
    from mechedit.cli.recipe import _prevalidate, load_recipe, step_argvs
    from mechedit.scores import Scores

    recipe = load_recipe(path)
    with tempfile.TemporaryDirectory() as tmp:
        (locate,) = _prevalidate(build_parser(), step_argvs(recipe, Path(tmp))[:1])
        torch.manual_seed(recipe.seed)  # as `mechedit run` seeds its steps
        record: list[dict[str, Any]] = []
        locate.run(locate, Context(device=recipe.device or ctx.device, quiet=True, json=True, record=record))
        files = record[-1]["files"]
        circuit = Circuit.load(files["circuit"])
        scores = Scores.load(files["scores"]) if "scores" in files else None
    prov = circuit.provenance
    prov = dataclasses.replace(prov, seed=recipe.seed if prov.seed is None else prov.seed,
                               extra={**prov.extra, "recipe": f"{path.parent.name}/{path.name}"})
    config = dict(circuit.config)
    if scores is not None:
        config["component_scores"] = component_scores(scores, circuit)
    return Circuit(circuit.components, method=circuit.method, config=config, provenance=prov,
                   description=circuit.description)


def component_scores(scores: Any, circuit: Any) -> list[float | None]:
    """``scores``' value of each component of ``circuit``, in its order (``None``: not a cell of ``scores``).

    A component matches the cell with its layer / head / neuron / (param, unit), and its ``pos``
    when the scores have a ``pos`` axis.
    """
    offsets = {} if scores.partitions is None else {param: offset for param, offset, _ in scores.partitions.rows}
    out: list[float | None] = []
    for c in circuit:
        index = []
        for axis in scores.axes:
            if axis == "partition":
                value = offsets.get(c.param, math.nan) + (c.unit or 0)
            else:
                value = getattr(c, axis, None) if c.site == scores.site else None
            index.append(value)
        if any(v is None or v != v for v in index) or not all(0 <= i < n for i, n in zip(index, scores.shape, strict=True)):
            out.append(None)
        else:
            out.append(float(scores.values[tuple(int(i) for i in index)]))
    return out


# --- comparing -----------------------------------------------------------------------------------


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= ATOL + RTOL * abs(b)


def _rows(doc: dict[str, Any]) -> list[str]:
    return [f"{site}{row}" for site, group in (doc.get("components") or {}).items() for row in group.get("rows", [])]


def _tied_reorder(committed: dict[str, Any], old: list[str], new: list[str]) -> bool:
    """True when ``new`` is ``old`` with only equally scored components (within tolerance, by the
    committed ``config.component_scores``) in another order - float noise between CPUs reorders ties."""
    scores = (committed.get("config") or {}).get("component_scores")
    if sorted(old) != sorted(new) or not isinstance(scores, list) or len(scores) != len(old):
        return False
    score = dict(zip(old, scores, strict=True))
    return all(a == b or _close(float(score[b]), float(score[a])) for a, b in zip(old, new, strict=True))


def component_differences(committed: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """The selected components' difference, one line (empty when the same, in the same order up to
    equally scored ones, see ``_tied_reorder``)."""
    old, new = _rows(committed), _rows(fresh)
    if old != new and not _tied_reorder(committed, old, new):
        at = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
        gone, added = [r for r in old if r not in new], [r for r in new if r not in old]
        return [f"components: {len(old)} committed, {len(new)} rebuilt; first difference at #{at}: "
                   f"committed {old[at] if at < len(old) else '(none)'}, rebuilt {new[at] if at < len(new) else '(none)'}"
                   + (f"; not rebuilt: {', '.join(gone[:5])}" if gone else "")
                   + (f"; new: {', '.join(added[:5])}" if added else "")]
    return []


def differences(committed: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """What differs between a committed circuit file's JSON and a fresh rebuild's, one line each.

    Components: exactly, in order (equally scored ones in any order). Everything else:
    recursively, numbers within ``RTOL`` / ``ATOL``.
    """
    out = component_differences(committed, fresh)
    rest = {k: v for k, v in committed.items() if k != "components"}
    _diff(rest, {k: v for k, v in fresh.items() if k != "components"}, (), out)
    return out


def _diff(a: Any, b: Any, path: tuple, out: list[str]) -> None:
    if path in _IGNORED:
        return
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(document)"
    numbers = (int, float)
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in b or key not in a:
                out.append(f"{where}.{key}: {'only in the committed file' if key in a else 'only in the rebuild'}")
            else:
                _diff(a[key], b[key], (*path, key), out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} committed entries, {len(b)} rebuilt")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _diff(x, y, (*path, i), out)
    elif (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool)
          and (isinstance(a, float) or isinstance(b, float))):
        if not _close(float(b), float(a)):
            out.append(f"{where}: committed {a!r}, rebuilt {b!r} (beyond rtol {RTOL:g} / atol {ATOL:g})")
    elif a != b or type(a) is not type(b):
        out.append(f"{where}: committed {a!r:.80}, rebuilt {b!r:.80}")


# --- the command ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, ctx: Context) -> int:

    recipes, out = Path(args.recipes), Path(args.out)
    chosen = entries(recipes)
    if args.only:
        known = {e.name for e in chosen}
        unknown = [n for n in args.only if Path(n).stem not in known]
        if unknown:
            raise UsageError(f"--only {unknown[0]!r} is not a library circuit; they are: {', '.join(sorted(known))}")
        wanted = {Path(n).stem for n in args.only}
        chosen = [e for e in chosen if e.name in wanted]
    if args.check and not out.is_dir():
        raise UsageError(f"--check compares with the library folder --out {str(out)!r}, which does not exist")

    import torch

    rows, lines = [], []
    threads = torch.get_num_threads()
    # one thread, as a sweep's jobs: the rebuilt numbers do not depend on the machine's core count
    torch.set_num_threads(1)
    try:
        _build_all(args, ctx, chosen, out, rows, lines)
    finally:
        torch.set_num_threads(threads)
    failed = [r["name"] for r in rows if r["status"] == "differs"]
    if failed:
        lines.append(f"{len(failed)} of {len(rows)} circuits differ from {out}: {', '.join(failed)} "
                     "(rebuild with `mechedit circuits` if the change is intended)")
    emit(ctx, {"command": "circuits", "check": bool(args.check), "out": str(out), "circuits": rows,
               "n_differ": len(failed)}, lines)
    return 1 if failed else 0


def _build_all(args: argparse.Namespace, ctx: Context, chosen: list[Entry], out: Path, rows: list[dict[str, Any]],
               lines: list[str]) -> None:
    """Build each entry and write it to ``out`` or (``--check``) compare it with ``out``'s file."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        for entry in chosen:
            ctx.say(f"{'checking' if args.check else 'building'} {entry.name} ({entry.source}) ...")
            t = time.perf_counter()
            with quiet_loading(ctx):
                circuit = entry.build(ctx)
            seconds = round(time.perf_counter() - t, 2)
            target = out / f"{entry.name}.json"
            row = {"name": entry.name, "source": entry.source, "file": str(target), "n_components": len(circuit),
                   "seconds": seconds}
            if args.check:
                fresh = json.loads(circuit.save(Path(tmp) / target.name).read_text(encoding="utf-8"))
                if not target.is_file():
                    diffs = [f"{target} is missing: rebuild it with `mechedit circuits --only {entry.name}`"]
                else:
                    diffs = differences(json.loads(target.read_text(encoding="utf-8")), fresh)
                row.update(status="same" if not diffs else "differs", differences=diffs)
                lines += [f"{target}: {'same' if not diffs else 'DIFFERS'} ({len(circuit)} components, {seconds} s)"]
                lines += [f"  {target}: {d}" for d in diffs]
            else:
                out.mkdir(parents=True, exist_ok=True)
                circuit.save(target)
                row.update(status="written")
                lines.append(f"{target}: {len(circuit)} components ({seconds} s)")
            rows.append(row)
