"""The circuits/ library matches the shipped checkpoints, and the loaders read the fact world's exports."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

import mechedit
from mechedit import zoo
from mechedit.circuit import Circuit
from mechedit.data import load_counterfact, load_known
from mechedit.provenance import weights_hash

CIRCUITS = sorted((Path(__file__).resolve().parents[1] / "circuits").glob("*.json"))


@functools.cache
def _shipped(name: str):
    """One load per zoo model for all the library's files (validating a circuit leaves the model as it is)."""
    return mechedit.load(name)


@pytest.mark.parametrize("path", CIRCUITS, ids=[p.stem for p in CIRCUITS])
def test_library_circuits_load_and_fit_the_shipped_model(path):
    circuit = Circuit.load(path)
    name = circuit.provenance.model_name
    assert name in zoo.NAMES, f"{path.name} was made on {name!r}, not a shipped model"
    model = _shipped(name)
    circuit.validate(model)
    assert circuit.provenance.weights_hash == weights_hash(model), (
        f"{path.name} is stale: the {name} weights changed; rebuild with `mechedit circuits`"
    )


def test_ground_truth_names_the_planted_layer():
    circuit = Circuit.load(Path(__file__).resolve().parents[1] / "circuits" / "factworld-planted_ground_truth.json")
    (component,) = list(circuit)
    assert component.site == "mlp"
    assert component.layer == zoo.metadata("factworld-planted")["planted_layer"]


def test_loaders_read_the_fact_world_exports(tmp_path):
    zoo.export("factworld", tmp_path)
    world = zoo.load_world("factworld")
    known = load_known(tmp_path / "known.json")
    assert len(known) == len(world.facts)
    assert [(k.subject, k.target) for k in known[:50]] == [(f.subject, f.value) for f in world.facts[:50]]
    assert all(k.prompt[k.subject_span[0] : k.subject_span[1]] == k.subject for k in known[:50])
    rewrites = load_counterfact(tmp_path / "counterfact.json")
    assert len(rewrites) == len(world.facts)
    assert all(r.target_new and r.target_new != r.target for r in rewrites)
    paraphrases = load_counterfact(tmp_path / "counterfact.json", kind="paraphrase")
    assert len(paraphrases) == 2 * len(world.facts)
    planted = load_known(tmp_path / "planted.json")
    assert {p.subject for p in planted} == {p.name for p in world.planted}
    # and the loaded prompts tokenise against the model: every target is one token
    from mechedit.tokens import tokenize_facts

    batch = tokenize_facts(mechedit.load("factworld"), known[:64])
    assert batch.target_ids.shape == (64,)
