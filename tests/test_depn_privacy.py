"""DEPN end to end on the fact world: detect, aggregate, zero, and measure privacy and utility.

The target (issue 10): DEPN's neurons for the phone numbers, zeroed, lower the secrets' mean
exposure by >= 40 % while held-out perplexity rises <= 5 % and non-private fact accuracy falls
<= 2 points, and DEPN beats the same number of random neurons.

Settings: 12 phone numbers (every 5th of the 60: 2, 4 and 8 training copies mixed), IG with 6
steps (DEPN's grid), ``threshold=0.1`` (DEPN), ``top_z=40``; exposure ``"lexicographic"``
(DEPN's per-digit rank: exact, one forward pass per secret; ``"logprob"`` enumerates candidates
and its cost grows with the rank, which an edit is meant to raise, so it can give up with NaN);
perplexity on 100 held-out texts; accuracy on all 1,440 trained facts (train template 0).
(``top_z=40`` since the model was retrained in issue 7; see the end of this note.)

Measured (all attempts; exposure in bits, mean of the secrets; reduction = 1 - after/before):

- all 60 phones, 20 steps, t=0.1: z=10 12.8 %, z=20 39.0 %, z=25 48.0 %, z=30 55.7 %, z=40
  62.8 %, z=50 66.8 %, z=100 83.6 %, z=200 88.0 %; fact accuracy (200 facts) falls 0, 1.5, 2.0,
  2.0, 4.0, 5.5, 24, 58.5 points; perplexity within +0.3 %. t=0.2 the same within 1-3 points.
- the 20 phones with 8 copies (20 steps): z=20 34.2 %, z=25 41.1 %, z=30 49.4 %.
- 8 phones with 8 copies, 6 steps: z=20 16.2 %, z=25 27.4 %, z=30 40.5 % (-1.3 points),
  z=40 48.2 % (-2.4 points: fails the utility bound).
- 12 mixed phones, 6 steps (this test): z=15 39.0 %, z=20 43.7 % (-0.28 points), z=25 50.9 %
  (26.44 -> 12.97 bits; -0.56 points, perplexity -0.1 %), z=30 60.6 % (-1.0), z=40 75.2 % (-2.7).
- random neurons (same sizes): 0.0 % to -0.2 % everywhere, fact accuracy unchanged.

All chosen neurons sit in layer 0 (the fact world's first MLP holds the digits).

The figures above are the factworld trained before issue 7. **On the retrained factworld** (issue
7's MC recipe; 12 mixed phones, 26.85 bits before, perplexity 5.604, fact accuracy 1.000) the
exposure cut is reached but not at the fact-accuracy bound, in every attempt (exposure after,
perplexity, fact accuracy):

- 6 steps, t=0.1: z=25 18.86 (-29.8 %), 5.676, 0.900; z=30 18.14, 5.709, 0.901; z=40 13.37
  (-50.2 %), 5.805, 0.898; z=50 12.14 (-54.8 %), 5.694, 0.897; z=100 5.20, 7.61, 0.807; z=200
  3.52, 22.75, 0.671. t=0.2: z=25 17.91, 0.899; z=30 14.74, 0.899; z=40 12.18, 0.893. t=0.3:
  z=25 20.21, 0.895; z=30 18.42, 0.890; z=40 12.94, 0.914.
- 20 steps: t=0.1 z=25 16.80, 0.919; z=30 13.96, 0.887; z=40 14.64, 0.877; t=0.2 z=25 20.58,
  z=30 15.53, z=40 13.63 (0.892); t=0.3 z=25 19.21, z=30 15.17, z=40 13.17 (0.916).
- the top 40 without their layer-0 neurons (4 or 6 left): exposure unchanged (26.85), facts 1.000.
- random neurons: exposure unchanged, facts >= 0.9986.

The privacy neurons are still layer-0 neurons, but in the retrained model MLP 0 is also the
measured fact-lookup MLP (``locate.fact_lookup``: its subject-token output carries the whole
gap of a birth-city fact), so the neurons that hold a person's digits hold part of every
person's identity: zeroing them costs ~10 points of fact accuracy at any size that cuts
exposure; and moving the same 40 neurons by a random vector of the zeroing's norm cuts exposure
as much as zeroing them (14.2 vs 13.5 bits; 4.2 vs 13.5 on the earlier model). The tests run
z = 40 and assert the exposure cut, perplexity and the random-neuron control; the fact-accuracy
bound and the random-direction control are strict xfails with these figures.
"""

from __future__ import annotations

import contextlib

import pytest

import mechedit
from mechedit import zoo
from mechedit.edit import ablate
from mechedit.evaluate import depn_controls
from mechedit.evaluate.facts import fact_scores
from mechedit.evaluate.privacy import as_secrets, exposure
from mechedit.locate import depn, depn_select, knowledge_neurons, random_neurons
from mechedit.metrics import perplexity
from mechedit.prompts import FactPrompt

pytestmark = pytest.mark.slow
TOP_Z = 40


@pytest.fixture(scope="module")
def setting():
    model, world = mechedit.load("factworld"), zoo.load_world("factworld")
    phones = [r for r in world.private if r.kind == "phone"][::5]
    facts = [
        FactPrompt(prompt=zoo.world.fill(world.relation[f.relation_id].train_templates[0], f.subject), target=f.value)
        for f in world.facts
    ]
    circuit = depn(model, phones, steps=6, threshold=0.1, top_z=TOP_Z, hook_check=False, progress=False)
    return model, world, phones, facts, circuit


def _measure(model, secrets, texts, facts, edit=None):
    with edit.applied(model) if edit is not None else contextlib.nullcontext():
        return (
            exposure(model, secrets, method="lexicographic").mean(),
            perplexity(model, texts),
            fact_scores(model, facts)["accuracy"],
        )


def test_depn_neurons_cut_phone_exposure_by_40_percent_at_little_perplexity_cost(setting):
    model, world, phones, facts, circuit = setting
    secrets, texts = as_secrets(phones), list(world.text_heldout[:100])
    assert {r.repetitions for r in phones} == {2, 4, 8} and len(phones) == 12 and len(circuit) == TOP_Z
    exp0, ppl0, _ = _measure(model, secrets, texts, facts[:1])
    exp1, ppl1, _ = _measure(model, secrets, texts, facts[:1], ablate(model, circuit, mode="zero"))
    assert exp1 <= 0.6 * exp0  # measured 26.85 -> 13.37 bits (-50.2 %)
    assert ppl1 <= 1.05 * ppl0  # measured +3.6 %
    random_exp = [_measure(model, secrets, texts, facts[:1], ablate(model, random_neurons(model, circuit, seed=s), mode="zero"))[0] for s in range(2)]
    assert max(exp0 - e for e in random_exp) < 0.25 * (exp0 - exp1)  # measured 0.0 bits
    assert _measure(model, secrets, texts[:1], facts[:1])[0] == exp0  # the edits are gone


@pytest.mark.xfail(strict=True, reason=(
    "issue 10's bound (fact accuracy falls <= 2 points) is not met on the factworld retrained in issue 7: "
    "its privacy neurons are layer-0 neurons of the fact-lookup MLP, and every size that cuts exposure by "
    ">= 40 % costs ~10 points (z = 40: 1.000 -> 0.898; every attempt in the module docstring)"))
def test_depn_neurons_keep_fact_accuracy_within_2_points(setting):
    model, _, phones, facts, circuit = setting
    acc0 = fact_scores(model, facts)["accuracy"]
    with ablate(model, circuit, mode="zero").applied(model):
        acc1 = fact_scores(model, facts)["accuracy"]
    assert acc1 >= acc0 - 0.02


@pytest.fixture(scope="module")
def controls(setting):
    model, world, phones, facts, circuit = setting
    scores = knowledge_neurons(model, phones, steps=6, per_prompt=True, hook_check=False, progress=False)
    assert set(depn_select(scores, threshold=0.1, top_z=TOP_Z)) == set(circuit)  # the table's DEPN row edits these
    table = depn_controls(
        model, phones, scores=scores, top_z=TOP_Z, heldout_texts=list(world.text_heldout[:10]), facts=facts[:60], el=False
    )
    return table.set_index("method")


def test_depn_controls_table_separates_depn_from_random_neurons(setting, controls):
    """The controls in one call: DEPN's row is the circuit ``depn`` chose and cuts exposure like
    the test above; random neurons leave exposure and every greedy answer alone."""
    model, world, phones, facts, _ = setting
    rows = controls
    assert "el_3_before" not in rows and {"ma_after", "perplexity_after", "fact_accuracy_after"} <= set(rows)
    assert list(rows.index) == ["depn", "random", "random_direction", "act_x_grad", "ig_no_vote"]
    assert (rows["neurons"] == TOP_Z).all() and (rows["exposure_before"] == rows.loc["depn", "exposure_before"]).all()
    depn_row, random_row = rows.loc["depn"], rows.loc["random"]
    assert depn_row["exposure_after"] <= 0.6 * depn_row["exposure_before"]  # measured 26.85 -> 13.37
    assert abs(random_row["exposure_after"] - random_row["exposure_before"]) < 0.5 and random_row["flips"] == 0
    assert depn_row["flips"] >= len(phones) // 2  # measured 9 of 12 (12 of 12 before issue 7): answers change
    assert _measure(model, as_secrets(phones), [world.text_heldout[0]], facts[:1])[0] == depn_row["exposure_before"]


@pytest.mark.xfail(strict=True, reason=(
    "on the factworld retrained in issue 7 moving DEPN's 40 layer-0 neurons by a random vector of the "
    "zeroing's norm cuts exposure as much as zeroing them (measured 14.2 vs 13.5 bits; 4.2 vs 13.5 on the "
    "earlier model): the cut comes from disturbing the subject's identity in the fact-lookup MLP, not "
    "from removing the digits"))
def test_zeroing_does_far_more_than_a_random_direction_of_the_same_neurons(controls):
    depn_row, direction_row = controls.loc["depn"], controls.loc["random_direction"]
    depn_drop = depn_row["exposure_before"] - depn_row["exposure_after"]
    direction_drop = direction_row["exposure_before"] - direction_row["exposure_after"]
    assert direction_drop < 0.6 * depn_drop
