"""Forget, edit and F-Learning of 16 people's birth cities on the fact world, by fine-tuning MLPs.

    python bench/finetune_factworld.py                 # the three chosen settings (the table)
    python bench/finetune_factworld.py --attempt forget --layers 1,2,3,4,5 \
        --objectives "NPO(beta=0.1),RetainCE(weight=4)" --lr 3e-4 --steps 150

Data (``factworld``, relation P19 "born in", training templates, 7 per person):

* forget / edit: the first 16 people's P19 facts (112 prompts); the edit's new city is the next
  city in the world's city list;
* retain (trained on): 96 other people's P19 facts (people 112..207, 672 prompts) and the 16
  people's other relations in templates 3..7;
* measured "retained facts": 64 **other** people's P19 facts (people 48..111, 448 prompts, never
  trained on) and the 16 people's other relations in templates 1..2 (160 prompts); perplexity:
  100 held-out texts. Measured with ``mechedit.evaluate.evaluate_fact_edit``.

Targets (issue 12): forget accuracy <= 10 % on the training templates, retained facts within 5
points, perplexity within 5 %; edit accuracy (new city, exact match) >= 90 % with the same
limits; F-Learning reaches its edit target (>= 90 %) on a smaller set (4 people). Every attempt
is recorded in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

import mechedit
from mechedit import zoo
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.edit import (
    NPO,
    EditCE,
    FinetuneConfig,
    FLearningConfig,
    GradientAscent,
    LogOneMinusP,
    RandomMismatch,
    RetainCE,
    RetainKL,
    SimNPO,
    exact_match,
    f_learning,
    finetune,
)
from mechedit.evaluate import evaluate_fact_edit
from mechedit.prompts import FactPrompt
from mechedit.zoo.prompts import fact_prompts

OBJECTIVE_NAMES = {c.__name__: c for c in (NPO, EditCE, GradientAscent, LogOneMinusP, RandomMismatch, RetainCE,
                                           RetainKL, SimNPO)}


@dataclass
class Split:
    forget: list[FactPrompt]
    edit: list[FactPrompt]
    retain: list[FactPrompt]
    neighbours: list[FactPrompt]
    same_subject: list[FactPrompt]
    texts: list[str]


def split(world: Any, n_people: int = 16) -> Split:
    p19 = [f for f in world.facts if f.relation_id == "P19"]
    chosen = p19[:n_people]
    subjects = {f.subject for f in chosen}
    cities = sorted({f.value for f in p19})
    forget = [p for f in chosen for p in fact_prompts(world, f)]
    new_city = {f.subject: cities[(cities.index(f.value) + 1) % len(cities)] for f in chosen}
    edit = [FactPrompt(prompt=p.prompt, target=p.target, subject=p.subject, target_new=new_city[p.subject],
                       relation_id="P19") for p in forget]
    others = [f for f in world.facts if f.subject in subjects and f.relation_id != "P19"]
    retain = [p for f in p19[112:208] for p in fact_prompts(world, f)] + [
        p for f in others for p in fact_prompts(world, f)[2:]
    ]
    neighbours = [p for f in p19[48:112] for p in fact_prompts(world, f)]
    same_subject = [p for f in others for p in fact_prompts(world, f)[:2]]
    return Split(forget, edit, retain, neighbours, same_subject, list(world.text_heldout[:100]))


def mlp_circuit(model: Any, layers: list[int]) -> Circuit:
    return Circuit.of(model, [Component("mlp", layer) for layer in layers], method="manual",
                      description=f"MLP blocks {layers}")


def measure(model: Any, edit: Any, data: Split, *, edited: list[FactPrompt]) -> dict[str, Any]:
    report = evaluate_fact_edit(model, edit=edit, edited=edited, neighbours=data.neighbours,
                                extra={"same_subject": data.same_subject}, fluency_texts=data.texts)
    row = {
        "target_acc": [report.get("efficacy", "accuracy").before, report.get("efficacy", "accuracy").after],
        "neighbours": [report.get("specificity", "accuracy").before, report.get("specificity", "accuracy").after],
        "same_subject": [report.get("same_subject", "accuracy").before, report.get("same_subject", "accuracy").after],
        "perplexity": [report.get("fluency", "perplexity").before, report.get("fluency", "perplexity").after],
    }
    if edited[0].target_new is not None:
        new = [(p.prompt, p.target_new) for p in edited]
        row["new_acc"] = [exact_match(model, new)]
        with edit.applied(model):
            row["new_acc"].append(exact_match(model, new))
    return row


def run(kind: str, layers: list[int], objectives: tuple, lr: float, steps: int, *, batch_size: int = 32,
        eval_every: int = 3, n_people: int = 16, lam: float = 1.0, old_steps: int = 10) -> dict[str, Any]:
    model = mechedit.load("factworld")
    world = zoo.load_world("factworld")
    data = split(world, n_people)
    circuit = mlp_circuit(model, layers)
    start = time.perf_counter()
    if kind == "forget":
        cfg = FinetuneConfig(objectives, lr=lr, steps=steps, batch_size=batch_size, forget_target=0.1,
                             eval_every=eval_every)
        edit = finetune(model, circuit, forget=data.forget, retain=data.retain, config=cfg, progress=False)
        edited, run_ = data.forget, edit.params["run"]
    elif kind == "edit":
        cfg = FinetuneConfig(objectives, lr=lr, steps=steps, batch_size=batch_size, edit_target=1.0,
                             eval_every=eval_every)
        edit = finetune(model, circuit, edit=data.edit, retain=data.retain, config=cfg, progress=False)
        edited, run_ = data.edit, edit.params["run"]
    else:
        cfg = FLearningConfig(
            old=FinetuneConfig((EditCE(),), lr=lr, steps=old_steps, batch_size=batch_size),
            lam=lam,
            learn=FinetuneConfig(objectives, lr=lr, steps=steps, batch_size=batch_size, edit_target=1.0,
                                 eval_every=eval_every),
        )
        edit = f_learning(model, circuit, edit=data.edit, retain=data.retain, config=cfg, progress=False)
        edited, run_ = data.edit, edit.params["runs"]["learn"]
    seconds = time.perf_counter() - start
    return {"kind": kind, "layers": layers, "objectives": [o.to_dict() for o in objectives], "lr": lr,
            "steps": run_["steps"], "seconds": round(seconds, 1), "n_people": n_people,
            **measure(model, edit, data, edited=edited)}


CHOSEN = {
    "forget": dict(layers=[0, 1, 2, 3, 4, 5], objectives=(LogOneMinusP(), RetainCE(weight=4.0)), lr=3e-4, steps=150),
    "edit": dict(layers=[0, 1, 2, 3, 4, 5], objectives=(EditCE(), RetainCE(weight=4.0)), lr=3e-4, steps=150),
    "f_learning": dict(layers=[0, 1, 2, 3, 4, 5], objectives=(EditCE(), RetainCE(weight=4.0)), lr=3e-4,
                       steps=150, n_people=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempt", choices=("forget", "edit", "f_learning"), default=None)
    parser.add_argument("--layers", default="0,1,2,3,4,5")
    parser.add_argument("--objectives", default="LogOneMinusP(),RetainCE(weight=4)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--people", type=int, default=16)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.attempt is None:
        for kind, settings in CHOSEN.items():
            print(json.dumps(run(kind, **settings)), flush=True)
        return
    objectives = eval(f"({args.objectives},)", {"__builtins__": {}}, OBJECTIVE_NAMES)  # noqa: S307 - local CLI
    print(json.dumps(run(args.attempt, [int(x) for x in args.layers.split(",")], objectives, args.lr, args.steps,
                         batch_size=args.batch_size, n_people=args.people, lam=args.lam)))


if __name__ == "__main__":
    main()
