"""zoo.prompts: the fact world's facts as FactPrompts and clean/corrupt pairs."""

from __future__ import annotations

import random

import pytest

from mechedit import zoo
from mechedit.zoo.prompts import fact_pairs, fact_prompts


@pytest.fixture(scope="module")
def world():
    return zoo.load_world("factworld-planted")


def test_fact_pairs_swap_only_the_subject_for_a_partner_with_another_value(world):
    facts = world.planted_facts
    pairs = fact_pairs(world, facts, pool=facts, rng=random.Random(0))
    by_subject = {(f.subject, f.relation_id): f.value for f in facts}
    for fact, pair in zip(facts, pairs, strict=True):
        assert pair.answer == fact.value and pair.wrong_answer != fact.value
        assert pair.clean.replace(fact.subject, "X") != pair.clean and fact.subject in pair.clean
        partner = pair.corrupt.split(" of ")[1].removesuffix(" is")
        assert by_subject[(partner, fact.relation_id)] == pair.wrong_answer  # the partner's own value
        assert pair.corrupt.replace(partner, fact.subject) == pair.clean
    assert fact_pairs(world, facts, pool=facts, rng=0) == pairs  # a seed is the same as a fresh Random(seed)


def test_fact_pairs_and_prompts_refuse_what_they_cannot_build(world):
    fact = world.planted_facts[0]
    with pytest.raises(ValueError, match="no partner"):
        fact_pairs(world, [fact], pool=[fact])
    with pytest.raises(ValueError, match="template must be in"):
        fact_pairs(world, [fact], template=99)
    prompts = fact_prompts(world, fact, heldout=True)
    assert len(prompts) == len(world.relation[fact.relation_id].heldout_templates)
    assert all(p.target == fact.value and fact.subject in p.prompt for p in prompts)


def test_control_facts_match_relations_and_avoid_the_subjects(world):
    from collections import Counter

    from mechedit.zoo.prompts import control_facts

    planted = world.planted_facts
    control = control_facts(world, planted)
    assert Counter(f.relation_id for f in control) == Counter(f.relation_id for f in planted)
    assert not {f.subject for f in control} & {f.subject for f in planted}
    assert all(f in world.facts for f in control)
    with pytest.raises(ValueError, match="still need"):
        control_facts(world, [world.facts[0]] * (len(world.people) + 1))
