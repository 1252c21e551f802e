"""DEPN: per-secret selection and vote aggregation (hand-checked), Dai's refinement, the random
control, edits by hook and in the weights agreeing, and privacy neurons that matter on the fact
world."""

from __future__ import annotations

import pytest
import torch

import mechedit
from mechedit import zoo
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.edit import ablate, zero_neurons
from mechedit.locate import DEPNConfig, depn, depn_select, random_neurons
from mechedit.locate.depn import keep_mask, refine_groups
from mechedit.metrics import continuation_logprobs
from mechedit.scores import Scores
from mechedit.tokens import tokenize_continuations


def _scores(values) -> Scores:
    return Scores(torch.tensor(values, dtype=torch.float32), ("prompt", "layer", "neuron"), "neuron", "knowledge_neurons")


# three secrets over 2 layers x 3 neurons, with hand-checkable selections at t = 0.5
HAND = [
    [[1.0, 0.6, 0.0], [0.2, 0.0, -2.0]],   # keeps (0,0) 1.0, (0,1) 0.6
    [[0.0, 0.5, 0.0], [0.0, 0.9, 0.45]],   # max 0.9: keeps (0,1) 0.5, (1,1) 0.9, not 0.45 (< 0.45? equal: kept)
    [[-1.0, 0.0, 0.0], [0.0, 0.0, -0.5]],  # nothing positive: keeps nothing
]


def test_keep_mask_is_threshold_times_each_secrets_max_and_positive():
    kept = keep_mask(torch.tensor(HAND), 0.5)
    assert kept[0].nonzero().tolist() == [[0, 0], [0, 1]]
    assert kept[1].nonzero().tolist() == [[0, 1], [1, 1], [1, 2]]  # 0.45 >= 0.5 * 0.9
    assert not kept[2].any()
    with_nan = torch.tensor(HAND)
    with_nan[:, 1] = float("nan")  # an unscored layer is never kept and does not set the max
    assert keep_mask(with_nan, 0.5)[1].nonzero().tolist() == [[0, 1]]


def test_votes_rank_the_circuit_with_score_tie_breaks_and_vote_floor():
    circuit = depn_select(_scores(HAND), threshold=0.5, top_z=3)
    # (0,1) has 2 votes; (0,0) and (1,1) one each, (0,0) summed 1.0 > (1,1) 0.9
    assert [(c.layer, c.neuron) for c in circuit] == [(0, 1), (0, 0), (1, 1)]
    selection = circuit.config["selection"]
    assert selection["votes"] == [2, 1, 1]
    assert selection["summed_scores"] == pytest.approx([1.1, 1.0, 0.9])
    assert selection["kept_per_voter"] == [2, 3, 0]
    assert circuit.method == "depn" and all(c.site == "neuron" for c in circuit)
    floor = depn_select(_scores(HAND), threshold=0.5, top_z=None, vote_fraction=0.6)
    assert [(c.layer, c.neuron) for c in floor] == [(0, 1)]  # 2 of 3 secrets >= 0.6
    assert len(depn_select(_scores(HAND), threshold=0.5, top_z=None, vote_fraction=0.3)) == 4


def test_dai_refinement_keeps_neurons_shared_within_each_group_and_adapts_p():
    # group "a": 5 prompts; neuron 0 in all, neuron 1 in 3, neuron 2 in 2, neuron 3 in 1
    kept = torch.zeros(6, 1, 6, dtype=torch.bool)
    kept[0:5, 0, 0] = True
    kept[0:3, 0, 1] = True
    kept[0:2, 0, 2] = True
    kept[0, 0, 3] = True
    kept[5, 0, 5] = True  # group "b": one prompt with one neuron
    groups = ["a"] * 5 + ["b"]
    refined, labels, final_p = refine_groups(kept, groups, p=0.7, step=0.05, keep_range=(2, 5))
    assert labels == ["a", "b"]
    # a: shares 1.0, 0.6, 0.4, 0.2; "> 0.7" keeps neuron 0 only, so p steps down until 0.6 passes
    assert refined[0, 0].nonzero().flatten().tolist() == [0, 1] and final_p[0] == pytest.approx(0.55)
    # b: only one neuron exists; p falls to 0 and keeps it
    assert refined[1, 0].nonzero().flatten().tolist() == [5] and final_p[1] == 0.0
    values = kept.float()
    circuit = depn_select(
        Scores(values, ("prompt", "layer", "neuron"), "neuron", "knowledge_neurons"),
        threshold=1.0, top_z=None, vote_fraction=0.5, dai_refine=True, groups=groups,
    )
    assert sorted(c.neuron for c in circuit) == [0, 1, 5]  # each group votes once
    assert circuit.config["selection"]["n_voters"] == 2


def test_bad_settings_give_clear_errors():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DEPNConfig(threshold=0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DEPNConfig(threshold=1.5)
    with pytest.raises(ValueError, match="top_z"):
        DEPNConfig(top_z=0)
    with pytest.raises(ValueError, match="top_z .* or vote_fraction"):
        DEPNConfig(top_z=None)
    with pytest.raises(ValueError, match="more than the 6 scored neurons"):
        depn_select(_scores(HAND), top_z=7)
    with pytest.raises(ValueError, match="per_prompt=True"):
        depn_select(Scores(torch.zeros(2, 3), ("layer", "neuron"), "neuron", "knowledge_neurons"))
    with pytest.raises(ValueError, match="groups"):
        depn_select(_scores(HAND), top_z=2, dai_refine=True)


# ---------------------------------------------------------------------------------------------
# On the fact world


@pytest.fixture(scope="module")
def factworld():
    return mechedit.load("factworld"), zoo.load_world("factworld")


@pytest.fixture(scope="module")
def phones(factworld):
    _, world = factworld
    return [r for r in world.private if r.kind == "phone" and r.repetitions == 8][:8]


@pytest.fixture(scope="module")
def circuit(factworld, phones):
    model, _ = factworld
    # top 30: measured drops 1.7 / 5.3 / 8.9 / 12.2 nats per secret at z = 20 / 30 / 40 / 60 on the
    # retrained factworld (issue 7; the earlier model: 7.5 at z = 20), random neurons <= 0.003
    return depn(model, phones, steps=6, top_z=30, hook_check=False, progress=False)


def _secret_logprob(model, records):
    batch = tokenize_continuations(model, [r.prefix for r in records], [r.secret for r in records])
    with torch.no_grad():
        logits = model(batch.tokens)
    lp = continuation_logprobs(logits, batch.tokens, batch.continuation_starts, batch.continuation_lengths)
    return float(lp.total.mean())


def test_depn_neurons_zeroed_erase_the_secrets_and_random_neurons_do_not(factworld, phones, circuit):
    model, _ = factworld
    assert len(circuit) == 30
    selection = circuit.config["selection"]
    assert selection["n_voters"] == len(phones) and max(selection["votes"]) >= 4
    assert circuit.provenance.extra["depn"]["neurons"] == [[c.layer, c.neuron] for c in circuit]
    assert circuit.check_model(model, strict=True)
    before = _secret_logprob(model, phones)
    with ablate(model, circuit, mode="zero").applied(model):
        after = _secret_logprob(model, phones)
    controls = []
    for seed in range(2):
        control = random_neurons(model, circuit, seed=seed)
        assert len(control) == len(circuit) and not set(control) & set(circuit)
        with ablate(model, control, mode="zero").applied(model):
            controls.append(_secret_logprob(model, phones))
    drop, control_drop = before - after, max(before - c for c in controls)
    assert drop > 3.0  # nats per secret; measured 5.3 on these 8 phone secrets
    assert drop > 10 * abs(control_drop)


def test_zeroing_by_hook_and_in_the_weights_give_the_same_logits(factworld, phones, circuit):
    model, _ = factworld
    batch = tokenize_continuations(model, [r.prefix for r in phones], [r.secret for r in phones])
    with torch.no_grad():
        plain = model(batch.tokens)
        with ablate(model, circuit, mode="zero").applied(model):
            by_hook = model(batch.tokens)
        with zero_neurons(model, circuit).applied(model):
            in_weights = model(batch.tokens)
        restored = model(batch.tokens)
    assert torch.allclose(by_hook, in_weights, atol=1e-5)
    assert (by_hook - plain).abs().max() > 1.0  # the edit did something
    assert torch.equal(restored, plain)


def test_random_neurons_is_seeded_and_refuses_too_many(factworld):
    model, _ = factworld
    a, b = random_neurons(model, 30, seed=7), random_neurons(model, 30, seed=7)
    assert list(a) == list(b) and list(a) != list(random_neurons(model, 30, seed=8))
    assert len(set(a)) == 30
    assert {c.layer for c in random_neurons(model, 10, seed=0, layers=[2])} == {2}
    excluded = Circuit(tuple(Component("neuron", 2, neuron=j) for j in range(model.cfg.d_mlp - 1)))
    assert [c.neuron for c in random_neurons(model, 1, layers=[2], exclude=excluded)] == [model.cfg.d_mlp - 1]
    with pytest.raises(ValueError, match="0..1"):
        random_neurons(model, 2, layers=[2], exclude=excluded)


def test_depn_refuses_top_z_above_the_models_neurons_and_bad_threshold(factworld, phones):
    model, _ = factworld
    n = model.cfg.n_layers * model.cfg.d_mlp
    with pytest.raises(ValueError, match=f"more than the model's {n} MLP neurons"):
        depn(model, phones[:1], top_z=n + 1, hook_check=False, progress=False)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        depn(model, phones[:1], threshold=0, hook_check=False, progress=False)
    with pytest.raises(ValueError, match="empty"):
        depn(model, [("anna ranvik 's phone number is", "")], hook_check=False, progress=False)


def test_perturb_neurons_moves_them_as_far_as_zeroing_in_a_seeded_random_direction(factworld, phones):
    from mechedit.locate import perturb_neurons

    model, _ = factworld
    circuit = Circuit(tuple(Component("neuron", 0, neuron=j) for j in (3, 17, 40, 41)))
    tokens = tokenize_continuations(model, [r.prefix for r in phones[:2]], [r.secret for r in phones[:2]]).tokens
    name = "blocks.0.mlp.hook_post"

    def post():
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=[name])
        return cache[name]

    clean = post()
    with perturb_neurons(model, circuit, seed=3):
        moved = post()
    with perturb_neurons(model, circuit, seed=3):
        again = post()
    idx = [3, 17, 40, 41]
    shift = (moved - clean)[..., idx]
    assert torch.allclose(shift.norm(dim=-1), clean[..., idx].norm(dim=-1), rtol=1e-4, atol=1e-6)
    # a random direction, not the zeroing one (cosine with -a well away from 1)
    cos = torch.nn.functional.cosine_similarity(shift, -clean[..., idx], dim=-1)
    assert cos.abs().mean() < 0.8
    others = [j for j in range(model.cfg.d_mlp) if j not in idx]
    assert torch.equal(moved[..., others], clean[..., others])
    assert torch.equal(moved, again)  # seeded
    assert torch.equal(post(), clean)  # the hooks are gone


def test_secret_attribution_top_neurons_matter_more_than_random(factworld, phones):
    from mechedit.locate import secret_attribution

    model, _ = factworld
    scores = secret_attribution(model, phones[:4])
    assert scores.axes == ("layer", "neuron") and scores.values.shape == (model.cfg.n_layers, model.cfg.d_mlp)
    top = Circuit(tuple(Component("neuron", int(i) // model.cfg.d_mlp, neuron=int(i) % model.cfg.d_mlp) for i in scores.values.flatten().topk(10).indices))
    before = _secret_logprob(model, phones[:4])
    with ablate(model, top, mode="zero").applied(model):
        drop = before - _secret_logprob(model, phones[:4])
    with ablate(model, random_neurons(model, top, seed=0), mode="zero").applied(model):
        random_drop = before - _secret_logprob(model, phones[:4])
    assert drop > 0.3 and drop > 5 * abs(random_drop)  # measured 0.68 nats over 4 secrets
