"""The demo's HTML report: the fact, where it was located, what the edit did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mechedit.viz.edits import relation_bars
from mechedit.viz.effects import effect_scatter, k_sweep_lines
from mechedit.viz.figures import before_after, heatmap
from mechedit.viz.report import Block, write_report


def prediction_table(frame: pd.DataFrame, *, n: int = 3) -> pd.DataFrame:
    """``top_predictions``' table, one row per prompt: its top-``n`` tokens as "token p" text.

    Columns ``prompt``, ``target``, ``before`` and (when the table has them) ``after``, e.g.
    ``"delhi 0.99 | sydney 0.01 | rome 0.00"``; the target's own entry is starred.
    """
    stages = [s for s in ("before", "after") if f"token_{s}" in frame.columns]
    rows = []
    for (prompt, target), part in frame[frame["rank"] <= n].groupby(["prompt", "target"], sort=False):
        part = part.sort_values("rank")
        row = {"prompt": prompt, "target": target}
        for stage in stages:
            row[stage] = " | ".join(
                f"{'*' if target and tok.strip() == target.strip() else ''}{tok.strip()} {p:.2f}"
                for tok, p in zip(part[f"token_{stage}"], part[f"p_{stage}"], strict=True)
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _effect_blocks(effects: Any, k: int) -> list[Block]:
    """The demo's edit effects: what the model says instead, predicted vs observed, the k sweep."""
    pvo, sweep = effects.predicted_vs_observed, effects.k_sweep
    single = pvo[pvo["group"] != "all selected"]
    sel, rand = single[single["group"] == "selected"], single[single["group"] == "random"]
    joint = pvo[pvo["group"] == "all selected"].iloc[0]
    corr = single["predicted"].corr(single["observed"])
    blocks: list[Block] = [
        "What the model predicts next, before and with the edit (top 3, probability over the whole vocabulary; "
        "* marks the true answer): the forget prompts, held-out paraphrases, a few neighbours and one prompt per "
        "other relation of the subject.",
        prediction_table(effects.top_predictions),
        f"Predicted vs observed. The attribution predicts, to first order, how much zeroing one neuron lowers the "
        f"fact's log-probability minus the same on the neighbours to keep. Zeroing each of the {len(sel)} selected "
        f"neurons alone (measured exactly: the neuron set to 0 at every position) moves that quantity by {sel['observed'].min():.2g} to "
        f"{sel['observed'].max():.2g} nats against predictions of {sel['predicted'].min():.2g} to "
        f"{sel['predicted'].max():.2g}; {len(rand)} random other neurons move it by at most "
        f"{rand['observed'].abs().max() if len(rand) else float('nan'):.2g} nats. Correlation of predicted and "
        f"observed over these {len(single)} neurons: {corr:.2f}. Zeroed together, the {k} selected neurons were "
        f"predicted (sum of their scores) to cost {joint['predicted']:.3g} nats and cost {joint['observed']:.3g} "
        f"({joint['observed_forget']:.3g} on the fact, {joint['observed_retain']:.3g} on the neighbours): "
        + (f"{joint['observed'] / joint['predicted']:.0f}x the sum. " if joint["predicted"] > 0 else "")
        + (
            "Each neuron alone barely matters; together they remove far more than the sum - an interaction a "
            "linear, one-neuron-at-a-time estimate cannot show, which is why the selection is checked by the "
            "edit itself."
            if joint["observed"] > 2 * max(joint["predicted"], 0.0)
            else "The joint effect is within a factor of two of the sum: here the neurons act about additively."
        ),
        effect_scatter(pvo),
    ]
    at_k = sweep[sweep["k"] == k]
    base = sweep[sweep["selection"] == "none"].set_index("suite")["p_target"]
    parts = []
    for suite in dict.fromkeys(sweep["suite"]):
        top = at_k[(at_k["selection"] == "top-k") & (at_k["suite"] == suite)]["p_target"]
        rnd = at_k[(at_k["selection"] == "random") & (at_k["suite"] == suite)]["p_target"]
        if top.empty or rnd.empty:
            continue
        parts.append(
            f"{suite}: from {base.get(suite, float('nan')):.3f} to {rnd.mean():.3f} with {k} random neurons zeroed "
            f"({rnd.min():.3f} to {rnd.max():.3f} over {len(rnd)} seeds), to {top.iloc[0]:.3f} with the selected {k}"
        )
    blocks += [
        "k sweep with a random control: the mean probability of the true answer with the top-k neurons zeroed "
        "and with k random neurons zeroed. " + "; ".join(parts) + ". The gap between the lines is what the "
        "localisation buys over zeroing any k neurons.",
        k_sweep_lines(sweep),
    ]
    return blocks


def write_demo_report(result: Any, path: str | Path, *, world: Any) -> Path:
    """Write ``result`` (a ``mechedit.demo.DemoResult``) as a standalone HTML page."""
    fact, scores, circuit, report = result.fact, result.scores, result.circuit, result.report
    rel = world.relation[fact.relation_id]
    frame = report.to_frame()
    probs = frame[frame["metric"].isin(["p_target", "accuracy"])]
    fluency = frame[frame["suite"] == "fluency"]
    selected = pd.DataFrame(
        [{"rank": i + 1, "layer": c.layer, "neuron": c.neuron, "score (nats)": float(scores.values[c.layer, c.neuron])} for i, c in enumerate(circuit)]
    )
    per_layer = selected.groupby("layer").size().reindex(range(scores.values.shape[0]), fill_value=0)
    layer_table = pd.DataFrame({"layer": per_layer.index, "selected neurons": per_layer.values})
    prov = scores.provenance
    run_text = (
        f"Model {result.config.model} (weights {prov.weights_hash if prov else '?'}), mechedit "
        f"{prov.mechedit_version if prov else '?'}. Times: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
        + ". Files beside this report: params.json, scores.safetensors/json, circuit.json, "
        "weight_edit/ (the same edit as a permanent, revertible weight edit), report.json"
        + (", top_predictions.csv, predicted_vs_observed.csv, k_sweep.csv." if getattr(result, "effects", None) is not None else ".")
    )
    sections = [
        (
            "The fact",
            [
                f"Subject: {fact.subject}. Relation: {rel.id} ({rel.name}). True value: {fact.value}.",
                "Training templates: " + " | ".join(t.replace("{}", fact.subject) for t in rel.train_templates),
                "Held-out paraphrases (never trained on): " + " | ".join(t.replace("{}", fact.subject) for t in rel.heldout_templates),
            ],
        ),
        (
            "Where: MLP neuron scores (layer x neuron)",
            [
                "Gradient x activation: the predicted drop in the fact's log-probability when a neuron is zeroed, "
                "minus the same for neighbours that share the value (nats). Blue (positive): removing the neuron hurts this fact "
                "more than its neighbours.",
                heatmap(scores, title="neuron attribution (layer x neuron), the selected neurons outlined", height=420, mark=circuit),
                layer_table,
                selected,
            ],
        ),
        (
            "What the edit did",
            [
                f"Zeroing the {len(circuit)} selected neurons (reversible; the model is unchanged afterwards).",
                before_after(probs, title="Target probability and accuracy, before and after"),
                frame,
                "Per relation: where a suite's change comes from (a drop in the subject's other relations is often "
                "one relation).",
                relation_bars(report),
                report.by_relation(),
                # two near-equal bars on a 0-5 axis show nothing: state the change instead
                "Held-out text perplexity (lower is better): "
                + "; ".join(f"{r.before:.4g} -> {r.after:.4g} ({100 * (r.after / r.before - 1):+.2f} %)" for r in fluency.itertuples())
                + ".",
            ],
        ),
        *([("The edit's effects in detail", _effect_blocks(result.effects, len(circuit)))] if getattr(result, "effects", None) is not None else []),
        ("Run", [run_text]),
    ]
    return write_report(path, sections, title="mechedit demo: locate and forget one fact", subtitle=f"{fact.subject} / {rel.name}")
