"""The fact world's facts as the prompt types locators and evaluations take.

``fact_prompts`` gives a fact in each template of its relation (``FactPrompt``s: prompt, answer);
``fact_pairs`` gives clean/corrupt ``PromptPair``s for patching: the fact's subject against
another person with a different value for the same relation, in the same template, so the two
prompts differ only in the subject and the answers differ.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mechedit.prompts import FactPrompt, PromptPair
from mechedit.zoo.world import Fact, World, fill

__all__ = ["fact_pairs", "fact_prompts"]


def fact_prompts(world: World, fact: Fact, *, heldout: bool = False) -> list[FactPrompt]:
    """``fact`` in each training template of its relation (or each held-out one)."""
    rel = world.relation[fact.relation_id]
    templates = rel.heldout_templates if heldout else rel.train_templates
    return [
        FactPrompt(prompt=fill(t, fact.subject), subject=fact.subject, target=fact.value, relation_id=fact.relation_id)
        for t in templates
    ]


def fact_pairs(
    world: World,
    facts: Sequence[Fact],
    *,
    pool: Sequence[Fact] | None = None,
    template: int = 1,
    rng: random.Random | int = 0,
) -> list[PromptPair]:
    """One clean/corrupt pair per fact, in training template ``template`` of its relation.

    The corrupt subject is drawn (``rng``: a seed, or a ``random.Random`` to continue a sequence)
    from the facts of ``pool`` (default: ``world.facts``) with the same relation, another subject
    and another value; ``answer`` is the fact's value, ``wrong_answer`` the partner's. Template 1
    is ``"the <relation> of {subject} is"``, which ends on the predicting position. Raises
    ``ValueError`` when a fact has no such partner in ``pool`` or the template index is out of range.
    """
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    pool = list(world.facts if pool is None else pool)
    out = []
    for fact in facts:
        templates = world.relation[fact.relation_id].train_templates
        if not 0 <= template < len(templates):
            raise ValueError(f"template must be in 0..{len(templates) - 1} for {fact.relation_id}, got {template}")
        partners = [g for g in pool if g.relation_id == fact.relation_id and g.subject != fact.subject and g.value != fact.value]
        if not partners:
            raise ValueError(f"no partner for {fact}: pool has no other subject with a different {fact.relation_id} value")
        partner = rng.choice(partners)
        out.append(
            PromptPair(
                clean=fill(templates[template], fact.subject), corrupt=fill(templates[template], partner.subject),
                answer=fact.value, wrong_answer=partner.value,
            )
        )
    return out


def control_facts(world: World, facts: Sequence[Fact]) -> list[Fact]:
    """Facts of trained people to contrast ``facts`` with: as many per relation as ``facts`` has,
    the first in world order whose subject is not one of ``facts``' subjects.

    Locators' ``control=`` subtracts what every subject shares (e.g. ``fact_lookup`` on the planted
    facts of ``factworld-planted`` / ``-subject``). Raises ``ValueError`` if the world has too few.
    """
    need: dict[str, int] = {}
    for f in facts:
        need[f.relation_id] = need.get(f.relation_id, 0) + 1
    subjects, out = {f.subject for f in facts}, []
    for f in world.facts:
        if f.subject not in subjects and need.get(f.relation_id, 0) > 0:
            out.append(f)
            need[f.relation_id] -= 1
    missing = {r: n for r, n in need.items() if n > 0}
    if missing:
        raise ValueError(f"not enough other people's facts for a control: still need {missing} (relation: count)")
    return out
