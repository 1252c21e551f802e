"""``mechedit sweep RECIPE.yaml --over facts|seeds|k=V1,V2,...``: one recipe run per item, in one table.

Jobs. Each job is the recipe with one change, run exactly as ``mechedit run`` runs it (same
steps, same seeding) into its own run folder:

* ``--over facts``: one job per fact the recipe's ``data`` selects (``--limit N``: the first N).
  A fact-world selection ``factworld:P19`` becomes ``factworld:P19:<subject>`` per person; a file
  of records becomes one one-record file per record (``jobs/<label>.jsonl``). The steps that read
  the recipe's ``data`` (no ``data`` of their own, or the same one) read the job's fact;
* ``--over seeds --seeds 0,1,2``: one job per ``seed``;
* ``--over k=8,16,32``: one job per ``select.top_k``; any recipe key works the same way, dotted,
  e.g. ``--over locate.limit=1,2`` or ``--over locate.options.steps=5,10`` (values read as JSON
  where they parse). A value the recipe schema rejects fails its job, not the sweep.

Where. Locally a process pool by default: ``--workers N`` (default 1) ``spawn``-ed processes,
each with one torch thread (``--workers 0``: one job after another in this process). With
``--ray ADDRESS`` the jobs are Ray tasks (one CPU each) on that cluster; ``--ray local`` starts a
local instance with ``max(1, --workers)`` CPUs. Ray is an optional extra
(``pip install 'mechedit[ray]'``), imported only here. Every job sets one torch thread and the
recipe's seed, so the same recipe and seed give the same numbers in the pool, on Ray or by
``mechedit run``.

Failures. A job that fails (any exception, bad input included, or a lost worker) is retried up
to ``--retries`` times (default 1), after the first round of all jobs. A job that still fails
keeps its row: status ``failed``, its one-line error, its attempts. The exit code is 1 when any
job finally failed, else 0.

Output. ``<sweeps>/<name>-<UTC timestamp>/`` holds ``jobs/<label>.yaml`` (each job's recipe),
``runs/<name>-<label>-<timestamp>/`` (each job's run folder, as ``mechedit run`` writes it),
``sweep.csv`` and ``sweep.jsonl`` (one row per job: ``label``, ``over``, ``value``, ``status``,
``attempts``, ``error``, ``run_folder``, then the job's numbers: ``<suite>/<case>/<suite>/
<measure>/<metric>/before|after`` of each evaluation and ``locate/n_components``). It is built
under a hidden ``.<name>-<timestamp>.partial`` name and renamed when every job has finished (the
paths inside are rewritten to the final name), so an interrupted sweep leaves nothing that looks
complete. A table of the main numbers is printed (``--json``: one JSON object with every row).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechedit.cli._common import Context, UsageError, emit, stamped_folder

EXAMPLES = """examples:
  mechedit sweep recipes/factworld_forget_city.yaml --over facts --limit 8 --workers 2
  mechedit sweep recipes/factworld_forget_city.yaml --over seeds --seeds 0,1,2
  mechedit sweep recipes/factworld_forget_city.yaml --over k=8,16,32 --ray local
  mechedit sweep recipes/factworld_forget_city.yaml --over facts --ray ray://head:10001 --retries 2"""

#: ``--over`` short names -> recipe key paths
ALIASES = {"k": ("select", "top_k"), "seed": ("seed",), "seeds": ("seed",)}
_COLUMNS = ["label", "over", "value", "status", "attempts", "error", "run_folder"]
#: the numbers the printed table shows first (suffixes of the number columns)
_HEADLINE = ("efficacy/generated/exact_true/after", "paraphrase/generated/exact_true/after",
             "neighbourhood/generated/exact_true/after", "same_subject/generated/exact_true/after",
             "fluency/teacher_forced/perplexity/after")


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sweep", parents=parents, help="run a recipe once per fact, seed or option value; one table",
                       description=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe .yaml (or a run folder's params.json)")
    p.add_argument("--over", required=True, help="facts, seeds, or KEY=V1,V2,... (k=8,16 is select.top_k)")
    p.add_argument("--seeds", help="with --over seeds: the seeds, e.g. 0,1,2")
    p.add_argument("--limit", type=int, help="with --over facts: only the first N facts / records")
    p.add_argument("--workers", type=int, default=1, help="pool processes (default 1; 0: run in this process)")
    p.add_argument("--ray", metavar="ADDRESS", help="run the jobs on this Ray cluster ('local': start one here)")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed job (default 1)")
    p.add_argument("--sweeps", default="sweeps", help="where sweep folders go (default: sweeps)")
    p.set_defaults(run=run)


# --- the jobs ------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def _fact_items(recipe: Any, limit: int | None, jobs_dir: Path) -> list[tuple[str, Any, str, str | None]]:
    """``(label, value, data, file text)`` per fact of the recipe's data.

    For a file, ``data`` is a one-record file in ``jobs_dir`` to be written with the text (not
    yet written: nothing is created before every job is planned).
    """
    from mechedit.cli.inputs import WorldSpec, _records, world_facts

    spec = WorldSpec.parse(recipe.data)
    items = []
    if spec is not None:
        _, facts = world_facts(spec, limit)
        for i, f in enumerate(facts):
            items.append((f"fact{i}-{_slug(f.subject)}", f.subject, f"{spec.world}:{f.relation_id}:{f.subject}", None))
    else:
        records, _ = _records(recipe.data, limit)
        suffix = Path(recipe.data).suffix.lower()
        for i, rec in enumerate(records):
            name = rec.get("subject") or rec.get("id") or rec.get("prompt") or i
            label = f"fact{i}-{_slug(str(name))[:40]}"
            if suffix == ".csv":  # CrowS-Pairs rows keep their reader
                text = io.StringIO()
                writer = csv.DictWriter(text, fieldnames=list(rec))
                writer.writeheader()
                writer.writerow(rec)
                path, content = jobs_dir / f"{label}.csv", text.getvalue()
            else:
                path, content = jobs_dir / f"{label}.jsonl", json.dumps(rec, default=str) + "\n"
            items.append((label, name, str(path), content))
    return items


def _data_steps(tree: dict[str, Any], data: str) -> list[tuple[str, ...]]:
    """The key paths that read the recipe's ``data``: itself and steps with none (or the same) of their own."""
    paths: list[tuple[str, ...]] = [("data",)]
    for step in ("locate", "edit"):
        if isinstance(tree.get(step), dict) and tree[step].get("data") in (None, data):
            paths.append((step, "data"))
    for i, ev in enumerate(tree.get("evaluate") or []):
        if ev.get("data") in (None, data):
            paths.append(("evaluate", i, "data"))  # type: ignore[arg-type]
    return paths


def plan_jobs(recipe: Any, over: str, *, seeds: str | None, limit: int | None, jobs_dir: Path) -> list[dict[str, Any]]:
    """The jobs of a sweep: ``{"label", "over", "value", "recipe": dict, ...}`` each; creates nothing.

    The job recipes are not validated here: a value the schema rejects fails its own job. With
    ``--over facts`` on file data, ``job["data_file"]`` is ``(path in jobs_dir, text)`` to write.
    Raises ``UsageError`` for an ``--over`` that names nothing to sweep.
    """
    import copy

    base = recipe.model_dump()
    jobs = []
    if over == "facts":
        if seeds is not None:
            raise UsageError("--seeds belongs to --over seeds")
        paths = _data_steps(base, recipe.data)
        for label, value, data, content in _fact_items(recipe, limit, jobs_dir):
            tree = copy.deepcopy(base)
            for path in paths:
                node = tree
                for key in path[:-1]:
                    node = node[key]
                # a step without data of its own keeps reading the recipe's (now the job's) data
                node[path[-1]] = data if path == ("data",) or node.get(path[-1]) is not None else None
            jobs.append({"over": "facts", "value": value, "label": label, "recipe": tree,
                         "data_file": None if content is None else (data, content)})
        return jobs
    if limit is not None:
        raise UsageError("--limit belongs to --over facts")
    if over == "seeds":
        if not seeds:
            raise UsageError("--over seeds needs --seeds, e.g. --seeds 0,1,2")
        key, texts = "seed", seeds
    else:
        key, sep, texts = over.partition("=")
        if not sep or not key.strip() or not texts.strip():
            raise UsageError(f"--over {over!r}: expected facts, seeds or KEY=V1,V2,... (e.g. k=8,16)")
        if seeds is not None:
            raise UsageError("--seeds belongs to --over seeds")
    key = key.strip()
    path = ALIASES.get(key, tuple(key.split(".")))
    values = [_parse_value(t) for t in texts.split(",") if t.strip()]
    if not values:
        raise UsageError(f"--over {over!r}: no values")
    labels = [f"{_slug(path[-1] if key not in ALIASES else key.rstrip('s'))}{_slug(str(v))}" for v in values]
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        tree = copy.deepcopy(base)
        _set(tree, path, value)
        if path == ("select", "top_k"):
            tree["select"]["threshold"] = None  # a top-k sweep replaces a threshold rule
        jobs.append({"over": key, "value": value, "label": label if labels.count(label) == 1 else f"{label}-{i}",
                     "recipe": tree})
    return jobs


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job (``mechedit run`` of its recipe file) and report ``{"status", "error", "summary"}``.

    Never raises: a failure is the job's result (``status="failed"``, a one-line ``error``), so
    the pool and Ray report it the same way. Runs with one torch thread, restored afterwards.
    """
    import torch

    from mechedit.cli import _bad_input, _one_line
    from mechedit.cli import recipe as recipe_cmd

    threads = torch.get_num_threads()
    cwd = os.getcwd()
    torch.set_num_threads(1)
    try:
        if job.get("cwd") and Path(job["cwd"]).is_dir():  # Ray workers start elsewhere; relative data paths
            os.chdir(job["cwd"])
        record: list[dict[str, Any]] = []
        ctx = Context(device=job.get("device"), quiet=True, json=True, record=record)
        # no HTML page per job (5 MB each, plotly inline): `mechedit report` builds one on demand
        recipe_cmd.run(argparse.Namespace(recipe=job["file"], runs=job["runs"], no_report=True), ctx)
        return {"status": "ok", "error": None, "summary": record[-1]}
    except Exception as err:
        kind = "" if isinstance(err, _bad_input()) else f"{type(err).__name__}: "
        return {"status": "failed", "error": kind + _one_line(err), "summary": None}
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


# --- the runners: jobs -> results, in order ------------------------------------------------------


def _serial() -> tuple[Callable[[list[dict[str, Any]]], list[dict[str, Any]]], Callable[[], None]]:
    return (lambda jobs: [run_job(j) for j in jobs]), (lambda: None)


def _pool(workers: int) -> tuple[Callable[[list[dict[str, Any]]], list[dict[str, Any]]], Callable[[], None]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    state: dict[str, Any] = {}

    def executor() -> ProcessPoolExecutor:
        if state.get("pool") is None:
            state["pool"] = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker)
        return state["pool"]

    def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        futures = [executor().submit(run_job, j) for j in jobs]
        out = []
        for future in futures:
            try:
                out.append(future.result())
            except Exception as err:  # a worker that died (BrokenProcessPool): the next round gets a new pool
                out.append({"status": "failed", "error": f"{type(err).__name__}: {err}", "summary": None})
                state["broken"] = True
        if state.pop("broken", False):
            state.pop("pool").shutdown(cancel_futures=True)
        return out

    def close() -> None:
        if state.get("pool") is not None:
            state["pool"].shutdown()

    return run, close


def _ray(address: str, workers: int) -> tuple[Callable[[list[dict[str, Any]]], list[dict[str, Any]]], Callable[[], None]]:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray, an optional extra: pip install 'mechedit[ray]'") from None

    started = not ray.is_initialized()
    if started:  # an instance this process already joined (e.g. a notebook's) is used as it is
        if address == "local":
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    task = ray.remote(num_cpus=1, max_retries=0)(run_job)  # retries are ours: the same rule as the pool

    def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        refs = [task.remote(j) for j in jobs]
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref))
            except Exception as err:  # a lost worker or node
                out.append({"status": "failed", "error": f"{type(err).__name__}: {' '.join(str(err).split())}",
                            "summary": None})
        return out

    def close() -> None:
        if started:
            ray.shutdown()

    return run, close


# --- the table -----------------------------------------------------------------------------------


def _numbers(summary: dict[str, Any]) -> dict[str, float | None]:
    """A run summary's numbers, flat: ``facts/<case>/<suite>/<measure>/<metric>/before|after``, ..."""
    out: dict[str, float | None] = {}

    def leaves(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            out[prefix] = float(value)
        elif isinstance(value, (int, float)) or value is None:
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                leaves(f"{prefix}/{k}", v)

    for step in summary.get("steps", []):
        if step.get("command") == "locate":
            out["locate/n_components"] = step.get("n_components")
        elif step.get("command") == "eval":
            suite = step.get("suite", "eval")
            if isinstance(step.get("rows"), list):
                for r in step["rows"]:
                    key = "/".join(str(r[k]) for k in ("case", "suite", "measure", "metric") if r.get(k))
                    out[f"{suite}/{key}/before"], out[f"{suite}/{key}/after"] = r.get("before"), r.get("after")
            else:
                for k, v in step.items():
                    if k not in ("command", "suite", "model", "edit", "data", "files"):
                        leaves(f"{suite}/{k}", v)
    return {k: v for k, v in out.items() if v is None or isinstance(v, (int, float))}


def _row(job: dict[str, Any], result: dict[str, Any], attempts: int) -> dict[str, Any]:
    summary = result.get("summary") or {}
    return {"label": job["label"], "over": job["over"], "value": job["value"], "status": result["status"],
            "attempts": attempts, "error": result["error"], "run_folder": summary.get("folder"),
            **_numbers(summary)}


def _write_table(folder: Path, rows: list[dict[str, Any]]) -> list[str]:
    from mechedit.artifacts import _write_atomic, write_jsonl_atomic

    columns = list(_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    write_jsonl_atomic(folder / "sweep.jsonl", rows)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})

    _write_atomic(folder / "sweep.csv", write)
    return columns


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    numbers = [c for c in columns if c not in _COLUMNS]
    shown = [c for suffix in _HEADLINE for c in numbers if c.endswith(suffix)]
    shown = (shown or [c for c in numbers if c.endswith("/after")] or numbers)[:6]
    heads = ["label", "value", "status", *(":".join(c.split("/")[-4::2]) if c.count("/") >= 4 else c for c in shown)]
    body = []
    for r in rows:
        cells = [str(r["label"]), str(r["value"]), r["status"] if r["attempts"] == 1 else f"{r['status']} ({r['attempts']} tries)"]
        for c in shown:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(heads, *body, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(cells, widths, strict=True)).rstrip() for cells in [heads, *body]]
    lines += [f"{r['label']}: failed: {r['error']}" for r in rows if r["status"] != "ok"]
    if shown:
        lines.append("columns (after the edit): " + ", ".join(shown))
    return lines


def _relocate_files(partial: Path, final: Path) -> None:
    """Rewrite the partial folder's path to the final one inside the sweep's text files (JSON, YAML)."""
    old, new = str(partial.resolve()), str(final.resolve())
    for path in partial.rglob("*"):
        if path.suffix in (".json", ".jsonl", ".yaml") and path.is_file():
            text = path.read_text(encoding="utf-8")
            if old in text:
                path.write_text(text.replace(old, new), encoding="utf-8")


# --- the command ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, ctx: Context) -> int:
    import yaml

    from mechedit.cli.recipe import _relocated, load_recipe

    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {args.retries}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    recipe = load_recipe(args.recipe)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    sweeps = Path(args.sweeps).resolve()
    final, partial = stamped_folder(sweeps, recipe.name, stamp)
    # every job planned (and every bad flag found) before any folder exists
    jobs = plan_jobs(recipe, args.over, seeds=args.seeds, limit=args.limit, jobs_dir=partial / "jobs")
    if args.ray is not None:  # a missing extra is bad input, also found before any folder
        run_jobs, close = _ray(args.ray, args.workers)
    elif args.workers == 0:
        run_jobs, close = _serial()
    else:
        run_jobs, close = _pool(args.workers)
    try:
        partial.mkdir(parents=True)
        try:
            rows = _sweep(args, ctx, recipe, jobs, partial, run_jobs, yaml)
            rows = _relocated(rows, partial, final)
            _relocate_files(partial, final)
            columns = _write_table(partial, rows)
            os.replace(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # an interrupted sweep leaves nothing complete-looking
            raise
    finally:
        close()
    failed = [r for r in rows if r["status"] != "ok"]
    summary = {"command": "sweep", "folder": str(final), "over": args.over, "n_jobs": len(rows),
               "n_failed": len(failed), "jobs": [_json_safe(r) for r in rows]}
    emit(ctx, summary, [*_print_table(rows, columns), f"sweep folder: {final}"])
    return 1 if failed else 0


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _sweep(args: argparse.Namespace, ctx: Context, recipe: Any, jobs: list[dict[str, Any]], partial: Path,
           run_jobs: Any, yaml: Any) -> list[dict[str, Any]]:
    jobs_dir, runs = partial / "jobs", partial / "runs"
    jobs_dir.mkdir()
    runs.mkdir()
    for job in jobs:
        if job.get("data_file"):
            path, content = job.pop("data_file")
            Path(path).write_text(content, encoding="utf-8")
        job["recipe"]["name"] = f"{recipe.name}-{job['label']}"
        job["file"] = str((jobs_dir / f"{job['label']}.yaml").resolve())
        Path(job["file"]).write_text(yaml.safe_dump(job["recipe"], sort_keys=False), encoding="utf-8")
        job.update(runs=str(runs.resolve()), device=recipe.device or ctx.device, cwd=os.getcwd())
    where = f"Ray ({args.ray})" if args.ray else "this process" if args.workers == 0 else f"{args.workers} worker(s)"
    ctx.say(f"sweep over {args.over}: {len(jobs)} job(s) on {where}")
    results: dict[int, tuple[dict[str, Any], int]] = {}
    pending = list(range(len(jobs)))
    for attempt in range(1, args.retries + 2):
        outcomes = run_jobs([{k: v for k, v in jobs[i].items() if k not in ("recipe", "data_file")} for i in pending])
        still = []
        for i, outcome in zip(pending, outcomes, strict=True):
            results[i] = (outcome, attempt)
            if outcome["status"] != "ok":
                still.append(i)
                again = "; retrying" if attempt <= args.retries else ""
                ctx.say(f"job {jobs[i]['label']} failed (attempt {attempt}): {outcome['error']}{again}")
            else:
                ctx.say(f"job {jobs[i]['label']} done")
        pending = still
        if not pending:
            break
    return [_row(jobs[i], *results[i]) for i in range(len(jobs))]
