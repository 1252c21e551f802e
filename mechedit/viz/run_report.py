"""The HTML report of a run folder written by ``mechedit run``, rebuilt from its files alone.

``write_run_report(run_dir)`` reads ``params.json`` (the resolved recipe, library versions, the
step command lines), ``circuit.json`` and its ``circuit.scores.*``, ``edit/manifest.json``,
``report-<suite>.json`` per evaluation, ``summary.json`` and, when present, ``results.jsonl``, and
writes one standalone page (``mechedit.viz.write_report``: plotly inline, no network) with

* where: the scores heatmap with the selected components outlined, and the selection's table;
* the edit: its kind, the tensors it changes, the weights hash before and after;
* one section per evaluation suite: before/after bars and the full table;
* provenance: the command lines, the recipe, library versions, model and data hashes.

Nothing is recomputed and no model is loaded: the page shows exactly the numbers in the folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from mechedit.viz.report import Block, write_report

#: the files every finished run folder has (``mechedit run`` writes them before renaming it)
REQUIRED = ("params.json", "summary.json", "circuit.json")
REPORT_NAME = "report.html"


class RunFolderError(ValueError):
    """A folder that is not a finished run folder of ``mechedit run`` (the message says what is missing)."""


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err}); the run folder is damaged") from None


def check_run_folder(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path, or ``RunFolderError`` / ``FileNotFoundError`` saying what is missing."""
    folder = Path(run_dir)
    if not folder.exists():
        raise FileNotFoundError(f"no run folder {str(folder)!r}")
    if not folder.is_dir():
        raise RunFolderError(f"{folder} is a file; pass the run folder `mechedit run` wrote (runs/<name>-<timestamp>)")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        hint = " (an unfinished run's .partial folder?)" if folder.name.endswith(".partial") else ""
        raise RunFolderError(
            f"{folder} is not a run folder of `mechedit run`: it has no {', '.join(missing)}{hint}"
        )
    return folder


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, JSON text)`` rows of a nested mapping; lists stay whole (``[2, 3]``)."""
    if isinstance(value, dict) and value:
        return [row for k, v in value.items() for row in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    text = value if isinstance(value, str) else json.dumps(value)
    return [(prefix, text)]


def _table(rows: list[tuple[str, str]], columns: tuple[str, str] = ("key", "value")) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns))


def _score_of(scores: Any, component: Any) -> float | None:
    """``component``'s cell in ``scores`` when it has an index on every axis, else ``None``."""
    index = [getattr(component, axis, None) for axis in scores.axes]
    if any(i is None for i in index):
        return None
    try:
        return float(scores.values[tuple(index)])
    except IndexError:
        return None


def _score_bars(scores: Any, selected: list[Any], title: str) -> Any:
    """Scores over one axis (a per-layer profile, PCGU's partitions): a bar per entry, the
    selected entries in another colour."""
    import plotly.graph_objects as go

    from mechedit.viz.figures import _axis_ticks

    (axis,) = scores.axes
    ticks = _axis_ticks(scores, axis)
    if axis == "partition" and scores.partitions is not None:
        offsets = {param: offset for param, offset, _ in scores.partitions.rows}
        chosen = {offsets[c.param] + c.unit for c in selected if c.param in offsets}
    else:
        chosen = {getattr(c, axis, None) for c in selected}
    colours = ["#e45756" if i in chosen else "#4c78a8" for i in range(len(ticks))]
    fig = go.Figure(go.Bar(x=ticks, y=scores.values.float().tolist(), marker_color=colours,
                           hovertemplate=f"{axis} %{{x}}<br>score %{{y:.4g}}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=axis, yaxis_title="score", height=380, showlegend=False)
    return fig


def _where(folder: Path) -> tuple[str, list[Block]]:
    from mechedit.circuit import Circuit
    from mechedit.scores import Scores
    from mechedit.viz.figures import heatmap

    circuit = Circuit.load(folder / "circuit.json")
    blocks: list[Block] = []
    selection = circuit.config.get("selection", {})
    rule = ", ".join(f"{k} {v}" for k, v in selection.items()) if isinstance(selection, dict) else str(selection)
    blocks.append(f"{len(circuit)} components selected by {circuit.method}" + (f" ({rule})." if rule else "."))
    scores = None
    if (folder / "circuit.scores.json").is_file():
        scores = Scores.load(folder / "circuit.scores.json")
        on_site = [c for c in circuit if c.site == scores.site]
        title = f"{scores.method}: {scores.site} scores, the {len(on_site)} selected"
        if scores.values.ndim == 1:  # a per-layer profile or PCGU's partitions: no second axis for a map
            blocks.append(_score_bars(scores, on_site, f"{title} in red"))
        else:
            try:
                blocks.append(heatmap(scores, mark=on_site or None, title=f"{title} outlined"))
            except ValueError as err:  # components without both plotted coordinates: the plain map
                blocks.append(f"The selected components are not outlined: {err}.")
                blocks.append(heatmap(scores, title=f"{scores.method}: {scores.site} scores"))
    else:
        blocks.append("The locator selected the components itself and wrote no scores (no circuit.scores.json).")
    blocks.append(pd.DataFrame([
        {"rank": i + 1, "component": str(c), **({"score": _score_of(scores, c)} if scores is not None else {})}
        for i, c in enumerate(circuit)
    ]))
    return f"Where: the circuit ({len(circuit)} components)", blocks


def _edit(folder: Path) -> tuple[str, list[Block]] | None:
    manifest_path = folder / "edit" / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = _read(manifest_path)
    base, result = manifest.get("base") or {}, manifest.get("result") or {}
    blocks: list[Block] = [
        f"Kind: {manifest.get('kind', manifest.get('format', '?'))}. Weights hash of the model before: "
        f"{base.get('weights_hash', 'not recorded')}; with the edit: {result.get('weights_hash', 'not recorded')}."
    ]
    tensors = manifest.get("tensors")
    if isinstance(tensors, dict) and tensors:
        blocks.append(pd.DataFrame([{"tensor": name, "shape": str(tuple(t.get("shape", ()))), "dtype": t.get("dtype")}
                                    for name, t in tensors.items()]))
    params = {k: v for k, v in manifest.items() if k not in ("tensors", "base", "result", "format", "version")}
    blocks.append(_table([(k, v if len(v) <= 300 else v[:300] + " ...") for k, v in _flatten(params)]))
    return "The edit", blocks


def _number(value: Any) -> float:
    """A report value as a float (the JSON strings "nan"/"inf" and null as NaN)."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _bounded(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows whose before and after lie in [0, 1] (probabilities, accuracies): one scale per figure."""
    b, a = frame["before"].map(_number), frame["after"].map(_number)
    return frame[(b.between(0, 1) | b.isna()) & (a.between(0, 1) | a.isna()) & ~(b.isna() & a.isna())]


def _fact_items(folder: Path) -> tuple[dict[str, Any], ...]:
    """The facts evaluation's per-item rows from ``results.jsonl`` (none when absent or unreadable:
    the per-relation view is then left out, the rest of the report stands)."""
    path = folder / "results.jsonl"
    if not path.is_file():
        return ()
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            return ()
        if isinstance(row, dict) and row.get("eval") == "facts" and isinstance(row.get("before"), dict) and isinstance(row.get("after"), dict):
            items.append(row)
    return tuple(items)


def _facts_suite(path: Path) -> list[Block]:
    from dataclasses import replace

    from mechedit.evaluate.facts import EditReport
    from mechedit.viz.edits import edit_bars, relation_bars

    report = replace(EditReport.load(path), items=_fact_items(path.parent))
    frame = report.to_frame()
    bounded = _bounded(frame)
    blocks: list[Block] = []
    if not bounded.empty:
        several = frame["case"].nunique() > 1
        rows = {
            (f"{r.case}: " if several else "") + f"{r.suite} / {r.metric}" + (f" ({r.measure})" if r.measure != "teacher_forced" else ""):
            (r.case, r.suite, r.metric)
            for r in bounded.itertuples()
        }
        # a metric measured two ways has two rows; edit_bars needs one per (case, suite, metric)
        counts = frame.groupby(["case", "suite", "metric"]).size()
        rows = {label: key for label, key in rows.items() if counts[key] == 1}
        if rows:
            blocks.append(edit_bars({"edited": report}, rows, title="Before and with the edit (probabilities and accuracies)"))
    blocks.append(frame)
    if report.items and any("accuracy" in it["before"] for it in report.items):
        blocks += [
            "Per relation (from results.jsonl): where a suite's change comes from; a drop in the subject's other "
            "relations or in the neighbours is often one relation.",
            relation_bars(report),
            report.by_relation(),
        ]
    return blocks


def _metric_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            rows.append({"metric": name, "before": _number(value.get("before")), "after": _number(value.get("after"))})
    frame = pd.DataFrame(rows, columns=["metric", "before", "after"])
    frame["change"] = frame["after"] - frame["before"]
    return frame


def _privacy_suite(data: dict[str, Any]) -> list[Block]:
    from mechedit.viz.figures import before_after

    frame = _metric_frame(data.get("metrics", {}))
    blocks: list[Block] = [f"{data.get('n_secrets', '?')} secrets; {data.get('flips', '?')} flipped from extracted to not extracted."]
    bounded = _bounded(frame)
    if not bounded.empty:
        blocks.append(before_after(bounded, group_cols=(), title="Privacy metrics in [0, 1], before and with the edit"))
    blocks.append(frame)
    per_secret = data.get("per_secret")
    if isinstance(per_secret, list) and per_secret:
        table = pd.DataFrame(per_secret)
        if {"exposure_before", "exposure_after"} <= set(table.columns):
            from mechedit.viz.effects import exposure_strip

            before, after = table["exposure_before"].tolist(), table["exposure_after"].tolist()
            values = before + after
            numbers = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
            if numbers and any(v is not None and not math.isnan(v) for v in values):
                # the report keeps no log2 |R| per secret, so the maximum is not marked here
                blocks.append(exposure_strip(before, after, title="Exposure of each secret (bits), before and with the edit"))
        blocks.append(table)
    return blocks


def _bias_suite(data: dict[str, Any]) -> list[Block]:
    from mechedit.viz.figures import before_after

    rows = []
    for side in ("before", "after"):
        result = data.get(side)
        if isinstance(result, dict):
            rows.append({"model": "with the edit" if side == "after" else "before",
                         **{k: v for k, v in result.items() if not isinstance(v, (dict, list))}})
    blocks: list[Block] = []
    if rows and "rate" in rows[0]:
        after = data.get("after") or {}
        blocks.append(before_after(
            pd.DataFrame([{"metric": "advantaged side preferred (rate)", "before": data["before"]["rate"],
                           "after": after.get("rate", math.nan)}]),
            group_cols=(), title="Bias: how often the advantaged side is preferred",
        ))
    blocks.append(pd.DataFrame(rows) if rows else _table(_flatten(data)))
    return blocks


def _generic_suite(data: Any) -> list[Block]:
    """A suite this module does not know: its rows or metrics as tables, else every value."""
    if isinstance(data, dict) and isinstance(data.get("rows"), list) and data["rows"]:
        return [pd.DataFrame(data["rows"])]
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        return [_metric_frame(data["metrics"])]
    return [_table(_flatten(data))]


def _suites(folder: Path, params: dict[str, Any]) -> list[tuple[str, list[Block]]]:
    paths = {p.stem.removeprefix("report-"): p for p in sorted(folder.glob("report-*.json"))}
    recipe = params.get("recipe") if isinstance(params.get("recipe"), dict) else {}
    planned = [e.get("suite") for e in recipe.get("evaluate") or [] if isinstance(e, dict)]
    order = [s for s in dict.fromkeys(planned) if s in paths] + [s for s in paths if s not in planned]
    sections = []
    for suite in order:  # the recipe's order, then any other report files
        path = paths[suite]
        data = _read(path)
        if suite == "facts" and isinstance(data, dict) and data.get("format") == "mechedit.edit_report":
            blocks = _facts_suite(path)
        elif suite == "privacy" and isinstance(data, dict):
            blocks = _privacy_suite(data)
        elif suite == "bias" and isinstance(data, dict):
            blocks = _bias_suite(data)
        else:
            blocks = _generic_suite(data)
        sections.append((f"Evaluation: {suite} ({path.name})", blocks))
    return sections


def _results(folder: Path, limit: int = 200) -> tuple[str, list[Block]] | None:
    """Per-item results (``results.jsonl``), when the run wrote them."""
    path = folder / "results.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise RunFolderError(f"{path}: line {len(rows) + 1} is not JSON") from None
    flat = [dict(_flatten(r)) if isinstance(r, dict) else {"value": json.dumps(r)} for r in rows[:limit]]
    shown = f" (the first {limit})" if len(rows) > limit else ""
    return "Per-item results", [f"{len(rows)} rows in results.jsonl{shown}.", pd.DataFrame(flat)]


def _provenance(folder: Path, params: dict[str, Any], summary: dict[str, Any]) -> tuple[str, list[Block]]:
    from mechedit.circuit import Circuit

    recipe = params.get("recipe", {})
    command = f"mechedit run {summary.get('recipe', '?')}"
    steps = params.get("steps") or []
    blocks: list[Block] = [
        f"Command: {command}. Rerun it from this folder: mechedit run {folder / 'params.json'}",
        "The steps it ran:\n\n" + "\n\n".join(" ".join(map(str, s)) for s in steps) if steps else "No step command lines recorded.",
    ]
    prov = Circuit.load(folder / "circuit.json").provenance
    model_rows = [("model", str(recipe.get("model", "?")))]
    if prov is not None:
        model_rows += [("model name (recorded)", str(prov.model_name)), ("weights hash", str(prov.weights_hash)),
                       ("data hash", str(prov.data_hash)), ("seed", str(recipe.get("seed", prov.seed)))]
    else:
        model_rows.append(("weights hash", "not recorded"))
    blocks.append(_table(model_rows))
    versions = params.get("versions") or {}
    blocks.append(_table([(k, str(v)) for k, v in versions.items()], ("library", "version")) if versions
                  else "Library versions: not recorded in params.json.")
    blocks.append(_table(_flatten(recipe), ("recipe key", "value")))
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != REPORT_NAME and not p.name.startswith("."))
    blocks.append(pd.DataFrame([{"file": str(p.relative_to(folder)), "bytes": p.stat().st_size} for p in files]))
    return "Provenance: params.json, versions, model", blocks


def write_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of run folder ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``).

    Written to a temporary name and renamed. Raises ``RunFolderError`` (a ``ValueError``) naming
    what is missing when ``run_dir`` is not a finished run folder, ``FileNotFoundError`` when it
    does not exist. Returns the path written.
    """
    folder = check_run_folder(run_dir)
    params, summary = _read(folder / "params.json"), _read(folder / "summary.json")
    if not isinstance(params, dict) or not isinstance(summary, dict):
        raise RunFolderError(f"{folder}: params.json and summary.json must hold JSON objects")
    recipe = params.get("recipe") if isinstance(params.get("recipe"), dict) else {}
    sections = [_where(folder)]
    edit = _edit(folder)
    if edit is not None:
        sections.append(edit)
    sections += _suites(folder, params)
    results = _results(folder)
    if results is not None:
        sections.append(results)
    sections.append(_provenance(folder, {**params, "recipe": recipe}, summary))
    name = summary.get("name") or recipe.get("name") or folder.name
    subtitle = f"model {recipe.get('model', '?')}, data {recipe.get('data', '?')}, run folder {folder.name}"
    return write_report(out if out is not None else folder / REPORT_NAME, sections, title=f"mechedit run: {name}",
                        subtitle=subtitle)


__all__ = ["REPORT_NAME", "REQUIRED", "RunFolderError", "check_run_folder", "write_run_report"]
