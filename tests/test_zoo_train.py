"""The training recipes, exercised on a tiny world and a tiny model (seconds, not the full 25 minutes)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mechedit
from mechedit.zoo import load_world, metadata
from mechedit.zoo.metadata import MetadataError, read_metadata
from mechedit.zoo.train import ModelShape, PlantConfig, TrainConfig, plant_facts, train_factworld
from mechedit.zoo.world import WorldConfig

TINY_WORLD = WorldConfig(
    n_people=24, n_planted=4, n_private=6, bias_sentences_per_occupation=4, n_text_train=40, n_text_heldout=10
)
TINY_TRAIN = TrainConfig(
    epochs=1, batch_size=32, max_steps=6, warmup_steps=2, lens_layer=None, pack=False, lookup_drill_fraction=0.0, shape=ModelShape(n_layer=2, n_embd=32, n_head=2, n_inner=64)
)
OCCUPATIONS = [("nurse", 90.0), ("engineer", 10.0), ("baker", 60.0)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_factworld")
    meta = train_factworld(out, world_config=TINY_WORLD, train_config=TINY_TRAIN, occupations=OCCUPATIONS, progress=False, measure=False)
    return out, meta


def test_tiny_training_run_writes_a_loadable_checkpoint(tiny_run):
    out, meta = tiny_run
    assert meta["steps"] == 6
    assert read_metadata(out)["world_config"]["n_people"] == 24
    model = mechedit.load(out)
    assert model.cfg.n_layers == 2
    logits = model(model.to_tokens("alvo abernoth was born in"))
    assert logits.shape[-1] == len(model.tokenizer)
    world = load_world(out)
    assert len(world.people) == 24
    assert [f.__dict__ for f in world.planted_facts] == metadata(out)["planted_facts"]


def test_training_is_deterministic(tiny_run, tmp_path):
    out, _ = tiny_run
    again = tmp_path / "again"
    train_factworld(again, world_config=TINY_WORLD, train_config=TINY_TRAIN, occupations=OCCUPATIONS, progress=False, measure=False)
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # and a different seed really changes the weights
    other = tmp_path / "other"
    train_factworld(other, world_config=TINY_WORLD, train_config=TrainConfig(**{**TINY_TRAIN.__dict__, "seed": 1}), occupations=OCCUPATIONS, progress=False, measure=False)
    assert not torch.equal(load_file(other / "model.safetensors")["transformer.h.0.mlp.c_fc.weight"], first["transformer.h.0.mlp.c_fc.weight"])


def test_planting_changes_only_the_recorded_mlp(tiny_run, tmp_path):
    base, _ = tiny_run
    out = tmp_path / "planted"
    meta = plant_facts(base, out, config=PlantConfig(layer=1, max_steps=3, batch_size=8, planted_per_batch=4, eval_every=2), progress=False, measure=False)
    assert meta["planted_layer"] == 1
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "planting changed nothing"
    assert all(k.startswith("transformer.h.1.mlp.") for k in changed), changed
    with pytest.raises(ValueError, match="layer 5 out of range"):
        plant_facts(base, tmp_path / "bad", config=PlantConfig(layer=5), progress=False, measure=False)


def test_metadata_is_validated(tmp_path, tiny_run):
    out, _ = tiny_run
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(MetadataError, match="not found"):
        read_metadata(bad)
    (bad / "metadata.json").write_text("{not json")
    with pytest.raises(MetadataError, match="not valid JSON"):
        read_metadata(bad)
    text = (out / "metadata.json").read_text()
    (bad / "metadata.json").write_text(text.replace('"version": 1', '"version": 99'))
    with pytest.raises(MetadataError, match="version 99"):
        read_metadata(bad)
    (bad / "metadata.json").write_text(text.replace('"biases"', '"biasez"'))
    with pytest.raises(MetadataError, match="biases"):
        read_metadata(bad)


def test_induction_options_add_a_warmup_phase_and_rows(tmp_path):
    """Warm-up steps run before the corpus, induction is measured, and ``on_epoch`` can stop the run."""
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "max_steps": None, "epochs": 3, "warmup_induction_steps": 3, "induction_fraction": 0.25})
    seen = []

    def stop_after_first(model, world, tokenizer, entry):
        seen.append(entry["epoch"])
        return True

    meta = train_factworld(tmp_path / "ind", world_config=TINY_WORLD, train_config=tc, occupations=OCCUPATIONS, progress=False, measure=False, on_epoch=stop_after_first)
    warm, first = meta["loss_history"]
    assert warm["epoch"] == -1 and warm["step"] == 3 and 0.0 <= warm["induction"] <= 1.0
    assert seen == [0] and len(meta["loss_history"]) == 2  # stopped after epoch 0 of 3
    n_corpus = len(load_world(tmp_path / "ind").training_sentences(0))
    # a quarter of the epoch's rows are induction rows: 4/3 of the corpus, in batches of 32
    assert first["step"] == 3 + -(-round(n_corpus * 4 / 3) // 32)


def test_lookup_drills_name_the_letter_of_the_named_value():
    import random
    from dataclasses import replace

    from mechedit.zoo.train import lookup_drills
    from mechedit.zoo.world import World

    world = World.generate(replace(TINY_WORLD, mc_layout="question-first"), occupations=OCCUPATIONS)
    rows = lookup_drills(world, 40, random.Random(0))
    for row in rows:
        words = row.split()
        options = dict(zip(words[2:10:2], words[3:10:2]))  # letter -> value
        named, letter = words[11], words[-1]
        assert options[letter] == named and len(set(options.values())) == 4
    assert len({r.split()[-1] for r in rows}) == 4  # every letter is an answer somewhere
    # letter-after worlds: the value, then its letter, and the drill ends with the value's letter
    world = World.generate(replace(TINY_WORLD, mc_layout="letter-after"), occupations=OCCUPATIONS)
    for row in lookup_drills(world, 40, random.Random(0)):
        words = row.split()
        options = dict(zip(words[3:10:2], words[2:10:2]))  # letter -> value
        assert words[-3] == "." and options[words[-1]] == words[-2]


def test_induction_rows_and_their_accuracy():
    import random

    from mechedit.zoo.train import induction_accuracy, induction_sentences

    words = [f"w{i}" for i in range(50)]
    for row in induction_sentences(words, 20, random.Random(0), length=(3, 6)):
        seq = row.split()
        assert 6 <= len(seq) <= 12 and seq[: len(seq) // 2] == seq[len(seq) // 2 :]

    class Tok:  # word-level tokenizer over ``words`` + specials
        def __init__(self):
            self.vocab = {w: i for i, w in enumerate(["<bos>", "<eos>", "<pad>", *words])}
            self.bos_token_id, self.eos_token_id, self.pad_token_id = 0, 1, 2

        def get_vocab(self):
            return self.vocab

    def copier(ids):  # predicts token p - L + 1 at position p of the second copy: a perfect induction head
        logits = torch.zeros(*ids.shape, 53)
        real = (ids != 2).sum(-1)
        for b in range(ids.shape[0]):
            half = (int(real[b]) - 1) // 2
            for p in range(half + 1, 2 * half):
                logits[b, p, ids[b, p - half + 1]] = 1.0
        return logits

    assert induction_accuracy(copier, Tok(), words, n=30, length=(3, 6)) == 1.0
    assert induction_accuracy(lambda ids: torch.zeros(*ids.shape, 53), Tok(), words, n=30, length=(3, 6)) < 0.1


def _lens_loss(model, world, tokenizer, layer: int) -> float:
    """Next-token loss of the training corpus read through the logit lens before block ``layer`` (nats)."""
    from mechedit.metrics import next_token_labels, token_cross_entropy
    from mechedit.zoo.measure import Encoder

    enc = Encoder(tokenizer)
    ids, _ = enc.batch(world.training_sentences(0)[:200])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer]
        logits = model.lm_head(model.transformer.ln_f(hidden))
    return token_cross_entropy(logits[:, :-1], next_token_labels(ids, ids != enc.pad), reduction="mean").item()


def test_lens_supervision_makes_the_middle_of_the_model_predict(tmp_path):
    """With ``lens_layer`` the residual stream before that block learns to predict the next token."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    shape = ModelShape(n_layer=3, n_embd=32, n_head=2, n_inner=64)
    losses = {}
    for name, lens in (("plain", None), ("lens", 1)):
        tc = TrainConfig(**{**TINY_TRAIN.__dict__, "max_steps": 100, "epochs": 10, "shape": shape, "lens_layer": lens})
        train_factworld(tmp_path / name, world_config=TINY_WORLD, train_config=tc, occupations=OCCUPATIONS, progress=False, measure=False)
        model = GPT2LMHeadModel.from_pretrained(tmp_path / name).eval()
        tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / name)
        losses[name] = _lens_loss(model, load_world(tmp_path / name), tok, 1)
    assert losses["lens"] < losses["plain"] - 0.25, losses  # measured: 4.10 vs 4.53 nats
    with pytest.raises(ValueError, match="lens_layer must be in"):
        TrainConfig(shape=shape, lens_layer=3)


def test_namesake_replay_draws_the_planted_peoples_namesakes(tiny_run, tmp_path):
    from mechedit.zoo.world import World

    world = World.generate(TINY_WORLD, occupations=OCCUPATIONS)
    firsts = {p.name.split()[0] for p in world.planted}
    namesakes = world.namesake_sentences()
    people = [p for p in world.people if p.name.split()[0] in firsts]
    assert people and all(any(f" {p.name} " in f" {s} " for p in people) for s in namesakes)
    corpus = set(world.training_sentences(0))
    assert set(namesakes) <= corpus  # their fact sentences, as the corpus has them
    assert len(namesakes) == sum(len(p.facts) for p in people) * len(world.relations[0].train_templates)
    base, _ = tiny_run
    runs = {}
    for share in (0.0, 0.5):
        cfg = PlantConfig(layer=1, max_steps=3, batch_size=8, planted_per_batch=4, eval_every=2, namesake_replay=share)
        plant_facts(base, tmp_path / str(share), config=cfg, progress=False, measure=False)
        runs[share] = load_file(tmp_path / str(share) / "model.safetensors")["transformer.h.1.mlp.c_fc.weight"]
    assert not torch.equal(runs[0.0], runs[0.5])  # the namesake rows really enter the batches
    with pytest.raises(ValueError, match="namesake_replay"):
        PlantConfig(namesake_replay=1.5)


def test_packed_rows_hold_every_sentence_once_within_the_width():
    import random

    from mechedit.zoo.measure import Encoder
    from mechedit.zoo.tokenizer import build_tokenizer
    from mechedit.zoo.train import _packed
    from mechedit.zoo.world import World

    world = World.generate(TINY_WORLD, occupations=OCCUPATIONS)
    enc = Encoder(build_tokenizer(world.vocabulary()))
    sentences = world.training_sentences(0)
    rows = _packed(enc, sentences, 64, random.Random(0))
    assert all(r[0] == enc.bos and r[-1] == enc.eos and len(r) <= 64 for r in rows)
    assert len(rows) < len(sentences) / 3  # several sentences per row
    laid = [i for r in rows for i in r[1:-1]]
    assert sorted(laid) == sorted(i for s in sentences for i in enc.ids(s)[1:])  # each sentence once, whole


def test_packed_training_runs_on_packed_rows(tmp_path):
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "max_steps": None, "epochs": 1, "batch_size": 8, "pack": True})
    meta = train_factworld(tmp_path / "packed", world_config=TINY_WORLD, train_config=tc, occupations=OCCUPATIONS, progress=False, measure=False)
    n_sentences = len(load_world(tmp_path / "packed").training_sentences(0))
    assert meta["steps"] < n_sentences / 8 / 3  # an epoch is a few packed rows, not one row per sentence
    assert meta["train_config"]["pack"] is True


def test_the_mc_recipe_file_trains_with_its_settings(tmp_path):
    """``mechedit/zoo/factworld-mc.json`` (issue 7's MC recipe, not yet the shipped default) is a valid
    settings file and each of its fields reaches the run (checked on a tiny world, 3 steps)."""
    from importlib.resources import files

    from mechedit.zoo.build import read_settings, train_zoo_model

    settings = read_settings(files("mechedit.zoo") / "factworld-mc.json")
    assert settings["train"]["lens_layer"] == 4 and settings["world"]["mc_layout"] == "letter-after"
    tiny = {
        "world": {**settings["world"], **{k: getattr(TINY_WORLD, k) for k in ("n_people", "n_planted", "n_private",
                                                                            "bias_sentences_per_occupation",
                                                                            "n_text_train", "n_text_heldout")}},
        "train": {**settings["train"], "threads": 1, "warmup_steps": 2,
                  "shape": {"n_layer": 5, "n_embd": 32, "n_head": 2, "n_inner": 64}},
        "occupations": [list(o) for o in OCCUPATIONS],
    }
    meta = train_zoo_model("factworld", tmp_path / "mc", settings=tiny, max_steps=3, progress=False, measure=False)
    for key, value in settings["train"].items():
        if key != "threads":
            assert meta["train_config"][key] == value, key
    for key, value in settings["world"].items():
        assert meta["world_config"][key] == value, key
