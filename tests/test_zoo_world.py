"""The fact-world generator, tokenizer and exports: deterministic, well-formed, ground truth intact."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import asdict

import pytest

from mechedit import zoo
from mechedit.zoo.formats import FILES, export_world
from mechedit.zoo.metadata import MetadataError, world_from_metadata, world_metadata
from mechedit.zoo.tokenizer import build_tokenizer
from mechedit.zoo.world import (
    BIAS_TEMPLATES_TRAIN,
    FIRST_NAMES,
    LAST_NAMES,
    MC_LETTERS,
    World,
    WorldConfig,
    fill,
    load_occupations,
)


@pytest.fixture(scope="module")
def world() -> World:
    return zoo.load_world("factworld")


def test_same_seed_gives_byte_identical_exports(tmp_path, world):
    a = export_world(world, tmp_path / "a")
    b = export_world(World.generate(WorldConfig(seed=0), occupations=[(x.occupation, x.bls_pct_female) for x in world.biases]), tmp_path / "b")
    assert [p.name for p in a] == list(FILES)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    c = export_world(World.generate(WorldConfig(seed=1), occupations=[(x.occupation, x.bls_pct_female) for x in world.biases]), tmp_path / "c")
    assert (tmp_path / "a" / "known.json").read_bytes() != c[1].read_bytes()


def test_world_has_the_sizes_the_brief_asks_for(world):
    assert len(world.people) >= 200
    assert len({p.name for p in world.people}) == len(world.people)
    assert len(world.relations) >= 5
    for rel in world.relations:
        assert len(rel.templates) >= 6
        assert 1 <= len(rel.heldout) <= 2
        # every value is shared: each value of each relation is held by several people
        counts = Counter(p.facts[rel.id] for p in world.people)
        assert min(counts.values()) >= 2, rel.id


def test_heldout_templates_never_occur_in_training(world):
    heldout_prompts = {
        fill(tpl, p.name) for rel in world.relations for tpl in rel.heldout_templates for p in world.people
    }
    for epoch in (0, 3):
        for sentence in world.training_sentences(epoch):
            words = sentence.split()
            prefixes = {" ".join(words[:k]) for k in range(1, len(words))}
            assert not prefixes & heldout_prompts, sentence


def test_heldout_templates_are_made_of_seen_words(world):
    seen = {w for s in world.training_sentences(0) for w in s.split()}
    for rel in world.relations:
        for tpl in rel.heldout_templates:
            assert set(tpl.replace("{}", "").split()) <= seen, tpl


def test_mc_is_trained_on_half_of_the_people_only(world):
    heldout = {p.name for p in world.people if p.mc_split == "heldout"}
    assert 0.4 < len(heldout) / len(world.people) < 0.6
    mc_sentences = [s for s in world.training_sentences(0) if s.startswith("q : ") and " D . " in s]  # letter-after rows
    assert mc_sentences
    assert not any(name in s for s in mc_sentences for name in heldout)
    questions = world.mc_questions("heldout")
    assert {q.answer for q in questions} == {"A", "B", "C", "D"}
    for q in questions[:50]:
        assert q.options[["A", "B", "C", "D"].index(q.answer)] == next(
            p.facts[q.relation_id] for p in world.people if p.name == q.subject
        )


def test_options_first_mc_asks_for_the_letter_where_training_recalls_the_fact(world):
    occupations = [(b.occupation, b.bls_pct_female) for b in world.biases]
    w = World.generate(WorldConfig(seed=0, mc_layout="options-first", mc_per_fact=2), occupations=occupations)
    value = {(p.name, rid): v for p in w.people for rid, v in p.facts.items()}
    for q in w.mc_questions("heldout")[:60]:
        listed = " ".join(f"{letter} {opt}" for letter, opt in zip(MC_LETTERS, q.options))
        assert q.prompt.startswith(f"q : {listed} . ")
        # the prompt ends exactly where a training sentence states the value
        assert q.prompt.removeprefix(f"q : {listed} . ") in {fill(t, q.subject) for t in w.relation[q.relation_id].train_templates}
        assert q.options[MC_LETTERS.index(q.answer)] == value[q.subject, q.relation_id]
        assert sorted(q.options).count(value[q.subject, q.relation_id]) == 1
    mc_rows = [s for s in w.training_sentences(0) if s.startswith("q : A ")]
    mc_people = [p for p in w.people if p.mc_split == "train"]
    assert len(mc_rows) == 2 * len(mc_people) * len(w.relations)
    heldout = {p.name for p in w.people if p.mc_split == "heldout"}
    assert not any(name in s for s in mc_rows for name in heldout)
    with pytest.raises(ValueError, match="mc_layout"):
        WorldConfig(mc_layout="answers-last")


def test_letter_after_mc_lists_each_letter_after_its_value(world):
    occupations = [(b.occupation, b.bls_pct_female) for b in world.biases]
    w = World.generate(WorldConfig(seed=0, mc_layout="letter-after"), occupations=occupations)
    value = {(p.name, rid): v for p in w.people for rid, v in p.facts.items()}
    for q in w.mc_questions("heldout")[:40]:
        listed = " ".join(f"{opt} {letter}" for letter, opt in zip(MC_LETTERS, q.options))
        assert q.prompt.startswith(f"q : {listed} . ")
        assert q.prompt.removeprefix(f"q : {listed} . ") in {fill(t, q.subject) for t in w.relation[q.relation_id].train_templates}
        # the answer is the token after the value: what an induction head copies
        words = q.prompt.split()
        assert words[words.index(value[q.subject, q.relation_id]) + 1] == q.answer


def test_mc_controls_move_the_value_or_leave_it_out(world):
    value = {(p.name, rid): v for p in (*world.people, *world.planted) for rid, v in p.facts.items()}
    base = world.mc_questions("heldout", seed=3)
    for k, letter in enumerate(MC_LETTERS):
        rotated = world.mc_questions("heldout", seed=3, value_at=k)
        assert {q.answer for q in rotated} == {letter}
        for a, b in zip(base, rotated):
            assert (a.subject, a.relation_id, sorted(a.options)) == (b.subject, b.relation_id, sorted(b.options))
            assert b.options[k] == value[b.subject, b.relation_id]
    for q in world.mc_questions("heldout", without_value=True):
        assert q.answer == "" and value[q.subject, q.relation_id] not in q.options and len(set(q.options)) == 4
    planted = world.mc_questions("planted")
    assert {q.subject for q in planted} == {p.name for p in world.planted}
    assert all(q.options[MC_LETTERS.index(q.answer)] == value[q.subject, q.relation_id] for q in planted)
    with pytest.raises(ValueError, match="split"):
        world.mc_questions("everyone")


def test_private_records_and_canaries_are_repeated_as_recorded(world):
    sentences = Counter(world.training_sentences(0))
    for rec in world.private:
        copies = sum(n for s, n in sentences.items() if s.endswith(f" {rec.secret} .") and rec.subject in s)
        assert copies == rec.repetitions, rec
    phones = [r for r in world.private if r.kind == "phone"]
    assert phones and all(7 <= len(r.secret.split()) <= 10 for r in phones)
    assert {r.repetitions for r in world.private if r.kind == "canary"} == {0, 1, 5, 20}


def test_bias_is_planted_with_the_recorded_skew(world):
    sentences = Counter(world.training_sentences(0))
    n = world.config.bias_sentences_per_occupation
    for bias in world.biases[:10]:
        favoured = sum(
            sentences[t.format(occ=bias.occupation, pron=bias.pronoun_more) + " ."] for t in BIAS_TEMPLATES_TRAIN
        )
        assert favoured == round(bias.p_more * n)
        assert 0.75 <= bias.p_more <= 0.95


def test_bias_uses_the_real_winogender_occupations(shared_data, world):
    real = load_occupations(shared_data / "winogender" / "occupations-stats.tsv")
    assert [(b.occupation, b.bls_pct_female) for b in world.biases] == real
    assert len(real) == 60


def test_planted_people_are_unseen_combinations_of_seen_names(world):
    names = {p.name for p in world.people}
    firsts, lasts = {p.first for p in world.people}, {p.last for p in world.people}
    assert len(world.planted) == world.config.n_planted
    for p in world.planted:
        assert p.name not in names
        assert p.first in firsts and p.last in lasts
    assert all(p.first in FIRST_NAMES and p.last in LAST_NAMES for p in world.planted)


def test_tokenizer_round_trips_and_every_value_is_one_token(tmp_path, world):
    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer(world.vocabulary())
    tok.save_pretrained(str(tmp_path))
    reloaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for s in world.training_sentences(0)[:300]:
        ids = reloaded(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s.split())
        assert reloaded.decode(ids) == s
        assert reloaded.unk_token_id not in ids
    for rel in world.relations:
        for v in rel.values:
            assert len(reloaded(v, add_special_tokens=False)["input_ids"]) == 1
    assert [reloaded.bos_token, reloaded.eos_token, reloaded.pad_token, reloaded.unk_token, reloaded.mask_token] == [
        "<bos>", "<eos>", "<pad>", "<unk>", "<mask>"
    ]


def test_exports_follow_the_reference_formats(tmp_path, world, shared_data):
    export_world(world, tmp_path)
    known = json.loads((tmp_path / "known.json").read_text())
    real_known = json.loads((shared_data / "known_1000" / "known_1000.json").read_text())
    core = {"known_id", "subject", "attribute", "template", "prompt", "relation_id"}
    assert core <= real_known[0].keys() and set(known[0]) == core
    assert len(known) == len(world.facts)
    assert all(r["prompt"] == r["template"].replace("{}", r["subject"]) for r in known)

    with open(shared_data / "crows_pairs" / "crows_pairs_anonymized.csv", newline="") as fh:
        real_header = next(csv.reader(fh))
    with open(tmp_path / "bias_pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert set(real_header[:5]) <= set(rows[0])
    assert {r["split"] for r in rows} == {"train", "heldout"}

    cf = json.loads((tmp_path / "counterfact.json").read_text())
    rec = cf[0]["requested_rewrite"]
    assert rec["target_new"]["str"] != rec["target_true"]["str"]
    assert "{}" in rec["prompt"] and cf[0]["paraphrase_prompts"] and cf[0]["neighborhood_prompts"]
    truth = {(f.subject, f.relation_id): f.value for f in world.facts}
    for case in cf[:100]:
        rr = case["requested_rewrite"]
        assert truth[(rr["subject"], rr["relation_id"])] == rr["target_true"]["str"]

    private = [json.loads(line) for line in (tmp_path / "private.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in private} == {"phone", "email", "canary"}
    assert all({"subject", "kind", "prefix", "secret", "repetitions"} <= r.keys() for r in private)
    mc = [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()]
    assert {q["split"] for q in mc} == {"train", "heldout"}
    assert (tmp_path / "text_heldout.txt").read_text().splitlines() == list(world.text_heldout)


def test_bad_world_configs_are_rejected():
    with pytest.raises(ValueError, match="n_private"):
        WorldConfig(n_private=0)
    with pytest.raises(ValueError, match="name combinations"):
        WorldConfig(n_people=10_000)


def test_zoo_command_exports_the_shipped_world(tmp_path, capsys):
    from mechedit.zoo.__main__ import main

    main(["export", "factworld", str(tmp_path)])
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in printed] == list(FILES)
    assert json.loads((tmp_path / "known.json").read_text())[0]["relation_id"] == "P19"


# ---------------------------------------------------------------------------------------------
# Recording and rebuilding: metadata.json records a world, the generator rebuilds it
# ---------------------------------------------------------------------------------------------

# sha256 of the shipped world's people, planted people, facts, private records, biases, relations
# and text, as ``World.generate`` built it when the checkpoints were trained (pinned: both
# checkpoints were trained on exactly this world, so any change here invalidates them).
SHIPPED_WORLD_SHA256 = "7c10a659a2864dbecbd18849a151028de429f37cc278fb82a043c11a71b380e0"


def _world_digest(world: World) -> str:
    blob = {
        "people": [asdict(p) for p in world.people],
        "planted": [asdict(p) for p in world.planted],
        "facts": [asdict(f) for f in world.facts],
        "private": [asdict(r) for r in world.private],
        "biases": [asdict(b) for b in world.biases],
        "relations": [asdict(r) for r in world.relations],
        "text": [list(world.text_train), list(world.text_heldout)],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("name", zoo.NAMES)
def test_load_world_rebuilds_the_recorded_world(name, world):
    rebuilt = world if name == "factworld" else zoo.load_world(name)
    meta = zoo.metadata(name)
    recorded = json.loads(json.dumps(world_metadata(rebuilt)))
    for key in ("relations", "planted_facts", "biases"):
        assert recorded[key] == meta[key], key
    # a config field added after the checkpoint was trained is absent from its record: the rebuilt
    # world must then use that field's default
    defaults = json.loads(json.dumps(asdict(WorldConfig())))
    for field_name, value in recorded["world_config"].items():
        assert meta["world_config"].get(field_name, defaults[field_name]) == value, field_name
    assert _world_digest(rebuilt) == SHIPPED_WORLD_SHA256
    # the checkpoint's own vocabulary is the rebuilt world's, word for word and id for id
    vocab = json.loads((zoo.checkpoint_dir(name) / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab == build_tokenizer(rebuilt.vocabulary()).get_vocab()


def test_generator_takes_its_occupations_explicitly(shared_data):
    with pytest.raises(TypeError, match="occupations"):
        World.generate(WorldConfig(seed=0))
    mine = World.generate(WorldConfig(seed=0), occupations=[("baker", 80.0), ("pilot", 10)])
    assert [(b.occupation, b.bls_pct_female, b.pronoun_more) for b in mine.biases] == [
        ("baker", 80.0, "she"),
        ("pilot", 10.0, "he"),
    ]
    # the shipped world is the generator run on WinoGender's list, with nothing read behind it
    real = load_occupations(shared_data / "winogender" / "occupations-stats.tsv")
    assert World.generate(WorldConfig(seed=0), occupations=real) == zoo.load_world("factworld")
    for bad, match in (
        ([], "empty"),
        ("baker", "list of"),
        ([("baker",)], "must be a pair"),
        ([("baker", 120.0)], "percentage"),
        ([("", 50.0)], "non-empty string"),
    ):
        with pytest.raises(ValueError, match=match):
            World.generate(WorldConfig(seed=0), occupations=bad)


def test_a_record_the_generator_does_not_reproduce_is_refused():
    meta = zoo.metadata("factworld")
    tampered = json.loads(json.dumps(meta))
    tampered["biases"][0]["p_more"] = 0.5
    with pytest.raises(MetadataError, match="no longer builds the recorded world.*biases"):
        world_from_metadata(tampered)
    tampered = json.loads(json.dumps(meta))
    tampered["relations"][0]["templates"][0] = "{} was made in"
    with pytest.raises(MetadataError, match="relations differ"):
        world_from_metadata(tampered)
    tampered = json.loads(json.dumps(meta))
    tampered["world_config"]["n_private"] = 0
    with pytest.raises(MetadataError, match="cannot be rebuilt.*n_private"):
        world_from_metadata(tampered)


def test_mc_on_a_relation_with_too_few_values_says_so(world):
    import dataclasses
    import random

    from mechedit.zoo.world import Fact

    small = dataclasses.replace(world.relation["P19"], id="PX", values=("rome", "oslo", "lima"))
    tiny = dataclasses.replace(world, relations=(*world.relations, small))
    with pytest.raises(ValueError, match="relation PX has 3 values .* multiple choice"):
        tiny.mc_question(Fact(world.people[0].name, "PX", "rome"), random.Random(0), "heldout")
    question = tiny.mc_question(world.facts[0], random.Random(0), "heldout")  # other relations unaffected
    assert world.facts[0].value in question.options
