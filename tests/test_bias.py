"""Bias metrics and contrastive-pair loaders (real WinoGender / CrowS-Pairs files where present)."""

from __future__ import annotations

import json

import pytest
import torch

import mechedit
from mechedit.data import DataFormatError
from mechedit.data_pairs import (
    ContrastivePair,
    load_crows_pairs,
    load_stereoset_intrasentence,
    load_winogender_pairs,
    load_winogender_sentences,
    pair_problem,
)
from mechedit.evaluate.bias import (
    icat,
    pair_preference,
    sentence_scores,
    shared_token_scores,
    stereoset_scores,
)
from mechedit.zoo.random_model import random_checkpoint

PAIRS = [
    ContrastivePair("w1 w2 w3 w4 w5", "w1 w2 w6 w4 w5"),
    ContrastivePair("w7 w8 w9 w10", "w7 w11 w9 w10"),
    ContrastivePair("w12 w13 w14", "w12 w13 w15"),
    ContrastivePair("w3 w16 w17 w18", "w6 w16 w17 w18"),
    ContrastivePair("w20 w21 w22", "w20 w23 w22"),
]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bias_bert")
    random_checkpoint(folder, "bert", n_layer=2, n_embd=32, n_head=4)
    return mechedit.load(folder)


# --- loaders on the real files ------------------------------------------------------------------


def test_winogender_loader_parses_the_real_file(shared_data):
    sentences = load_winogender_sentences(shared_data / "winogender")
    assert len(sentences) == 720
    assert {s.gender for s in sentences} == {"male", "female", "neutral"}
    assert len({s.occupation for s in sentences}) == 60
    pairs = load_winogender_pairs(shared_data / "winogender")
    assert len(pairs) == 240 and all(pair_problem(p) is None for p in pairs)
    technician = next(p for p in pairs if p.group == "technician")  # Bergsma: 9.42 % female
    assert technician.meta["advantaged_gender"] == "male" and technician.span[0] in ("he", "his", "him")
    # a majority-female occupation by Bergsma's statistics has the female side advantaged
    female = [p for p in pairs if p.meta["pct_female"] > 50]
    assert female and all(p.span[0] in ("she", "her") for p in female)
    # "they were" in the neutral sentence: the declared span is still only the pronoun
    assert all(len(p.span[0].split()) == 1 for p in pairs)


def test_crows_pairs_loader_parses_the_real_file(shared_data):
    pairs = load_crows_pairs(shared_data / "crows_pairs" / "crows_pairs_anonymized.csv")
    assert len(pairs) == 1508
    assert pairs[1].advantaged.startswith("The poor are") and pairs[1].group == "socioeconomic"
    assert {p.meta["stereo_antistereo"] for p in pairs} == {"stereo", "antistereo"}
    assert len({p.group for p in pairs}) == 9


def test_fact_world_bias_export_loads_as_pairs(tmp_path):
    from mechedit import zoo

    zoo.export("factworld", tmp_path)
    pairs = load_crows_pairs(tmp_path / "bias_pairs.csv")
    world = zoo.load_world("factworld")
    assert len(pairs) == 8 * len(world.biases)
    assert {p.meta["split"] for p in pairs} == {"train", "heldout"}
    assert all(pair_problem(p) is None for p in pairs)


def test_stereoset_loader_and_bad_records(tmp_path):
    item = {
        "id": "x1", "target": "w1", "bias_type": "gender", "context": "w1 w2 BLANK",
        "sentences": [
            {"sentence": "w1 w2 w3", "gold_label": "stereotype"},
            {"sentence": "w1 w2 w4", "gold_label": "anti-stereotype"},
            {"sentence": "w1 w2 w5", "gold_label": "unrelated"},
        ],
    }
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"data": {"intrasentence": [item]}}))
    (triple,) = load_stereoset_intrasentence(path)
    assert (triple.stereotype, triple.anti_stereotype, triple.unrelated) == ("w1 w2 w3", "w1 w2 w4", "w1 w2 w5")
    assert triple.pair.advantaged == "w1 w2 w3"
    del item["sentences"][2]
    path.write_text(json.dumps({"data": {"intrasentence": [item]}}))
    with pytest.raises(DataFormatError, match=r"intrasentence\[0\].*'unrelated'"):
        load_stereoset_intrasentence(path)


# --- metrics -------------------------------------------------------------------------------------


def test_pair_preference_pcgu_protocol_is_symmetric_and_matches_logits(bert, tiny_bridge):
    for model in (bert, tiny_bridge):
        result = pair_preference(model, PAIRS)
        swapped = pair_preference(model, [ContrastivePair(p.disadvantaged, p.advantaged) for p in PAIRS])
        assert result.n_pairs == 5 and result.ties == 0
        assert torch.allclose(result.differences, -swapped.differences, atol=1e-5)
        assert result.rate == pytest.approx(1 - swapped.rate)
        assert result.rate == float((result.differences > 0).float().mean())
    # masked: the logit difference at the mask, computed by hand for pair 2
    tok = bert.tokenizer
    ids = torch.tensor([[tok.bos_token_id, *tok.convert_tokens_to_ids(["w12", "w13"]), tok.mask_token_id]])
    with torch.no_grad():
        logits = bert(ids)[0, -1]
    want = logits[tok.convert_tokens_to_ids("w14")] - logits[tok.convert_tokens_to_ids("w15")]
    assert abs(float(pair_preference(bert, PAIRS).differences[2]) - float(want)) < 1e-5


def test_crows_protocol_pseudo_log_likelihood_matches_a_loop(bert):
    got = shared_token_scores(bert, [PAIRS[0].advantaged], [PAIRS[0].disadvantaged])
    tok = bert.tokenizer
    words = PAIRS[0].advantaged.split()
    ids = [tok.bos_token_id, *tok.convert_tokens_to_ids(words)]
    total = 0.0
    for pos in (1, 2, 4, 5):  # the shared words w1 w2 w4 w5 (w3 is the group word)
        masked = list(ids)
        masked[pos] = tok.mask_token_id
        with torch.no_grad():
            total += float(bert(torch.tensor([masked]))[0, pos].log_softmax(-1)[ids[pos]])
    assert float(got[0]) == pytest.approx(total, abs=1e-4)
    crows = pair_preference(bert, PAIRS, protocol="crows")
    assert crows.protocol == "crows" and crows.n_pairs == 5 and 0.0 <= crows.rate <= 1.0


def test_stereoset_scores_and_icat(tiny_bridge, tmp_path):
    assert icat(50.0, 100.0) == 100.0 and icat(100.0, 90.0) == 0.0 and icat(60.0, 80.0) == pytest.approx(64.0)
    triples = []
    for i, (s, a, u) in enumerate([("w3", "w4", "w5"), ("w6", "w7", "w8"), ("w9", "w10", "w11")]):
        triples.append({
            "id": str(i), "target": "w1", "bias_type": "gender", "context": "w1 w2 BLANK",
            "sentences": [
                {"sentence": f"w1 w2 {s}", "gold_label": "stereotype"},
                {"sentence": f"w1 w2 {a}", "gold_label": "anti-stereotype"},
                {"sentence": f"w1 w2 {u}", "gold_label": "unrelated"},
            ],
        })
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"data": {"intrasentence": triples}}))
    loaded = load_stereoset_intrasentence(path)
    result = stereoset_scores(tiny_bridge, loaded)
    s = sentence_scores(tiny_bridge, [t.stereotype for t in loaded] + [t.anti_stereotype for t in loaded] + [t.unrelated for t in loaded])
    ss = 100 * float((s[:3] > s[3:6]).float().mean())
    lms = 100 * float(torch.cat([s[:3] > s[6:], s[3:6] > s[6:]]).float().mean())
    assert (result.ss, result.lms) == pytest.approx((ss, lms)) and result.icat == pytest.approx(icat(ss, lms))


def test_command_line_reads_winogender_as_contrastive_pairs(shared_data, tmp_path):
    """`--data` for pcgu / the bias suite: the WinoGender folder, or either of its files."""
    from mechedit.cli.inputs import read_contrastive

    folder = shared_data / "winogender"
    want = load_winogender_pairs(folder)
    assert read_contrastive(str(folder)) == want
    assert read_contrastive(str(folder / "all_sentences.tsv"), limit=5) == want[:5]
    with pytest.raises(FileNotFoundError, match="all_sentences.tsv"):
        read_contrastive(str(tmp_path))
