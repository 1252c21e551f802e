"""Rank-one edits on the fact world: planted birth cities moved to new cities at the traced layer."""

from __future__ import annotations

import pytest

import mechedit
from mechedit import zoo
from mechedit.edit.rank_one import RankOneConfig, rank_one_edit
from mechedit.evaluate import evaluate_fact_edit
from mechedit.locate import causal_tracing
from mechedit.prompts import FactPrompt
from mechedit.zoo.prompts import fact_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

PLANTED_LAYER = 2  # mechedit/zoo/MODEL_CARD.md: factworld-planted's trained block


def test_rank_one_edits_of_planted_facts_at_the_traced_layer():
    model = mechedit.load("factworld-planted")
    world = zoo.load_world("factworld-planted")
    cities = world.relation["P19"].values
    planted = [f for f in world.planted_facts if f.relation_id == "P19"][:2]
    others = [f for f in world.facts if f.relation_id == "P19"]

    # Locate: MLP restorations, the 4 planted birth-city facts minus trained (control) facts.
    # Measured on the re-planted model (issue 7): MLP 2 at the final token leads with 0.15 / 0.17 /
    # 0.21 at 4 / 8 / 16 noise samples (next: MLP 4 there, 0.09 / 0.05 / 0.06); traced on the 2
    # edited facts alone, 4 noise samples put MLP 4 first (0.155 vs 0.006): too few to trace on.
    template = world.relation["P19"].train_templates[0]
    def as_fact(f):
        return FactPrompt(prompt=template.format(f.subject), subject=f.subject, target=f.value)

    trace = causal_tracing(
        model,
        [as_fact(f) for f in world.planted_facts if f.relation_id == "P19"],
        kinds=("mlp",),
        control=[as_fact(f) for f in others[:8]],
        window=1,
        n_noise=8,
        progress=False,
    )
    circuit = trace.mlp.top_k(1)
    assert next(iter(circuit)).layer == PLANTED_LAYER

    news = {
        f.subject: next(c for c in cities[i + 1 :] + cities if c != f.value)
        for i, f in enumerate(planted)
    }
    requests = [
        FactPrompt(prompt=p.prompt, subject=p.subject, target=p.target, target_new=news[f.subject])
        for f in planted
        for p in fact_prompts(world, f)
    ]
    config = RankOneConfig(fact_token="last", key_mode="contexts", n_prefixes=1, batch_size=256)
    edit = rank_one_edit(
        model,
        requests,
        layer=circuit,
        texts=list(world.training_sentences(0))[:1500],
        config=config,
    )
    assert edit.params["layer"] == PLANTED_LAYER and edit.params["sequential"]

    def new_answers(heldout: bool) -> list[FactPrompt]:
        return [
            FactPrompt(prompt=p.prompt, subject=p.subject, target=news[f.subject])
            for f in planted
            for p in fact_prompts(world, f, heldout=heldout)
        ]

    report = evaluate_fact_edit(
        model,
        edit=edit,
        edited=new_answers(False),
        paraphrases=new_answers(True),
        neighbours=[p for f in others[:20] for p in fact_prompts(world, f)],
        fluency_texts=list(world.text_heldout[:150]),
    )
    efficacy = report.get("efficacy", "accuracy")
    neighbours = report.get("specificity", "accuracy")
    ppl = report.get("fluency", "perplexity")
    assert efficacy.before == 0.0 and efficacy.after >= 0.9, report.to_frame()
    assert neighbours.after >= neighbours.before - 0.05, report.to_frame()
    assert ppl.after <= 1.05 * ppl.before, report.to_frame()
