"""Mechanistic Unlearning's comparison on the fact world: which localisation makes forgetting robust?

Forgets 16 people's birth cities (``P19``) on ``factworld`` through five localisations - fact
lookup, causal tracing and attribution patching grown to the fact-lookup circuit's size, every MLP
block, every weight - with one objective (``log(1 - p)`` plus a retain cross-entropy on 48 other
people, 30 steps, stopped once forgotten) and a learning-rate sweep, then attacks each edit
(``mechedit.evaluate.robustness``: relearning on half the people, with all weights and LoRA;
linear probes; a universal and a per-example latent perturbation; direction ablation) and prints
the headline table (accuracy over the relation's 20 cities, held-out half for the attacks) and the
sweep. Fact lookup is located on 32 people's facts; on this model its measured extraction layer
is 1 and the circuit is MLP 0 (``--receiver`` is used only when no extraction layer above 0 is
measured, as on the factworld trained before issue 7).

    python bench/localization_comparison.py [--forget 16] [--lrs 1e-3 3e-3 1e-2] [--out FILE.json]

``--planted`` runs it where the ground truth is known: on ``factworld-planted-subject`` it forgets
the planted facts (stored by MLP 1 as enrichment of the name tokens), keeps trained people's
facts of the same relations, and locates fact lookup against those as control facts (the
extraction layer is then measured, no receiver is given).

    python bench/localization_comparison.py --planted [--lrs 1e-3 3e-3 1e-2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import random
import time

import pandas as pd
import torch

import mechedit
from mechedit import zoo
from mechedit.budget import circuit_size, grow_to_budget
from mechedit.edit import FinetuneConfig, LogOneMinusP, RetainCE
from mechedit.evaluate import ComparisonConfig, compare_localizations, fact_edit_suites
from mechedit.evaluate.robustness import RobustnessConfig
from mechedit.locate import attribution_patching, causal_tracing, fact_lookup
from mechedit.scores import Scores
from mechedit.zoo.prompts import control_facts, fact_pairs, fact_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: factworld (factworld-planted-subject with --planted)")
    parser.add_argument("--planted", action="store_true", help="forget the planted facts (see the docstring)")
    parser.add_argument("--forget", type=int, default=16, help="people whose birth city is forgotten")
    parser.add_argument("--retain", type=int, default=48, help="other people trained to keep theirs")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--receiver", type=int, default=1, help="fact lookup's receiver layer when none is measured above 0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="save the comparison as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    name = args.model or ("factworld-planted-subject" if args.planted else "factworld")
    model, workspace = mechedit.load(name), mechedit.load(name)
    world = zoo.load_world(name)
    control = None
    if args.planted:
        forget = list(world.planted_facts)
        relations = {f.relation_id for f in forget}
        others = [f for f in world.facts if f.relation_id in relations]
        kept = random.Random(0).sample(others, args.retain)
        kept_people = {f.subject for f in kept}
        control = [fact_prompts(world, f)[0] for f in control_facts(world, forget) if f.subject not in kept_people]
        facts = [fact_prompts(world, f)[0] for f in forget]
    else:
        born = [f for f in world.facts if f.relation_id == "P19"]
        located = random.Random(0).sample(born, 64)
        forget = located[: args.forget]
        kept = [f for f in born if f not in located][: args.retain]
        facts = [fact_prompts(world, f)[0] for f in located[:32]]
    lookup = fact_lookup(model, facts, n_corrupt=2, control=control, progress=False)
    print(f"fact lookup: extraction layer {lookup.extraction_layer} ({lookup.extraction_layer_source}), "
          f"heads {[str(h) for h in lookup.heads]}, MLPs {[str(m) for m in lookup.mlps]}")
    if not len(lookup.mlps):
        lookup = fact_lookup(model, facts, n_corrupt=2, control=control, extraction_layer=args.receiver, probes=False,
                             progress=False)
        print(f"  receiver layer {args.receiver} given: MLPs {[str(m) for m in lookup.mlps]}, "
              f"effects {[round(x, 3) for x in lookup.mlp_effects.values.tolist()]}")
    forget_prompts = [fact_prompts(world, f)[0] for f in forget]
    if args.planted:  # templates of several relations: each fact traced at its own positions
        per_fact = causal_tracing(model, forget_prompts, kinds=("mlp",), n_noise=4, per_fact=True, progress=False).mlp
        strongest = per_fact.values.nan_to_num(float("-inf")).amax(-1).mean(0)  # [layer]: best position, mean over facts
        trace_mlp = Scores(strongest, ("layer",), "mlp", per_fact.method, provenance=per_fact.provenance,
                           config={**per_fact.config, "reduced": "max over positions per fact, then mean over facts"})
    else:
        trace_mlp = causal_tracing(model, forget_prompts, kinds=("mlp",), n_noise=4, progress=False).mlp
    attribution = attribution_patching(model, fact_pairs(world, forget), sites=("mlp_out",), per_position=False, progress=False)
    budget = circuit_size(model, lookup.mlps)
    localizations = {
        "fact lookup": lookup.mlps,
        "causal tracing": grow_to_budget(trace_mlp, model, n_params=budget),
        "attribution patching": grow_to_budget(attribution["mlp_out"], model, n_params=budget),
        "all MLPs": "all_mlps",
        "all weights": "all",
    }
    for name, circuit in localizations.items():
        print(f"  {name:22s} {circuit if isinstance(circuit, str) else [str(c) for c in circuit]}")

    case = fact_edit_suites(world, forget, exclude=kept, fluency_texts=world.text_heldout[:100])
    retain = fact_edit_suites(world, kept, neighbours_per_fact=0, case="retain")
    config = ComparisonConfig(
        finetune=FinetuneConfig((LogOneMinusP(), RetainCE(weight=4.0)), steps=30, batch_size=32,
                                forget_target=0.0, eval_every=3),
        lrs=tuple(args.lrs),
        robustness=RobustnessConfig(),
    )
    comparison = compare_localizations(model, localizations, case=case, retain=retain, config=config,
                                       workspace=workspace, progress=True)
    if args.out:
        comparison.save(args.out)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    what = "the relation's values" if args.planted else "the 20 cities"
    print(f"\nheadline (accuracy over {what}; attacks on the held-out half of the forgotten people):")
    print(comparison.headline().T.round(3).to_string())
    print("\nsweep:")
    print(comparison.sweep_frame().round(3).to_string(index=False))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
