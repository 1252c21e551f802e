"""Rank-one edits (ROME / AlphaEdit) of the planted birth-city facts on factworld-planted: the table.

Edits the planted people's birth cities to new cities, one rank-one update per person applied in
sequence, at the layer causal tracing locates, at the planted layer and at wrong layers, and
prints per run: new-answer accuracy on the edited prompts (training templates) and on held-out
templates, other people's birth-city accuracy (neighbours: 40 trained people, training
templates) and held-out perplexity, before -> after. AlphaEdit runs preserve the keys of other
trained people's birth-city prompts (100 people, disjoint from the evaluated neighbours). The
key covariance and the prefixes come from the first 4,000 sentences of the training corpus
(``world.training_sentences(0)``: fact sentences and general text, as ROME's Wikipedia is GPT-2's
kind of text); 2 prefixes per prompt.

    python bench/rank_one_table.py [--runs NAME ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import mechedit
from mechedit import zoo
from mechedit.edit.rank_one import RankOneConfig, rank_one_edit
from mechedit.evaluate import evaluate_fact_edit
from mechedit.locate import causal_tracing
from mechedit.prompts import FactPrompt
from mechedit.zoo.prompts import fact_prompts

MODEL = "factworld-planted"
PLANTED_LAYER = 2


def setup(model_name: str = MODEL, n_neighbours: int = 40, n_preserved: int = 100) -> dict:
    """The edit requests, evaluation suites and preserved facts (deterministic)."""
    world = zoo.load_world(model_name)
    cities = world.relation["P19"].values
    planted = [f for f in world.planted_facts if f.relation_id == "P19"]
    requests, news = [], {}
    for i, fact in enumerate(planted):
        new = next(c for c in cities[i + 1 :] + cities if c != fact.value)
        news[fact.subject] = new
        requests += [
            FactPrompt(prompt=p.prompt, subject=p.subject, target=p.target, target_new=new)
            for p in fact_prompts(world, fact)
        ]

    def as_new(held: bool) -> list[FactPrompt]:
        return [
            FactPrompt(prompt=p.prompt, subject=p.subject, target=news[f.subject])
            for f in planted
            for p in fact_prompts(world, f, heldout=held)
        ]

    others = [f for f in world.facts if f.relation_id == "P19"]
    neighbours = [p for f in others[:n_neighbours] for p in fact_prompts(world, f)]
    preserved = [
        p for f in others[n_neighbours : n_neighbours + n_preserved] for p in fact_prompts(world, f)
    ]
    return {
        "world": world,
        "planted": planted,
        "requests": requests,
        "edited": as_new(False),
        "paraphrases": as_new(True),
        "neighbours": neighbours,
        "preserved": preserved,
    }


def traced_layer(model, data: dict) -> tuple[int, dict]:
    """The layer of the strongest MLP restoration at the last token, planted minus control facts."""
    world = data["world"]
    template = world.relation["P19"].train_templates[0]
    facts = [
        FactPrompt(prompt=template.format(f.subject), subject=f.subject, target=f.value)
        for f in data["planted"]
    ]
    control = [
        FactPrompt(prompt=template.format(f.subject), subject=f.subject, target=f.value)
        for f in [f for f in world.facts if f.relation_id == "P19"][:16]
    ]
    trace = causal_tracing(model, facts, kinds=("mlp",), control=control, window=1, progress=False)
    circuit = trace.mlp.top_k(1)
    return next(iter(circuit)).layer, {
        "circuit": [str(c) for c in circuit],
        "scores_last": trace.mlp.values[:, -1].tolist(),
    }


def run(model, data: dict, *, layer, config: RankOneConfig, alphaedit: bool) -> dict:
    """One edit of all the requests at ``layer``, measured by ``evaluate_fact_edit``."""
    world = data["world"]
    start = time.perf_counter()
    edit = rank_one_edit(
        model,
        data["requests"],
        layer=layer,
        texts=list(world.training_sentences(0))[:4000],
        preserve=data["preserved"] if alphaedit else None,
        config=config,
    )
    seconds = time.perf_counter() - start
    report = evaluate_fact_edit(
        model,
        edit=edit,
        edited=data["edited"],
        paraphrases=data["paraphrases"],
        neighbours=data["neighbours"],
        fluency_texts=list(world.text_heldout),
    )
    row = {
        "edited": report.get("efficacy", "accuracy"),
        "heldout": report.get("generalisation", "accuracy"),
        "neighbours": report.get("specificity", "accuracy"),
        "perplexity": report.get("fluency", "perplexity"),
    }
    return {"seconds": seconds, "edit": edit, **{k: (r.before, r.after) for k, r in row.items()}}


RUNS = {
    # name: (layer (int, or "traced"), config kwargs, alphaedit)
    "rome_subject_last": (PLANTED_LAYER, {}, False),
    "rome_last_mean": (PLANTED_LAYER, {"fact_token": "last"}, False),
    "last_contexts": (PLANTED_LAYER, {"fact_token": "last", "key_mode": "contexts"}, False),
    "last_contexts_alphaedit": (
        PLANTED_LAYER,
        {"fact_token": "last", "key_mode": "contexts"},
        True,
    ),
    "traced_contexts_alphaedit": ("traced", {"fact_token": "last", "key_mode": "contexts"}, True),
    "wrong_layer_4": (4, {"fact_token": "last", "key_mode": "contexts"}, True),
    "wrong_layer_0": (0, {"fact_token": "last", "key_mode": "contexts"}, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mechedit.load(MODEL)
    data = setup()
    traced = None
    print(
        "| run | layer | edited (new answer) | held-out templates | neighbours | perplexity | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.runs:
        layer, kwargs, alphaedit = RUNS[name]
        if layer == "traced":
            if traced is None:
                traced, info = traced_layer(model, data)
                print(f"<!-- causal tracing: {info} -->")
            layer = traced
        config = RankOneConfig(**{"n_prefixes": 2, **kwargs})
        out = run(model, data, layer=layer, config=config, alphaedit=alphaedit)
        cells = " | ".join(
            f"{out[k][0]:.3f} -> {out[k][1]:.3f}"
            for k in ("edited", "heldout", "neighbours", "perplexity")
        )
        print(f"| {name} | {layer} | {cells} | {out['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
