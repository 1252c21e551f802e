"""Scores: validation, selection on hand-made tensors, and the safetensors + JSON files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mechedit.artifacts import ModelMismatchError, ModelMismatchWarning
from mechedit.circuit import Circuit
from mechedit.components import Component, partition_key
from mechedit.provenance import Provenance, weights_hash
from mechedit.scores import PartitionTable, Scores, ScoresFormatError

# layer x neuron, chosen so value order, |value| order and per-layer order all differ.
HAND = torch.tensor(
    [
        [1.0, -5.0, 3.0, 0.5],
        [4.0, 0.0, -2.0, 3.0],
    ]
)


def _neurons(values=HAND, **kwargs) -> Scores:
    return Scores(
        values, ("layer", "neuron"), "neuron", "hand", config={"note": "hand-made"}, **kwargs
    )


def _cells(circuit: Circuit) -> list[tuple[int, int]]:
    return [(c.layer, c.neuron) for c in circuit]


# -- selection ------------------------------------------------------------------------------------


def test_top_k_by_value_and_by_magnitude():
    scores = _neurons()
    assert _cells(scores.top_k(3)) == [(1, 0), (0, 2), (1, 3)]
    assert _cells(scores.top_k(2, by="abs")) == [(0, 1), (1, 0)]
    assert _cells(scores.top_k(2, largest=False)) == [(0, 1), (1, 2)]
    assert _cells(scores.top_k(0)) == []
    assert len(scores.top_k(100)) == HAND.numel()


def test_threshold_above_and_below():
    scores = _neurons()
    assert _cells(scores.threshold(3.0)) == [(1, 0), (0, 2), (1, 3)]
    assert _cells(scores.threshold(3.0, by="abs")) == [(0, 1), (1, 0), (0, 2), (1, 3)]
    assert _cells(scores.threshold(-1.0, above=False)) == [(0, 1), (1, 2)]
    assert _cells(scores.threshold(10.0)) == []


def test_top_k_per_layer():
    scores = _neurons()
    assert _cells(scores.top_k_per_layer(1)) == [(0, 2), (1, 0)]
    assert _cells(scores.top_k_per_layer(2, by="abs")) == [(0, 1), (0, 2), (1, 0), (1, 3)]
    # layer axis need not come first
    transposed = Scores(HAND.T.contiguous(), ("neuron", "layer"), "neuron", "hand")
    assert _cells(transposed.top_k_per_layer(1)) == [(0, 2), (1, 0)]


def test_nan_cells_are_skipped_and_ties_keep_tensor_order():
    values = torch.tensor([[math.nan, 2.0, 2.0], [2.0, math.nan, -1.0]])
    scores = _neurons(values)
    assert _cells(scores.top_k(3)) == [(0, 1), (0, 2), (1, 0)]
    assert len(scores.top_k(10)) == 4
    assert _cells(scores.top_k_per_layer(5)) == [(0, 1), (0, 2), (1, 0), (1, 2)]


def test_selection_returns_a_circuit_with_provenance():
    provenance = Provenance(model_name="tiny", weights_hash="0" * 16, seed=1)
    circuit = _neurons(provenance=provenance).top_k(2, by="abs", description="two")
    assert isinstance(circuit, Circuit)
    assert circuit.components == (
        Component("neuron", 0, neuron=1),
        Component("neuron", 1, neuron=0),
    )
    assert (
        circuit.method == "hand"
        and circuit.provenance == provenance
        and circuit.description == "two"
    )
    assert circuit.config == {
        "scores": {"note": "hand-made"},
        "selection": {"rule": "top_k", "k": 2, "by": "abs", "largest": True},
    }


def test_position_and_head_axes_map_to_components():
    resid = Scores(torch.arange(6.0).reshape(2, 3), ("layer", "pos"), "resid_pre", "m")
    assert list(resid.top_k(2)) == [
        Component("resid_pre", 1, pos=2),
        Component("resid_pre", 1, pos=1),
    ]
    heads = Scores(torch.tensor([[0.0, 9.0], [1.0, 2.0]]), ("layer", "head"), "head", "m")
    assert list(heads.top_k(1)) == [Component("head", 0, head=1)]
    per_pos_neuron = Scores(
        torch.zeros(2, 3, 4).index_put_(
            (torch.tensor(1), torch.tensor(2), torch.tensor(3)), torch.tensor(5.0)
        ),
        ("layer", "pos", "neuron"),
        "neuron",
        "m",
    )
    assert list(per_pos_neuron.top_k(1)) == [Component("neuron", 1, neuron=3, pos=2)]
    assert per_pos_neuron.component_at(0, 1, 2) == Component("neuron", 0, neuron=2, pos=1)


def test_partition_axis_uses_its_labels():
    keys = (
        partition_key("transformer.h.0.mlp.c_fc.weight", 4),
        partition_key("transformer.wte.weight", 0),
    )
    scores = Scores(
        torch.tensor([0.1, 0.7]), ("partition",), "partition", "pcgu", labels={"partition": keys}
    )
    assert list(scores.top_k(1)) == [
        Component("partition", None, param="transformer.wte.weight", unit=0)
    ]
    with pytest.raises(ValueError, match="'partition' axis needs partitions="):
        Scores(torch.tensor([0.1, 0.7]), ("partition",), "partition", "pcgu")
    with pytest.raises(ValueError, match="not of the form"):
        Scores(
            torch.tensor([0.1]), ("partition",), "partition", "pcgu", labels={"partition": ["w"]}
        )


def test_partition_table_names_every_unit_and_round_trips(tmp_path):
    sizes = {"a.weight": 3, "b.bias": 1, "c.weight": 2}
    table = PartitionTable.from_sizes(sizes)
    assert table.rows == (("a.weight", 0, 3), ("b.bias", 3, 1), ("c.weight", 4, 2))
    assert len(table) == 6 and table.sizes == sizes
    assert [table.locate(i) for i in range(6)] == [
        ("a.weight", 0), ("a.weight", 1), ("a.weight", 2), ("b.bias", 0), ("c.weight", 0), ("c.weight", 1)
    ]
    values = torch.tensor([[0.0, 5.0, 1.0, 9.0, -7.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0, 9.0]])  # sums: 1 6 2 10 -6 11
    scores = Scores(values, ("prompt", "partition"), "partition", "pcgu", partitions=sizes)
    assert scores.partitions == table  # a {param: size} mapping becomes the table
    best = scores.reduce("prompt", op="sum")
    assert list(best.top_k(2, by="abs")) == [
        Component("partition", None, param="c.weight", unit=1),
        Component("partition", None, param="b.bias", unit=0),
    ]
    assert best.component_at(4) == Component("partition", None, param="c.weight", unit=0)
    # the table's labels are exactly the old one-label-per-unit form
    assert table.labels()[4] == partition_key("c.weight", 0)
    loaded = Scores.load(best.save(tmp_path / "p"))
    assert loaded.partitions == table and torch.equal(loaded.values, best.values)
    sidecar = json.loads((tmp_path / "p.json").read_text())
    assert sidecar["partitions"] == {
        "columns": ["param", "offset", "size"],
        "rows": [["a.weight", 0, 3], ["b.bias", 3, 1], ["c.weight", 4, 2]],
    }
    assert scores.reduce("partition").partitions is None


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ((("a", 0, 2), ("b", 1, 2)), r"row 1 \(b\): offset must be 2"),
        ((("a", 1, 2),), r"row 0 \(a\): offset must be 0"),
        ((("a", 0, 0),), "size must be >= 1"),
        ((("a", 0, 1), ("a", 1, 1)), "listed twice"),
        ((("a", 0),), "must be \\(param name, offset int, size int\\)"),
        ((("a", 0, True),), "must be \\(param name, offset int, size int\\)"),
    ],
)
def test_bad_partition_tables_are_refused(rows, message):
    with pytest.raises(ValueError, match=message):
        PartitionTable(rows)


def test_partition_table_must_fit_the_axis():
    with pytest.raises(ValueError, match="covers 3 units but the 'partition' axis has 2"):
        Scores(torch.zeros(2), ("partition",), "partition", "m", partitions={"a": 3})
    with pytest.raises(ValueError, match="not both"):
        Scores(
            torch.zeros(1), ("partition",), "partition", "m",
            partitions={"a": 1}, labels={"partition": ["a[0]"]},
        )
    with pytest.raises(ValueError, match="no 'partition' axis"):
        Scores(torch.zeros(1, 1), ("layer", "neuron"), "neuron", "m", partitions={"a": 1})


def test_version_1_files_still_load(tmp_path):
    keys = (partition_key("w.weight", 4), partition_key("v.bias", 0))
    scores = Scores(torch.tensor([0.1, 0.7]), ("partition",), "partition", "pcgu", labels={"partition": keys})
    json_path = scores.save(tmp_path / "old")
    sidecar = json.loads(json_path.read_text())
    del sidecar["partitions"]
    json_path.write_text(json.dumps({**sidecar, "version": 1}))
    old = Scores.load(json_path)
    assert old.labels["partition"] == keys and old.partitions is None
    assert list(old.top_k(1)) == [Component("partition", None, param="v.bias", unit=0)]
    # version 1 has no partitions key, version 2 requires it
    json_path.write_text(json.dumps({**sidecar, "version": 2}))
    with pytest.raises(ScoresFormatError, match=r"missing \['partitions'\]"):
        Scores.load(json_path)


def test_scores_check_the_model_they_are_used_on(tiny_bridge):
    mine = Scores(torch.zeros(2, 4), ("layer", "neuron"), "neuron", "m", provenance=Provenance.of(tiny_bridge))
    assert mine.check_model(tiny_bridge, strict=True)
    other = Provenance(model_name="elsewhere", weights_hash="0123456789abcdef")
    theirs = Scores(torch.zeros(2, 4), ("layer", "neuron"), "neuron", "m", provenance=other)
    pattern = r"these scores came from elsewhere \(weights 0123456789abcdef\); the model given here is"
    with pytest.warns(ModelMismatchWarning, match=pattern):
        assert not theirs.check_model(tiny_bridge)
    with pytest.raises(ModelMismatchError, match=weights_hash(tiny_bridge)):
        theirs.check_model(tiny_bridge, strict=True)


def test_missing_pair_is_a_format_error(tmp_path):
    with pytest.raises(ScoresFormatError, match="absent.json not found; pass the stem") as err:
        Scores.load(tmp_path / "absent")
    assert isinstance(err.value, FileNotFoundError)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ScoresFormatError, match="dir.json is a folder"):
        Scores.load(tmp_path / "dir")


def test_extra_axes_must_be_reduced_before_selecting():
    per_prompt = Scores(
        torch.stack([HAND, 3 * HAND]),
        ("prompt", "layer", "neuron"),
        "neuron",
        "m",
        labels={"prompt": ("a", "b")},
    )
    with pytest.raises(
        ValueError, match=r"axes \['prompt'\] do not name a component; reduce them first"
    ):
        per_prompt.top_k(1)
    mean = per_prompt.reduce("prompt")
    assert mean.axes == ("layer", "neuron") and torch.equal(mean.values, 2 * HAND)
    assert mean.config["reduced"] == [{"axis": "prompt", "op": "mean"}]
    assert "prompt" not in mean.labels
    assert torch.equal(
        per_prompt.reduce("prompt", op="max").values, 3 * HAND.clamp(min=0) + HAND.clamp(max=0)
    )
    assert _cells(mean.top_k(1)) == [(1, 0)]
    with pytest.raises(ValueError, match="need axes"):
        Scores(HAND[0], ("neuron",), "neuron", "m").top_k(1)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            (HAND, ("layer",), "neuron", "m"),
            {},
            r"1 axes \('layer',\) for a tensor with 2 dimensions \(2, 4\)",
        ),
        ((HAND, ("layer", "layer"), "neuron", "m"), {}, r"axes must be unique"),
        (
            (HAND, ("layer", "neuron"), "mlp_post", "m"),
            {},
            r"site 'mlp_post' is not known.*; valid sites: resid_pre",
        ),
        ((HAND, ("layer", "head"), "neuron", "m"), {}, r"axis 'head' does not fit site 'neuron'"),
        (
            (HAND.long(), ("layer", "neuron"), "neuron", "m"),
            {},
            r"floating-point tensor, got torch.int64",
        ),
        ((HAND, ("layer", "neuron"), "neuron", ""), {}, r"method must be a non-empty string"),
        (
            (HAND, ("layer", "neuron"), "neuron", "m"),
            {"config": {"t": torch.ones(1)}},
            r"JSON-serialisable",
        ),
        (
            (HAND, ("layer", "neuron"), "neuron", "m"),
            {"labels": {"pos": ("a",)}},
            r"labels for axis 'pos'",
        ),
        (
            (HAND, ("layer", "neuron"), "neuron", "m"),
            {"labels": {"layer": ("a",)}},
            r"axis 'layer' has 2 entries",
        ),
    ],
)
def test_bad_scores_are_rejected(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scores(*args, **kwargs)


def test_bad_selection_arguments():
    scores = _neurons()
    with pytest.raises(ValueError, match="by must be 'value' or 'abs'"):
        scores.top_k(1, by="magnitude")
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        scores.top_k(-1)
    with pytest.raises(ValueError, match="needs a 'layer' axis"):
        Scores(
            torch.ones(2), ("partition",), "partition", "m", labels={"partition": ["a[0]", "a[1]"]}
        ).top_k_per_layer(1)


# -- files --------------------------------------------------------------------------------------


def _full(tiny_bridge) -> Scores:
    values = torch.randn(2, 5)
    return Scores(
        values,
        ("layer", "pos"),
        "mlp_out",
        "random",
        config={"seed": 0, "n": [1, 2]},
        provenance=Provenance.of(tiny_bridge, data=["w1 w2 w3 w4"], seed=0),
        labels={"pos": ("<bos>", "w1", "w2", "w3", "w4")},
    )


def _same(a: Scores, b: Scores) -> bool:
    return (
        torch.equal(a.values, b.values)
        and a.values.dtype == b.values.dtype
        and (a.axes, a.site, a.method, a.config, a.provenance, a.labels)
        == (b.axes, b.site, b.method, b.config, b.provenance, b.labels)
    )


def test_save_load_round_trip(tiny_bridge, tmp_path):
    scores = _full(tiny_bridge)
    json_path = scores.save(tmp_path / "run" / "mlp_scores")
    assert (
        json_path.name == "mlp_scores.json"
        and (tmp_path / "run" / "mlp_scores.safetensors").is_file()
    )
    for name in ("mlp_scores", "mlp_scores.json", "mlp_scores.safetensors"):
        assert _same(Scores.load(tmp_path / "run" / name), scores)
    sidecar = json.loads(json_path.read_text())
    assert sidecar["format"] == "mechedit.scores" and sidecar["version"] == 2
    assert sidecar["axes"] == ["layer", "pos"] and sidecar["shape"] == [2, 5]


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_any_tensor_round_trips_bit_exactly(tmp_path, shape, dtype, seed):
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    axes = ("layer", "pos", "prompt")[: len(shape)]
    scores = Scores(
        values, axes, "resid_post", "h", labels={"layer": tuple(f"L{i}" for i in range(shape[0]))}
    )
    assert _same(Scores.load(scores.save(tmp_path / "s")), scores)


def test_broken_files_are_rejected(tiny_bridge, tmp_path):
    scores = _full(tiny_bridge)
    json_path = scores.save(tmp_path / "s")
    tensor_path = tmp_path / "s.safetensors"
    good = json_path.read_text()

    json_path.write_text(good[: len(good) // 2])
    with pytest.raises(ScoresFormatError, match="not valid JSON"):
        Scores.load(json_path)

    for change, message in [
        ({"version": 3}, "newer mechedit"),
        ({"format": "mechedit.circuit"}, "expected 'mechedit.scores'"),
        ({"axes": ["layer"]}, r"1 axes \('layer',\) for a tensor with 2 dimensions"),
        ({"shape": [5, 2]}, r"tensors differ from s.json: \{'values': 'file \[2, 5\] float32, s.json \[5, 2\]"),
        ({"values_file": "../elsewhere.safetensors"}, "must be a file name beside the JSON"),
        ({"values_file": "absent.safetensors"}, "cannot read the scores tensor: .*absent.safetensors not found"),
        ({"labels": {"pos": ["a"]}}, "axis 'pos' has 5 entries"),
        ({"provenance": {"seed": 1}}, "bad provenance"),
        ({"site": 4}, "'site' must be str"),
    ]:
        json_path.write_text(json.dumps({**json.loads(good), **change}))
        with pytest.raises(ScoresFormatError, match=message):
            Scores.load(json_path)

    data = json.loads(good)
    del data["method"]
    json_path.write_text(json.dumps(data))
    with pytest.raises(ScoresFormatError, match=r"missing \['method'\]"):
        Scores.load(json_path)

    json_path.write_text(good)
    save_file({"values": scores.values + 1}, str(tensor_path))
    with pytest.raises(ScoresFormatError, match="do not match the hash"):
        Scores.load(json_path)
    save_file({"other": scores.values}, str(tensor_path))
    with pytest.raises(ScoresFormatError, match=r"only in the file \['other'\], only in s.json \['values'\]"):
        Scores.load(json_path)
    tensor_path.write_bytes(b"garbage")
    with pytest.raises(ScoresFormatError, match="is not a readable safetensors file"):
        Scores.load(json_path)
