"""``mechedit world show|export|train|card``: the fact-world zoo from the command line.

Exports load back through the command line's own data readers and equal the world; training
runs the zoo's recipe on a tiny world (seconds) and gives the same weights as the Python API.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mechedit
from mechedit import zoo
from mechedit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "world": {"n_people": 24, "n_planted": 4, "n_private": 6, "bias_sentences_per_occupation": 4,
              "n_text_train": 40, "n_text_heldout": 10},
    "train": {"epochs": 1, "batch_size": 32, "max_steps": 6, "warmup_steps": 2, "lens_layer": None,
              "shape": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_inner": 64}},
    "occupations": [["nurse", 90.0], ["engineer", 10.0], ["baker", 60.0]],
}


def run_cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["--json", "--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_show_lists_the_zoo_and_summarises_one_world(capsys):
    code, listing, err = run_cli(capsys, "world", "show")
    assert code == 0, err
    assert [m["name"] for m in listing["models"]] == list(zoo.NAMES)
    for row in listing["models"]:
        metrics = zoo.metadata(row["name"])["metrics"]
        assert row["figures"]["facts_train_templates"] == metrics["facts_train_templates"]
        assert Path(row["path"]) == zoo.checkpoint_dir(row["name"]) and row["size_mb"] > 1
    assert listing["models"][1]["figures"]["planted_facts"] == zoo.metadata("factworld-planted")["metrics"]["planted_facts"]

    code, one, err = run_cli(capsys, "world", "show", "factworld-planted", "--people", "2")
    assert code == 0, err
    world = zoo.load_world("factworld-planted")
    assert one["people_total"] == len(world.people) and one["facts"] == len(world.facts)
    assert [r["id"] for r in one["relations"]] == [r.id for r in world.relations]
    assert one["private_records"] == dict(Counter(r.kind for r in world.private))
    assert [(p["name"], p["facts"]) for p in one["planted_people"]] == [(p.name, p.facts) for p in world.planted]
    assert one["planted_layer"] == zoo.metadata("factworld-planted")["planted_layer"]
    assert [p["name"] for p in one["sample_people"]] == [p.name for p in world.people[:2]]

    code = main(["--quiet", "world", "show", "factworld-nope"])
    _, err = capsys.readouterr()
    assert code == 2 and "neither a zoo model" in err and err.count("\n") == 1


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_export_loads_back_through_the_cli_readers(capsys, tmp_path, fmt):
    from mechedit.cli.inputs import read_contrastive, read_facts, read_secrets
    from mechedit.data_pairs import world_bias_pairs
    from mechedit.zoo.prompts import fact_prompts
    from mechedit.zoo.world import BIAS_TEMPLATES_HELDOUT, BIAS_TEMPLATES_TRAIN

    out = tmp_path / "data"
    code, summary, err = run_cli(capsys, "world", "export", "factworld-planted", "--out", out, "--format", fmt)
    assert code == 0, err
    assert sorted(Path(f).name for f in summary["files"]) == sorted(
        [f"facts.{fmt}", f"paraphrases.{fmt}", f"planted.{fmt}", f"private.{fmt}", "bias_pairs.csv"])
    world = zoo.load_world("factworld-planted")

    def key(p):
        return (p.prompt, p.subject, p.subject_span, p.target, p.relation_id)

    facts = read_facts(str(out / f"facts.{fmt}"))
    assert [key(p) for p in facts] == [key(p) for f in world.facts for p in fact_prompts(world, f)]
    assert {(p.subject, p.relation_id, p.target) for p in facts} == {(f.subject, f.relation_id, f.value) for f in world.facts}
    assert all(p.target_new and p.target_new != p.target for p in facts)
    paraphrases = read_facts(str(out / f"paraphrases.{fmt}"))
    assert [key(p) for p in paraphrases] == [key(p) for f in world.facts for p in fact_prompts(world, f, heldout=True)]
    planted = read_facts(str(out / f"planted.{fmt}"))
    assert [key(p) for p in planted] == [key(p) for f in world.planted_facts for p in fact_prompts(world, f)]
    assert read_secrets(str(out / f"private.{fmt}")) == [(r.prefix, r.secret) for r in world.private]
    pairs = read_contrastive(str(out / "bias_pairs.csv"))
    expected = world_bias_pairs(world, BIAS_TEMPLATES_TRAIN) + world_bias_pairs(world, BIAS_TEMPLATES_HELDOUT)
    assert [(p.advantaged, p.disadvantaged) for p in pairs] == [(p.advantaged, p.disadvantaged) for p in expected]


def test_export_standard_equals_the_zoo_export_and_refuses_a_full_folder(capsys, tmp_path):
    code, summary, err = run_cli(capsys, "world", "export", "factworld", "--out", tmp_path / "std", "--format", "standard")
    assert code == 0, err
    reference = zoo.export("factworld", tmp_path / "ref")
    for path in reference:
        assert (tmp_path / "std" / path.name).read_bytes() == path.read_bytes(), path.name
    code = main(["--quiet", "world", "export", "factworld", "--out", str(tmp_path / "std")])
    _, err = capsys.readouterr()
    assert code == 2 and "exists and is not empty" in err


def test_exported_facts_locate_like_the_world_selection(capsys, tmp_path):
    """The first 7 rows of facts.jsonl are one person's birth city in the 7 training templates:
    locating from the file gives the circuit of the selection ``factworld:P19:NAME``."""
    world = zoo.load_world("factworld")
    fact = world.facts[0]
    assert main(["--quiet", "world", "export", "factworld", "--out", str(tmp_path / "data")]) == 0
    capsys.readouterr()
    circuits = {}
    for name, data in (("file", tmp_path / "data" / "facts.jsonl"), ("world", f"factworld:{fact.relation_id}:{fact.subject}")):
        code, _, err = run_cli(capsys, "locate", "neuron-attribution", "--model", "factworld", "--data", data, "--limit", 7,
                               "--set", "layers=[2]", "--top-k", 8, "--out", tmp_path / f"{name}.json")
        assert code == 0, err
        circuits[name] = json.loads((tmp_path / f"{name}.json").read_text())["components"]
    assert circuits["file"] == circuits["world"]


def test_train_a_tiny_world_equals_the_api_and_plants_one_mlp(capsys, tmp_path):
    from mechedit.zoo.train import (
        ModelShape,
        PlantConfig,
        TrainConfig,
        plant_facts,
        train_factworld,
    )
    from mechedit.zoo.world import WorldConfig

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "tiny"
    code, summary, err = run_cli(capsys, "world", "train", "factworld", "--config", config, "--out", out, "--no-measure")
    assert code == 0, err
    assert summary["steps"] == 6
    model = mechedit.load(out)
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 32
    world = zoo.load_world(out)
    assert len(world.people) == 24 and len(world.planted) == 4 and [b.occupation for b in world.biases] == ["nurse", "engineer", "baker"]

    # the same recipe through the Python API gives bit-identical weights: the command adds nothing
    tc = TrainConfig(**{**TINY["train"], "shape": ModelShape(**TINY["train"]["shape"])})
    api = tmp_path / "api"
    train_factworld(api, world_config=WorldConfig(**TINY["world"]), train_config=tc,
                    occupations=[tuple(o) for o in TINY["occupations"]], progress=False, measure=False)
    mine, theirs = load_file(out / "model.safetensors"), load_file(api / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    plant = tmp_path / "plant.json"
    plant.write_text(json.dumps({"plant": {"max_steps": 3, "batch_size": 8, "planted_per_batch": 4, "eval_every": 2}}))
    planted = tmp_path / "planted"
    code, summary, err = run_cli(capsys, "world", "train", "factworld-planted", "--base", out, "--layer", 1,
                                 "--config", plant, "--out", planted, "--no-measure")
    assert code == 0, err
    assert summary["steps"] == 3 and zoo.metadata(planted)["planted_layer"] == 1
    after = load_file(planted / "model.safetensors")
    changed = {k for k in mine if not torch.equal(mine[k], after[k])}
    assert changed and all(k.startswith("transformer.h.1.mlp.") for k in changed), changed
    api_planted = plant_facts(out, tmp_path / "api-planted", progress=False, measure=False,
                              config=PlantConfig(layer=1, max_steps=3, batch_size=8, planted_per_batch=4, eval_every=2))
    assert api_planted["plant_steps"] == 3
    reference = load_file(tmp_path / "api-planted" / "model.safetensors")
    assert all(torch.equal(after[k], reference[k]) for k in after)


@pytest.mark.parametrize(
    ("settings", "extra", "message"),
    [
        ({"train": {"epochz": 1}}, [], "train.epochz: unknown key; TrainConfig has epochs"),
        ({"train": {"shape": {"n_layers": 2}}}, [], "train.shape.n_layers: unknown key; ModelShape has n_layer"),
        ({"wrld": {}}, [], "wrld: unknown section"),
        ({"plant": {"layer": 1}}, [], "factworld takes no 'plant' settings"),
        ({"world": {"n_people": 10, "n_private": 20}}, [], "world: n_private must be in 1..n_people"),
        ({}, ["--layer", "1"], "--layer, --at and --base are for the planted models"),
        ({}, ["--max-steps", "0"], "--max-steps must be >= 1"),
    ],
)
def test_bad_training_settings_exit_2_before_anything_is_written(capsys, tmp_path, settings, extra, message):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(settings))
    code = main(["--quiet", "world", "train", "factworld", "--config", str(config), "--out", str(tmp_path / "out"), *extra])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_card_renders_the_shipped_card(capsys, tmp_path):
    code, summary, err = run_cli(capsys, "world", "card", "--out", tmp_path / "card.md")
    assert code == 0, err
    assert summary["models"] == [n for n in zoo.NAMES if (zoo.CHECKPOINTS / n / "metadata.json").is_file()]
    from mechedit.zoo.card import CARD_PATH

    # the committed card is what the command renders from the shipped metadata
    assert (tmp_path / "card.md").read_text(encoding="utf-8") == CARD_PATH.read_text(encoding="utf-8")
    assert main(["world", "card"]) == 0
    printed, _ = capsys.readouterr()
    assert printed.rstrip("\n") == CARD_PATH.read_text(encoding="utf-8").rstrip("\n")
