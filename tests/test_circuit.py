"""Circuit: round trips, the JSON layout, and every kind of bad file rejected with a clear error."""

from __future__ import annotations

import json
import string
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechedit.artifacts import ArtifactError, ModelMismatchError, ModelMismatchWarning
from mechedit.circuit import CIRCUIT_FORMAT, CIRCUIT_VERSION, Circuit, CircuitFormatError
from mechedit.components import SITES, Component
from mechedit.provenance import Provenance, weights_hash


def _provenance() -> Provenance:
    return Provenance(
        model_name="tiny", weights_hash="0123456789abcdef", data_hash="fedcba9876543210", seed=3
    )


def _mixed() -> Circuit:
    return Circuit(
        (
            Component("neuron", 1, neuron=17),
            Component("neuron", 0, neuron=3),
            Component("neuron", 0, neuron=4, pos=-1),
            Component("head", 1, head=2),
            Component("resid_pre", 0, pos=4),
            Component("mlp", 1),
            Component("partition", 0, param="transformer.h.0.mlp.c_fc.weight", unit=5),
            Component("partition", None, param="transformer.wte.weight", unit=9),
        ),
        method="unit-test",
        config={"k": 3, "nested": {"by": "abs"}},
        provenance=_provenance(),
        description="a bit of everything",
    )


# -- round trips ----------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    circuit = _mixed()
    path = circuit.save(tmp_path / "sub" / "c.json")
    assert Circuit.load(path) == circuit
    assert Circuit.from_dict(json.loads(path.read_text())) == circuit


def test_json_layout_is_compact_and_versioned(tmp_path):
    circuit = Circuit(
        (Component("neuron", 0, neuron=3), Component("neuron", 1, neuron=17)), method="m"
    )
    text = circuit.save(tmp_path / "c.json").read_text()
    assert "        [0, 3],\n        [1, 17]\n" in text  # one component per line
    data = json.loads(text)
    assert data["format"] == CIRCUIT_FORMAT == "mechedit.circuit"
    assert data["version"] == CIRCUIT_VERSION == 1
    assert data["components"] == {
        "neuron": {"columns": ["layer", "neuron"], "rows": [[0, 3], [1, 17]]}
    }
    assert data["provenance"] is None


def test_positions_add_a_column_only_when_used():
    groups = _mixed().to_dict()["components"]
    assert groups["neuron"] == {
        "columns": ["layer", "neuron", "pos"],
        "rows": [[1, 17, None], [0, 3, None], [0, 4, -1]],
    }
    assert groups["head"]["columns"] == ["layer", "head"]
    assert groups["partition"]["rows"][1] == [None, "transformer.wte.weight", 9]


def test_components_are_grouped_by_site_keeping_order():
    a, b, c = (
        Component("neuron", 1, neuron=5),
        Component("head", 0, head=1),
        Component("neuron", 0, neuron=2),
    )
    circuit = Circuit((a, b, c))
    assert circuit.components == (a, c, b)
    assert circuit.sites == ("neuron", "head")
    assert circuit.by_site() == {"neuron": [a, c], "head": [b]}
    assert circuit.by_hook() == {
        "blocks.1.mlp.hook_post": [a],
        "blocks.0.mlp.hook_post": [c],
        "blocks.0.attn.hook_z": [b],
    }
    assert len(circuit) == 3 and a in circuit and list(circuit) == [a, c, b]


def _components():
    layer = st.integers(0, 40)
    index = st.integers(0, 5000)
    pos = st.none() | st.integers(-64, 63)
    plain = st.builds(
        # embed / pos_embed live at layer 0 only
        lambda site, lay, p: Component(site, lay if SITES[site].per_layer else 0, pos=p),
        st.sampled_from([s for s, spec in SITES.items() if spec.index is None]),
        layer,
        pos,
    )
    heads = st.builds(lambda lay, h, p: Component("head", lay, head=h, pos=p), layer, index, pos)
    neurons = st.builds(
        lambda site, lay, n, p: Component(site, lay, neuron=n, pos=p),
        st.sampled_from(["neuron", "neuron_pre"]),
        layer,
        index,
        pos,
    )
    names = st.text(string.ascii_letters + "._[]0123456789", min_size=1, max_size=30)
    partitions = st.builds(
        lambda lay, name, u: Component("partition", lay, param=name, unit=u),
        st.none() | layer,
        names,
        index,
    )
    return plain | heads | neurons | partitions


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    components=st.lists(_components(), max_size=12, unique=True),
    description=st.text(max_size=40),
    config=st.dictionaries(
        st.text(max_size=8),
        st.integers() | st.text(max_size=8) | st.booleans() | st.none(),
        max_size=4,
    ),
)
def test_any_circuit_round_trips(tmp_path, components, description, config):
    circuit = Circuit(
        tuple(components),
        method="hypothesis",
        config=config,
        provenance=_provenance(),
        description=description,
    )
    assert Circuit.from_dict(json.loads(json.dumps(circuit.to_dict()))) == circuit
    assert Circuit.load(circuit.save(tmp_path / "c.json")) == circuit


def test_circuit_of_records_the_model(tiny_bridge):
    circuit = Circuit.of(
        tiny_bridge, [Component("neuron", 1, neuron=3)], method="manual", data=["w1 w2"], seed=7
    )
    assert circuit.provenance.weights_hash == weights_hash(tiny_bridge)
    assert circuit.provenance.seed == 7 and circuit.provenance.data_hash is not None
    assert circuit.validate(tiny_bridge, check_weights=True) is circuit


# -- construction errors ----------------------------------------------------------------------------


def test_bad_construction_is_a_value_error():
    neuron = Component("neuron", 0, neuron=1)
    with pytest.raises(ValueError, match="duplicate components"):
        Circuit((neuron, neuron))
    with pytest.raises(ValueError, match="holds Components"):
        Circuit((("neuron", 0, 1),))
    with pytest.raises(ValueError, match="JSON-serialisable"):
        Circuit((neuron,), config={"x": object()})
    with pytest.raises(ValueError, match="method must be a non-empty string"):
        Circuit((neuron,), method="")


# -- validation against a model ---------------------------------------------------------------------


def test_validate_rejects_components_out_of_range(tiny_bridge, tmp_path):
    path = Circuit(
        (
            Component("neuron", 5, neuron=0),
            Component("head", 0, head=9),
            Component("neuron", 0, neuron=1),
        )
    ).save(tmp_path / "c.json")
    circuit = Circuit.load(path)  # well-formed file; only the model can say it does not fit
    with pytest.raises(ValueError) as err:
        circuit.validate(tiny_bridge)
    message = str(err.value)
    assert "2 component(s) do not fit this model" in message
    assert "layer 5 out of range: the model has 2 layers (0..1)" in message
    assert "head 9 out of range: the model has 4 heads per layer (0..3)" in message


def test_validate_checks_the_weights(tiny_bridge):
    circuit = Circuit((Component("mlp", 0),), provenance=_provenance())
    names_both = (
        r"this circuit came from tiny \(weights 0123456789abcdef\); the model given here is "
        rf".*tiny_gpt2.* \(weights {weights_hash(tiny_bridge)}\)"
    )
    with pytest.warns(ModelMismatchWarning, match=names_both):
        assert circuit.validate(tiny_bridge) is circuit
    with pytest.raises(ModelMismatchError, match=names_both):
        circuit.validate(tiny_bridge, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        circuit.validate(tiny_bridge, check_weights=False)
        assert Circuit((Component("mlp", 0),)).validate(tiny_bridge)  # no provenance: nothing to check
    with pytest.raises(ModelMismatchError, match="has no provenance"):
        Circuit((Component("mlp", 0),)).check_model(tiny_bridge, strict=True)


# -- malformed files -----------------------------------------------------------------------------


def _write(tmp_path, data) -> str:
    path = tmp_path / "c.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _good() -> dict:
    return _mixed().to_dict()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"is not valid JSON \(truncated or corrupted\?\)"),
        ("", r"is not valid JSON"),
        ("[1, 2]", r"holds a JSON list, expected an object"),
        ("null", r"holds a JSON NoneType"),
    ],
)
def test_not_json_or_not_an_object(tmp_path, text, message):
    with pytest.raises(CircuitFormatError, match=message):
        Circuit.load(_write(tmp_path, text))


def test_truncated_file_is_rejected(tmp_path):
    path = _mixed().save(tmp_path / "c.json")
    text = path.read_text()
    for cut in (len(text) // 3, len(text) // 2, len(text) - 3):
        path.write_text(text[:cut])
        with pytest.raises(CircuitFormatError, match="not valid JSON"):
            Circuit.load(path)


def test_binary_file_is_rejected(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CircuitFormatError, match="not a UTF-8 text file"):
        Circuit.load(path)


def test_missing_file_or_folder_is_a_format_error_naming_the_path(tmp_path):
    with pytest.raises(CircuitFormatError, match=r"absent.json not found; pass a circuit JSON") as err:
        Circuit.load(tmp_path / "absent.json")
    assert isinstance(err.value, FileNotFoundError)  # callers catching FileNotFoundError still do
    with pytest.raises(CircuitFormatError, match=rf"{tmp_path} is a folder; pass a circuit JSON"):
        Circuit.load(tmp_path)


@pytest.mark.parametrize("key", ["method", "config", "provenance", "components"])
def test_missing_field(tmp_path, key):
    data = _good()
    del data[key]
    with pytest.raises(CircuitFormatError, match=rf"missing \['{key}'\]"):
        Circuit.load(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"format": "mechedit.scores"},
            r"'format' is 'mechedit.scores', expected 'mechedit.circuit'",
        ),
        ({"format": None}, r"'format' is None"),
        (
            {"version": 2},
            r"unsupported version 2 of mechedit.circuit: it was written by a newer mechedit, "
            r"and this one reads version 1",
        ),
        ({"version": 99}, r"newer mechedit"),
        ({"version": 0}, r"unsupported version 0 of mechedit.circuit; this mechedit reads versions \[1\]"),
        ({"version": "1"}, r"'version' must be an integer, got '1'"),
        ({"version": True}, r"'version' must be an integer"),
        ({"method": 3}, r"'method' must be str, got int"),
        ({"description": ["x"]}, r"'description' must be str"),
        ({"config": []}, r"'config' must be dict, got list"),
        ({"provenance": "tiny"}, r"'provenance' must be dict or null"),
        (
            {"provenance": {"model_name": "m"}},
            r"'provenance': bad provenance: missing \['weights_hash'\]",
        ),
        ({"components": [[0, 1]]}, r"'components' must be dict, got list"),
        ({"extra": 1}, r"unknown \['extra'\]"),
    ],
)
def test_wrong_header_or_types(tmp_path, change, message):
    data = {**_good(), **change}
    with pytest.raises(CircuitFormatError, match=message):
        Circuit.load(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("group", "message"),
    [
        (
            {"mlp_post": {"columns": ["layer"], "rows": [[0]]}},
            r"site 'mlp_post' is not known.*valid sites: resid_pre",
        ),
        ({"neuron": [[0, 1]]}, r"components\['neuron'\] must be dict, got list"),
        ({"neuron": {"rows": [[0, 1]]}}, r"missing \['columns'\]"),
        (
            {"neuron": {"columns": ["layer", "head"], "rows": [[0, 1]]}},
            r"columns \['layer', 'head'\] do not fit site 'neuron'",
        ),
        (
            {"neuron": {"columns": ["layer", "neuron"], "rows": [0, 1]}},
            r"\['rows'\]\[0\] must be list, got int",
        ),
        (
            {"neuron": {"columns": ["layer", "neuron"], "rows": {"0": 1}}},
            r"\['rows'\] must be list",
        ),
        (
            {"neuron": {"columns": ["layer", "neuron"], "rows": [[0, 1, 2]]}},
            r"has 3 values, expected 2 \(layer, neuron\)",
        ),
        (
            {"neuron": {"columns": ["layer", "neuron"], "rows": [["0", 1]]}},
            r"'layer' must be int, got str",
        ),
        (
            {"neuron": {"columns": ["layer", "neuron"], "rows": [[0, 1.0]]}},
            r"'neuron' must be int, got float",
        ),
        (
            {"neuron": {"columns": ["layer", "neuron"], "rows": [[0, True]]}},
            r"'neuron' must be int, got bool",
        ),
        (
            {"neuron": {"columns": ["layer", "neuron"], "rows": [[None, 1]]}},
            r"'layer' must be int, got NoneType",
        ),
        (
            {"neuron": {"columns": ["layer", "neuron"], "rows": [[0, -1]]}},
            r"needs neuron= an int >= 0, got -1",
        ),
        (
            {"neuron": {"columns": ["layer", "neuron"], "rows": [[0, 1], [0, 1]]}},
            r"duplicate components",
        ),
        (
            {"partition": {"columns": ["layer", "param", "unit"], "rows": [[0, 5, 1]]}},
            r"'param' must be str",
        ),
    ],
)
def test_bad_component_groups(tmp_path, group, message):
    data = {**_good(), "components": group}
    with pytest.raises(CircuitFormatError, match=message):
        Circuit.load(_write(tmp_path, data))


def test_format_errors_are_value_errors_and_name_the_file(tmp_path):
    path = _write(tmp_path, {**_good(), "version": 7})
    with pytest.raises(ValueError, match=str(path)):
        Circuit.load(path)
    assert issubclass(CircuitFormatError, ArtifactError) and issubclass(ArtifactError, ValueError)


def test_an_empty_circuit_round_trips(tmp_path):
    empty = Circuit((), method="nothing")
    assert Circuit.load(empty.save(tmp_path / "e.json")) == empty
