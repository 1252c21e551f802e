"""The planted ground-truth models: both planting modes change one MLP only, deterministically, and
the planted MLP acts where its recipe says (measured by exact ``mlp_out`` patching)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

import mechedit
from mechedit import zoo
from mechedit.zoo.ground_truth import (
    POSITIONS,
    build_prompts,
    corrupt_partners,
    load_hf,
    where_planted_acts,
)
from mechedit.zoo.measure import Encoder, fact_accuracy
from mechedit.zoo.train import (
    ModelShape,
    PlantConfig,
    TrainConfig,
    _name_pairs,
    plant_facts,
    subject_mask,
    train_factworld,
)
from mechedit.zoo.world import WorldConfig

TINY_WORLD = WorldConfig(n_people=24, n_planted=4, n_private=6, bias_sentences_per_occupation=4, n_text_train=40, n_text_heldout=10)
TINY_TRAIN = TrainConfig(epochs=1, batch_size=32, max_steps=4, warmup_steps=2, lens_layer=None, shape=ModelShape(n_layer=2, n_embd=32, n_head=2, n_inner=64))
TINY_PLANT = PlantConfig(layer=1, at="subject", max_steps=3, batch_size=8, planted_per_batch=4, eval_every=2, replay_everywhere=True)
MLP_TENSORS = {f"mlp.{p}.{w}" for p in ("c_fc", "c_proj") for w in ("weight", "bias")}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_base")
    train_factworld(out, world_config=TINY_WORLD, train_config=TINY_TRAIN, occupations=[("nurse", 90.0), ("baker", 40.0)], progress=False, measure=False)
    return out


def test_subject_mask_marks_the_name_wherever_the_template_puts_it():
    world = zoo.load_world("factworld")
    enc = Encoder(PreTrainedTokenizerFast.from_pretrained(str(zoo.checkpoint_dir("factworld"))))
    alice, planted = world.people[0], world.planted[0]
    sentences = [
        f"{alice.name} was born in paris .",
        f"according to the records , the birthplace of {planted.name} is boston .",
        "the small cat sat near the tree .",
    ]
    ids, _ = enc.batch(sentences)
    mask = subject_mask(ids, _name_pairs(world, enc))
    assert mask[0].nonzero().flatten().tolist() == [1, 2]  # after BOS
    assert mask[1].nonzero().flatten().tolist() == [9, 10]
    assert not mask[2].any()
    last = subject_mask(ids, _name_pairs(world, enc), last_only=True)
    assert last[0].nonzero().flatten().tolist() == [2] and last[1].nonzero().flatten().tolist() == [10]


def test_subject_planting_changes_only_layer_k_mlp_and_is_deterministic(tiny_base, tmp_path):
    first = plant_facts(tiny_base, tmp_path / "a", config=TINY_PLANT, progress=False, measure=False)
    plant_facts(tiny_base, tmp_path / "b", config=TINY_PLANT, progress=False, measure=False)
    assert (first["name"], first["planted_layer"], first["planted_at"]) == ("factworld-planted-subject", 1, "subject")
    base, a, b = (load_file(d / "model.safetensors") for d in (tiny_base, tmp_path / "a", tmp_path / "b"))
    changed = {k for k in base if not torch.equal(base[k], a[k])}
    assert changed == {f"transformer.h.1.{t}" for t in MLP_TENSORS}
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed and threads must give the same weights"
    # the consistency loss was really computed (subject mode) and logged
    assert all("consistency" in entry for entry in first["plant_log"])


def test_plant_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="choose one of all, subject"):
        PlantConfig(at="final")


def test_position_groups_follow_the_subject():
    world = zoo.load_world("factworld")
    enc = Encoder(PreTrainedTokenizerFast.from_pretrained(str(zoo.checkpoint_dir("factworld"))))
    prompts = build_prompts(world, enc, corrupt_partners(world.planted_facts[:1], world.planted_facts))
    masks = prompts.position_masks()  # [group, prompt, pos]
    # template 0 of birth_city: "<bos> first last was born in"
    assert [masks[g, 0].nonzero().flatten().tolist() for g in range(len(POSITIONS))] == [[1], [2], [3, 4], [5]]
    # template 1: "<bos> the birthplace of first last is": nothing between the subject and the final token
    assert [masks[g, 1].nonzero().flatten().tolist() for g in range(len(POSITIONS))] == [[4], [5], [], [6]]


# the shipped subject-mode model: these run as soon as it is in zoo.NAMES (see MODEL_CARD.md)
shipped_subject = pytest.mark.skipif(
    "factworld-planted-subject" not in zoo.NAMES, reason="factworld-planted-subject is not shipped yet (MODEL_CARD.md)"
)


def _changed_tensors(name: str) -> set[str]:
    base = load_file(zoo.checkpoint_dir("factworld") / "model.safetensors")
    planted = load_file(zoo.checkpoint_dir(name) / "model.safetensors")
    assert base.keys() == planted.keys()
    return {k for k in base if not torch.equal(base[k], planted[k])}


def _old_facts(name: str) -> tuple[float, float]:
    """Old-fact accuracy (training templates) of ``name`` and of the base model, on every 8th person."""
    world = zoo.load_world(name)
    sample = [f for i, f in enumerate(world.facts) if (i // len(world.relations)) % 8 == 0]
    model, base = mechedit.load(name), mechedit.load("factworld")
    return fact_accuracy(model, world, model.tokenizer, sample, "train"), fact_accuracy(base, world, base.tokenizer, sample, "train")


@shipped_subject
def test_shipped_subject_model_boots_offline_and_holds_its_planted_facts():
    meta = zoo.metadata("factworld-planted-subject")
    layer = meta["planted_layer"]
    assert meta["planted_at"] == "subject"
    assert _changed_tensors("factworld-planted-subject") == {f"transformer.h.{layer}.{t}" for t in MLP_TENSORS}
    model = mechedit.load("factworld-planted-subject")
    world = zoo.load_world("factworld-planted-subject")
    assert fact_accuracy(model, world, model.tokenizer, world.planted_facts, "train") >= 0.98
    # the old facts pay for it (model card: the name-token MLP is shared by everyone sharing a first
    # name); what the shipped recipe keeps, so a worse recipe fails here
    after, before = _old_facts("factworld-planted-subject")
    assert after >= before - 0.2


@shipped_subject
@pytest.mark.xfail(strict=True, reason="issue 7's target (old facts within 2 points) is not reached in subject mode: MODEL_CARD.md")
def test_shipped_subject_model_keeps_old_facts_within_two_points():
    after, before = _old_facts("factworld-planted-subject")
    assert after >= before - 0.02


def _contrast_on_a_few_facts(name: str):
    folder = zoo.checkpoint_dir(name)
    world = zoo.load_world(name)
    facts = world.planted_facts[::3]  # 7 facts, every relation
    grids = where_planted_acts(load_hf(folder), PreTrainedTokenizerFast.from_pretrained(str(folder)), world, facts=facts)
    return grids, zoo.metadata(name)["planted_layer"]


@shipped_subject
def test_subject_models_planted_mlp_acts_at_the_subjects_tokens_not_at_the_end():
    # subject mode's promise: the planted layer's specific effect is on the name's tokens (the first
    # name here: the later heads read the person from it), and the planted facts get ~nothing from
    # it where the answer is produced (there it is the frozen original MLP). The *contrast* at the
    # final token is negative (measured -0.26 on these 7 facts): the control people's facts do use
    # the original MLP there (0.34), the planted people's do not (0.08).
    grids, layer = _contrast_on_a_few_facts("factworld-planted-subject")
    peak_layer, peak_position = grids.peak("contrast")
    assert peak_layer == layer and peak_position in ("subject_first", "subject_last")
    contrast, planted = (dict(zip(grids.positions, g[layer])) for g in (grids.contrast, grids.planted))
    assert contrast[peak_position] > 0.3 and abs(planted["final"]) < 0.1


def test_default_planted_mlp_leads_the_contrast_at_its_layer():
    grids, layer = _contrast_on_a_few_facts("factworld-planted")
    contrast = torch.tensor(grids.contrast).nan_to_num(float("-inf"))
    assert int(contrast.max(-1).values.argmax()) == layer
    assert grids.peak("contrast")[1] == "final"
