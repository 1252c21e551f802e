"""Artifacts: atomic writes with ordinary permissions, strict JSON, and every reader fuzzed.

The fuzz tests start from a valid file of each format (circuit, scores, weight edit, edit report,
zoo metadata), damage it (truncate, flip bytes, put random JSON at a random place, or hand-picked
hostile values: deep nesting, 5,000-digit integers, NaN, lone surrogates) and require that the
loader either raises that format's own error or returns an object that saves and loads again.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mechedit.artifacts import (
    ArtifactError,
    ModelMismatchError,
    check_model,
    parse_json,
    read_json,
    read_tensors,
    tensors_hash,
    write_json_atomic,
    write_tensors,
)
from mechedit.circuit import Circuit, CircuitFormatError
from mechedit.components import Component
from mechedit.edit.weights import BaseModelMismatchError, EditFormatError, WeightEdit, zero_neurons
from mechedit.evaluate.facts import EditReport, EvalRow, ReportFormatError
from mechedit.provenance import Provenance
from mechedit.scores import Scores, ScoresFormatError
from mechedit.zoo.metadata import MetadataError, read_metadata, write_metadata


class Oops(ArtifactError):
    pass


FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- writing -------------------------------------------------------------------------------------


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_gets_ordinary_permissions(tmp_path, umask_027, tiny_bridge):
    written = [
        write_json_atomic(tmp_path / "a.json", {"x": [1, 2]}),
        write_tensors(tmp_path / "t.safetensors", {"w": torch.ones(2)}),
        Circuit((Component("mlp", 0),)).save(tmp_path / "c.json"),
        Scores(torch.ones(2), ("layer",), "mlp_out", "m").save(tmp_path / "s"),
        tmp_path / "s.safetensors",
        EditReport((EvalRow("efficacy", "p", 0.5, 0.1, 3),), {}).save(tmp_path / "r.json"),
        write_metadata(tmp_path / "zoo", _metadata()),
    ]
    edit = zero_neurons(tiny_bridge, [(0, 1)]).save(tmp_path / "edit")
    written += [edit / "manifest.json", edit / "tensors.safetensors"]
    # safetensors alone would write 0o600 whatever the umask
    assert {p.name: _mode(p) for p in written} == {p.name: umask_027 for p in written}
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json_atomic(tmp_path / "a.json", {"x": 1})
    with pytest.raises(ValueError, match="Out of range float values"):
        write_json_atomic(path, {"x": float("nan")})
    with pytest.raises(AttributeError):
        write_tensors(tmp_path / "t.safetensors", {"w": "not a tensor"})
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# -- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ('{"a": ' * 100 + "1" + "}" * 100, "nested deeper than 64 levels"),
        ('{"n": ' + "7" * 5000 + "}", "not a valid mechedit JSON value"),
        ('{"n": NaN}', "NaN is not a number JSON allows"),
        ('{"n": -Infinity}', "-Infinity is not a number JSON allows"),
        ('{"n": 1e400}', "1e400 overflows a float"),
        ('{"s": "\\ud800"}', "lone surrogate"),
        ('{"a": 1', "not valid JSON"),
    ],
)
def test_hostile_json_is_a_format_error(text, message):
    with pytest.raises(Oops, match=message):
        parse_json(text, error=Oops, where="x.json")


def test_read_json_names_the_path_and_what_to_pass(tmp_path):
    with pytest.raises(Oops, match="absent.json not found; pass a thing") as err:
        read_json(tmp_path / "absent.json", fmt="f", version=1, error=Oops, expected="a thing")
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(Oops, match="is a folder; pass a thing") as err:
        read_json(tmp_path, fmt="f", version=1, error=Oops, expected="a thing")
    assert not isinstance(err.value, FileNotFoundError)
    path = write_json_atomic(tmp_path / "old.json", {"format": "f", "version": 1})
    assert read_json(path, fmt="f", version=2, reads=(1,), error=Oops, expected="")["version"] == 1
    with pytest.raises(Oops, match=r"unsupported version 1 of f; this mechedit reads versions \[2\]"):
        read_json(path, fmt="f", version=2, error=Oops, expected="")


def test_tensor_files_are_checked_by_name_shape_dtype_and_hash(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    path = write_tensors(tmp_path / "t.safetensors", tensors)
    good = tensors_hash(tensors)
    kw = {"error": Oops, "expected": "x"}
    assert torch.equal(read_tensors(path, specs={"w": ([2, 3], "float32")}, hash=good, **kw)["w"], tensors["w"])
    with pytest.raises(Oops, match=r"only in the file \['w'\], only in the JSON \['v'\]"):
        read_tensors(path, names=["v"], **kw)
    with pytest.raises(Oops, match=r"file \[2, 3\] float32, the JSON \[3, 2\] float32"):
        read_tensors(path, specs={"w": ([3, 2], "float32")}, **kw)
    save_file({"w": tensors["w"] + 1}, str(path))
    with pytest.raises(Oops, match="do not match the hash"):
        read_tensors(path, hash=good, **kw)


def test_provenance_field_types_are_checked():
    good = Provenance(model_name="m", weights_hash="h").to_dict()
    assert Provenance.from_dict(good) == Provenance(model_name="m", weights_hash="h")
    for change, message in [
        ({"weights_hash": ["h"]}, "'weights_hash' must be a string, got list"),
        ({"model_name": None}, "'model_name' must be a string"),
        ({"seed": 1.5}, "'seed' must be an integer or null"),
        ({"seed": True}, "'seed' must be an integer or null"),
        ({"data_hash": 3}, "'data_hash' must be a string or null"),
        ({"extra": []}, "'extra' must be an object"),
        ({"extra": {"x": float("nan")}}, "'extra' must hold plain finite JSON values"),
    ]:
        with pytest.raises(ValueError, match=message):
            Provenance.from_dict({**good, **change})


def test_check_model_warns_or_raises_naming_both_models(tiny_bridge):
    same = Provenance.of(tiny_bridge)
    assert check_model(same, tiny_bridge, strict=True)
    other = Provenance(model_name="gpt2-other", weights_hash="0000000000000000")
    with pytest.warns(UserWarning, match=rf"gpt2-other \(weights 0000000000000000\).*\(weights {same.weights_hash}\)"):
        assert not check_model(other, tiny_bridge, what="this thing")
    with pytest.raises(ModelMismatchError, match="this thing came from gpt2-other"):
        check_model(other, tiny_bridge, strict=True, what="this thing")
    assert issubclass(BaseModelMismatchError, ModelMismatchError)


def test_weight_edit_files_carry_a_tensor_hash(tiny_bridge, tmp_path):
    folder = zero_neurons(tiny_bridge, [(0, 1)]).save(tmp_path / "edit")
    manifest = json.loads((folder / "manifest.json").read_text())
    tensors = {n: torch.zeros(s["shape"]) for n, s in manifest["tensors"].items()}
    save_file(tensors, str(folder / "tensors.safetensors"))  # right names and shapes, wrong values
    with pytest.raises(EditFormatError, match="do not match the hash in the manifest"):
        WeightEdit.load(folder)
    del manifest["tensors_hash"]  # manifests written before the hash was added still load
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert set(WeightEdit.load(folder).names) == set(tensors)
    with pytest.raises(EditFormatError, match="is a file; pass the folder"):
        WeightEdit.load(folder / "manifest.json")
    with pytest.raises(EditFormatError, match="manifest.json not found") as err:
        WeightEdit.load(tmp_path / "nowhere")
    assert isinstance(err.value, FileNotFoundError)


def test_report_keeps_non_finite_values_and_rejects_bad_rows(tmp_path):
    report = EditReport((EvalRow("fluency", "perplexity", 3.0, float("inf"), 2),), {"seed": 1})
    path = report.save(tmp_path / "r.json")
    assert json.loads(path.read_text())["rows"][0]["after"] == "inf"
    assert EditReport.load(path).rows == report.rows
    data = json.loads(path.read_text())
    for change, message in [
        ({"before": "3"}, r"rows\[0\]\['before'\] must be int or float, got str"),
        ({"n": 2.0}, r"rows\[0\]\['n'\] must be int"),
        ({"extra": 1}, r"unknown \['extra'\]"),
    ]:
        path.write_text(json.dumps({**data, "rows": [{**data["rows"][0], **change}]}))
        with pytest.raises(ReportFormatError, match=message):
            EditReport.load(path)


# -- fuzzing every reader --------------------------------------------------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_hostile = st.sampled_from(
    ["[" * 3000 + "]" * 3000, "9" * 5000, "NaN", "Infinity", "1e999", '"\\ud800"', "-0", '""', "{}", "[]"]
)


def _paths(doc, prefix=()):
    """Every place in a JSON document: key paths to each dict value and list item."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            yield from _paths(v, (*prefix, i))


def _put(doc, path, raw):
    """The document's JSON text with the value at ``path`` replaced by the JSON text ``raw``."""
    marker = "\u0000MARK\u0000"
    doc = json.loads(json.dumps(doc))
    if not path:
        return raw
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = marker
    return json.dumps(doc).replace(json.dumps(marker), raw)


@st.composite
def _damage(draw, text: str):
    """A damaged version of a valid JSON file's ``text``."""
    kind = draw(st.sampled_from(["truncate", "bytes", "value", "hostile", "whole"]))
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    if kind == "bytes":
        data = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    doc = json.loads(text)
    if kind == "whole":
        return json.dumps(draw(_json_values)).encode()
    path = draw(st.sampled_from(list(_paths(doc))[1:]))
    raw = draw(_hostile) if kind == "hostile" else json.dumps(draw(_json_values))
    return _put(doc, path, raw).encode("utf-8", "surrogatepass")


def _fuzz(path: Path, damaged: bytes, load, resave, error: type[ArtifactError]):
    """Load the damaged file: the format's error, or a result that saves and loads again."""
    path.write_bytes(damaged)
    try:
        loaded = load()
    except error:
        return
    # what loads must also be writable again (NaN in provenance used to load but not save)
    resave(loaded)


def _same(a, b) -> None:
    assert repr(a) == repr(b)  # repr, so that NaN == NaN; both are frozen dataclasses


def _circuit() -> Circuit:
    return Circuit(
        (
            Component("neuron", 1, neuron=17),
            Component("head", 0, head=2, pos=3),
            Component("partition", 0, param="transformer.h.0.mlp.c_fc.weight", unit=5),
        ),
        method="m",
        config={"k": 3, "nested": {"a": [1, 2]}},
        provenance=Provenance(model_name="tiny", weights_hash="0123456789abcdef", seed=1),
    )


@FUZZ
@given(data=st.data())
def test_fuzz_circuit_reader(tmp_path, data):
    path = _circuit().save(tmp_path / "c.json")
    damaged = data.draw(_damage(path.read_text()))
    _fuzz(path, damaged, lambda: Circuit.load(path), lambda c: _same(c, Circuit.load(c.save(tmp_path / "again.json"))), CircuitFormatError)


def _scores() -> Scores:
    return Scores(
        torch.arange(6.0).reshape(2, 3),
        ("prompt", "partition"),
        "partition",
        "pcgu",
        config={"lr": 0.1},
        provenance=Provenance(model_name="tiny", weights_hash="0123456789abcdef"),
        labels={"prompt": ("a", "b")},
        partitions={"a.weight": 2, "b.bias": 1},
    )


@FUZZ
@given(data=st.data())
def test_fuzz_scores_reader(tmp_path, data):
    json_path = _scores().save(tmp_path / "s")
    tensor_path = tmp_path / "s.safetensors"
    if data.draw(st.booleans()):
        damaged = data.draw(_damage(json_path.read_text()))
        _fuzz(json_path, damaged, lambda: Scores.load(json_path), lambda s: Scores.load(s.save(tmp_path / "again")), ScoresFormatError)
    else:
        raw = bytearray(tensor_path.read_bytes())
        cut = data.draw(st.integers(0, len(raw)))
        for _ in range(data.draw(st.integers(0, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        _fuzz(tensor_path, bytes(raw[:cut]), lambda: Scores.load(json_path), lambda s: s.save(tmp_path / "again"), ScoresFormatError)


@pytest.fixture(scope="module")
def saved_edit_dir(tiny_bridge, tmp_path_factory) -> Path:
    return zero_neurons(tiny_bridge, [(0, 1), (1, 3)]).save(tmp_path_factory.mktemp("edit") / "e")


@FUZZ
@given(data=st.data())
def test_fuzz_weight_edit_reader(saved_edit_dir, tmp_path, data):
    folder = tmp_path / "e"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved_edit_dir, folder)
    load, resave = (lambda: WeightEdit.load(folder)), (lambda e: e.save(tmp_path / "again", overwrite=True))
    if data.draw(st.booleans()):
        damaged = data.draw(_damage((folder / "manifest.json").read_text()))
        _fuzz(folder / "manifest.json", damaged, load, resave, EditFormatError)
    else:
        raw = bytearray((folder / "tensors.safetensors").read_bytes())
        cut = data.draw(st.integers(0, len(raw)))
        for _ in range(data.draw(st.integers(0, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        _fuzz(folder / "tensors.safetensors", bytes(raw[:cut]), load, resave, EditFormatError)


@FUZZ
@given(data=st.data())
def test_fuzz_report_reader(tmp_path, data):
    report = EditReport(
        (EvalRow("efficacy", "p_target", 0.9, 0.1, 4), EvalRow("fluency", "perplexity", 3.0, float("inf"), 2)),
        {"edit": "zero 3 neurons", "seed": 0},
    )
    path = report.save(tmp_path / "r.json")
    damaged = data.draw(_damage(path.read_text()))
    _fuzz(path, damaged, lambda: EditReport.load(path), lambda r: _same(r, EditReport.load(r.save(tmp_path / "again.json"))), ReportFormatError)


def _metadata() -> dict:
    return {
        "name": "tiny",
        "world_config": {"n_people": 4, "seed": 0},
        "relations": [{"id": "lives_in", "values": ["a", "b"]}],
        "biases": [{"occupation": "nurse", "bls_pct_female": 87.0, "p_more": 0.5, "pronoun_more": "she"}],
        "planted_facts": [],
        "train_config": {"epochs": 2},
    }


@FUZZ
@given(data=st.data())
def test_fuzz_zoo_metadata_reader(tmp_path, data):
    path = write_metadata(tmp_path / "ckpt", _metadata())
    damaged = data.draw(_damage(path.read_text()))
    _fuzz(path, damaged, lambda: read_metadata(path.parent), lambda m: write_metadata(tmp_path / "again", m), MetadataError)


def test_a_saved_edit_on_another_architecture_says_so(tiny_bridge, tmp_path):
    import mechedit
    from mechedit.zoo.random_model import random_checkpoint

    neox = mechedit.load(random_checkpoint(tmp_path / "neox", "neox", n_layer=2, n_embd=64, n_head=4))
    folder = zero_neurons(tiny_bridge, [(0, 1)]).save(tmp_path / "edit")
    for check_base in (True, False):
        with pytest.raises(
            BaseModelMismatchError, match="this edit is for a GPT2LMHeadModel, not a GPTNeoXForCausalLM"
        ):
            WeightEdit.load(folder).apply(neox, check_base=check_base)
