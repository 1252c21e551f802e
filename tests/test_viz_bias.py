"""Bias-edit figures: the partition heatmap puts each tensor's value in its layer x tensor cell."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mechedit.viz import bias_bars, bias_history, partition_heatmap


def _table():
    rows = [
        ("transformer.wte.weight", None, "transformer.wte.weight", 59, 3),
        ("transformer.h.0.attn.c_attn.weight", 0, "attn.c_attn.weight", 96, 12),
        ("transformer.h.0.mlp.c_fc.weight", 0, "mlp.c_fc.weight", 128, 0),
        ("transformer.h.1.mlp.c_fc.weight", 1, "mlp.c_fc.weight", 128, 64),
        ("transformer.ln_f.weight", None, "transformer.ln_f.weight", 1, 1),
    ]
    table = pd.DataFrame(rows, columns=["param", "layer", "tensor", "partitions", "selected"])
    table["layer"] = table["layer"].astype("Int64")
    table["fraction"] = table["selected"] / table["partitions"]
    return table


def test_partition_heatmap_places_every_tensor_in_its_layer_and_column():
    fig = partition_heatmap(_table())
    trace = fig.data[0]
    assert list(trace.y) == ["0", "1", "outside blocks"]
    assert list(trace.x) == ["attn.c_attn.weight", "mlp.c_fc.weight", "transformer.wte.weight", "transformer.ln_f.weight"]
    z = trace.z
    assert z[0][0] == pytest.approx(12 / 96) and z[0][1] == 0.0 and z[1][1] == pytest.approx(0.5)
    assert math.isnan(z[1][0])  # layer 1 has no attention tensor in this table: blank, not 0
    assert z[2][2] == pytest.approx(3 / 59) and z[2][3] == 1.0 and math.isnan(z[0][2])
    assert "64 of 128 partitions selected" in trace.text[1][1] and "transformer.h.1.mlp" in trace.text[1][1]
    assert "80 of 412" in fig.layout.title.text
    assert partition_heatmap(_table(), value="selected").data[0].z[1][1] == 64
    with pytest.raises(ValueError, match="tensor_table"):
        partition_heatmap(_table().drop(columns="selected"))


def test_bias_bars_and_history_draw_the_50_percent_line():
    table = pd.DataFrame({"method": ["unedited", "pcgu"], "test_bias": [0.9, 0.52]})
    bars = bias_bars(table)
    assert list(bars.data[0].y) == [0.9, 0.52] and list(bars.data[0].x) == ["unedited", "pcgu"]
    lines = [s for s in bars.layout.shapes if s.type == "line"]
    assert len(lines) == 1 and lines[0].y0 == lines[0].y1 == 0.5
    band = [s for s in bars.layout.shapes if s.type == "rect"]
    assert band and (band[0].y0, band[0].y1) == pytest.approx((0.45, 0.55))
    history = {"pcgu": [{"step": 1, "dev_bias": 0.8}, {"step": 2, "dev_bias": 0.48}, {"step": 3, "dev_bias": 0.1}]}
    fig = bias_history(history, checkpoints={"pcgu": 2})
    assert list(fig.data[0].y) == [0.8, 0.48, 0.1]
    assert list(fig.data[1].x) == [2] and list(fig.data[1].y) == [0.48]  # the chosen checkpoint
    with pytest.raises(ValueError, match="lacks columns"):
        bias_bars(table, column="bias")
