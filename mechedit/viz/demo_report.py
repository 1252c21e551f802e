"""The demo's HTML report: the fact, where it was located, what the edit did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mechedit.viz.edits import relation_bars
from mechedit.viz.figures import before_after, heatmap
from mechedit.viz.report import write_report


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
        "weight_edit/ (the same edit as a permanent, revertible weight edit), report.json."
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
        ("Run", [run_text]),
    ]
    return write_report(path, sections, title="mechedit demo: locate and forget one fact", subtitle=f"{fact.subject} / {rel.name}")
