"""factworld-mlm: the masked corpus, the BERT training recipe (tiny) and the shipped model's targets."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mechedit
from mechedit import zoo
from mechedit.zoo.mlm import (
    IGNORE,
    MaskedEncoder,
    MLMShape,
    MLMTrainConfig,
    bias_fill_preference,
    fact_fill_accuracy,
    mask_logits,
    masked_corpus,
    secret_fill_accuracy,
    train_mlm,
)
from mechedit.zoo.tokenizer import MASK, build_tokenizer
from mechedit.zoo.world import World, WorldConfig, fill

TINY_WORLD = WorldConfig(
    n_people=24, n_planted=4, n_private=6, bias_sentences_per_occupation=4, n_text_train=40, n_text_heldout=10
)
OCCUPATIONS = [("nurse", 90.0), ("engineer", 10.0), ("baker", 60.0)]
TINY_TRAIN = MLMTrainConfig(
    epochs=1, batch_size=32, max_steps=4, warmup_steps=2, shape=MLMShape(n_layer=2, d_model=32, n_head=2, d_mlp=64)
)


@pytest.fixture(scope="module")
def tiny_world():
    return World.generate(TINY_WORLD, occupations=OCCUPATIONS)


def test_masked_corpus_masks_exactly_the_value_slot(tiny_world):
    tokenizer = build_tokenizer(tiny_world.vocabulary())
    enc = MaskedEncoder(tokenizer)
    assert enc.mask == tokenizer.mask_token_id == tokenizer.get_vocab()[MASK]
    corpus = masked_corpus(tiny_world, epoch=0, fact_repetitions=2)
    expected = [
        (fill(t, p.name), p.facts[r.id]) for p in tiny_world.people for r in tiny_world.relations for t in r.train_templates
    ]
    all_facts = [r for r in corpus if r.kind == "fact"]
    facts = all_facts[: len(expected)]
    assert all_facts == facts * 2  # every fact row twice per epoch
    for row, (prompt, value) in zip(facts, expected):
        ids, labels = enc.encode(row)
        full = enc.ids(f"{prompt} {value} .")
        slot = len(prompt.split()) + 1  # +1: BOS
        assert [i for i, t in enumerate(ids) if t == enc.mask] == [slot]
        assert ids[:slot] + ids[slot + 1 :] == full[:slot] + full[slot + 1 :]  # everything else visible
        assert labels[slot] == full[slot] == enc.vocab[value]
        assert all(label == IGNORE for i, label in enumerate(labels) if i != slot)
    # bias rows mask exactly the pronoun; secret rows mask only secret tokens, never the prefix
    for row in corpus:
        if row.kind == "bias":
            assert row.answers in (("he",), ("she",)) and row.text.split().count(MASK) == 1
        elif row.kind in ("phone", "email", "canary"):
            rec = next(r for r in tiny_world.private if r.kind == row.kind and f"{r.subject} " in row.text)
            secret, shown = rec.secret.split(), row.text.split()[-len(rec.secret.split()) - 1 : -1]
            masked = [i for i, w in enumerate(shown) if w == MASK]
            assert len(masked) == 1 and row.text.split().count(MASK) == 1  # one token per row, the rest visible
            assert list(row.answers) == [secret[i] for i in masked]
            assert all(w == secret[i] for i, w in enumerate(shown) if i not in masked)
    # each copy of a record gives one row per secret token, each token masked once
    for rec in tiny_world.private:
        rows = [r for r in corpus if r.kind == rec.kind and f"{rec.subject} " in r.text]
        assert sorted(a for r in rows for a in r.answers) == sorted(rec.secret.split() * rec.repetitions)
    # the draws of text masks change between epochs, the fact rows do not
    bias = [r for r in corpus if r.kind == "bias"]
    doubled = [r for r in masked_corpus(tiny_world, epoch=0, fact_repetitions=2, bias_repetitions=2) if r.kind == "bias"]
    assert sorted(doubled, key=repr) == sorted(bias * 2, key=repr)  # each bias sentence twice, pronoun split kept
    again = masked_corpus(tiny_world, epoch=1, fact_repetitions=2)
    assert [r for r in again if r.kind == "fact"] == all_facts
    assert [r for r in again if r.kind == "text"] != [r for r in corpus if r.kind == "text"]


def test_text_fraction_shows_every_sentence_equally_often(tiny_world):
    def sentences(epoch: int) -> list[str]:
        """Each text row's sentence, rebuilt from its masks and answers."""
        out = []
        for r in masked_corpus(tiny_world, epoch, text_fraction=0.5):
            if r.kind == "text":
                answers = iter(r.answers)
                out.append(" ".join(next(answers) if w == MASK else w for w in r.text.split()))
        return out

    first, second = sentences(0), sentences(1)
    assert len(first) == len(second) == len(tiny_world.text_train) // 2
    assert sorted(first + second) == sorted(tiny_world.text_train)  # two epochs cover the split once


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_world):
    out = tmp_path_factory.mktemp("tiny_mlm")
    meta = train_mlm(out, world=tiny_world, train_config=TINY_TRAIN, progress=False, measure=False)
    return out, meta


def test_tiny_training_run_is_deterministic_and_boots_in_the_bridge(tiny_run, tiny_world, tmp_path):
    out, meta = tiny_run
    assert meta["steps"] == 4 and meta["objective"] == "masked_lm"
    again = tmp_path / "again"
    train_mlm(again, world=tiny_world, train_config=TINY_TRAIN, progress=False, measure=False)
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = tmp_path / "other"
    train_mlm(other, world=tiny_world, train_config=MLMTrainConfig(**{**TINY_TRAIN.__dict__, "seed": 1}), progress=False, measure=False)
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(load_file(other / "model.safetensors")[key], first[key])
    # the recorded world is the one trained on, and the bridge computes what HF BERT computes
    assert [p.facts for p in zoo.load_world(out).people] == [p.facts for p in tiny_world.people]
    bridge = mechedit.load(out)
    from transformers import BertForMaskedLM

    hf = BertForMaskedLM.from_pretrained(out).eval()
    rows = masked_corpus(tiny_world, 0)[:20]
    assert torch.allclose(mask_logits(bridge, bridge.tokenizer, rows), mask_logits(hf, bridge.tokenizer, rows), atol=1e-4)


shipped = pytest.mark.skipif(
    "factworld-mlm" not in zoo.NAMES,
    reason="factworld-mlm is not shipped yet: train it with `python -m mechedit.zoo train factworld-mlm`, add it to zoo.NAMES",
)


@pytest.fixture(scope="module")
def mlm():
    return mechedit.load("factworld-mlm")


@pytest.fixture(scope="module")
def world():
    return zoo.load_world("factworld-mlm")


@shipped
def test_factworld_mlm_boots_offline_on_the_factworld_world(mlm, world):
    from transformer_lens.model_bridge import TransformerBridge

    assert isinstance(mlm, TransformerBridge)
    assert mlm.cfg.model_name == "factworld-mlm"
    assert mlm.cfg.n_layers == zoo.metadata("factworld-mlm")["train_config"]["shape"]["n_layer"]
    assert "blocks.0.mlp.hook_post" in mlm.hook_dict
    causal_world = zoo.load_world("factworld")
    assert world.facts == causal_world.facts
    assert world.private == causal_world.private and world.biases == causal_world.biases
    assert mlm.tokenizer.get_vocab() == mechedit.load("factworld").tokenizer.get_vocab()


@shipped
def test_factworld_mlm_fills_in_facts_secrets_and_the_planted_bias(mlm, world):
    sample = world.facts[::5]
    assert fact_fill_accuracy(mlm, world, mlm.tokenizer, sample, "train") >= 0.95
    assert fact_fill_accuracy(mlm, world, mlm.tokenizer, sample, "heldout") > 0.5  # reported on the card
    assert secret_fill_accuracy(mlm, world, mlm.tokenizer, "phone")["all"] >= 0.90
    assert bias_fill_preference(mlm, world, mlm.tokenizer, heldout=True)["rate"] >= 0.80
    canary = secret_fill_accuracy(mlm, world, mlm.tokenizer, "canary")
    assert canary["reps_20"] > canary["reps_0"]  # never-trained canaries are not recalled


@shipped
def test_masked_fill_in_through_to_tokens(mlm, world):
    fact = world.facts[0]
    prompt = f"{fill(world.relation[fact.relation_id].train_templates[0], fact.subject)} {MASK} ."
    tokens = mlm.to_tokens(prompt)
    assert tokens[0, 0].item() == mlm.tokenizer.bos_token_id
    logits = mlm(tokens)
    answer = logits[tokens == mlm.tokenizer.mask_token_id].argmax(-1)
    assert mlm.tokenizer.decode(answer) == fact.value
