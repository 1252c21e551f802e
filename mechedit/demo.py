"""The main job, end to end on the fact world: load -> locate -> select -> edit -> evaluate -> report.

    python -m mechedit demo            # or: make demo

1. load the fact-world model and its ground truth;
2. pick a person and relation the model knows in every template (seeded);
3. locate: score every MLP neuron by gradient x activation, contrasting the fact's prompts with
   neighbours' (same relation and value) so the selection is about *this* fact;
4. select the top-k neurons as a circuit and save it;
5. edit: zero them with a reversible activation edit (and save the equivalent weight edit);
6. evaluate before vs after: efficacy, held-out paraphrases, unseen neighbours, the person's
   other facts, held-out text perplexity; the edit's effects in detail (``effects=True``): the
   top predictions before and after, each selected (and a random sample of other) neuron's
   predicted vs exact effect, and a k sweep against random neurons
   (``mechedit.evaluate.effects``);
7. write ``runs/demo/`` (params, scores, circuit, weight edit, report.json, the effect tables as
   CSV, report.html).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import mechedit
from mechedit import zoo
from mechedit.circuit import Circuit
from mechedit.edit import ablate, zero_neurons
from mechedit.evaluate import EditReport, evaluate_fact_edit, fact_item_scores
from mechedit.evaluate.effects import DEFAULT_KS, k_sweep, predicted_vs_observed, top_predictions
from mechedit.locate import NeuronAttributionConfig, neuron_attribution
from mechedit.scores import Scores
from mechedit.zoo.prompts import fact_prompts
from mechedit.zoo.world import Fact, World, facts_about, fill


@dataclass(frozen=True)
class DemoConfig:
    """What the demo does. ``subject=None`` picks a person by ``seed``.

    Attributes:
        model: a zoo name with recorded world (``factworld`` or ``factworld-planted``).
        relation_id: the relation whose value is forgotten.
        k: how many neurons the circuit keeps.
        n_retain: neighbours given to the locator as facts to keep (others are held out for
            the specificity evaluation).
        retain_weight: weight of the retain set in the attribution score.
        out_dir: the run folder.
        effects: also measure the edit's effects in detail (top predictions, predicted vs
            observed per neuron, the k sweep with random neurons; a few seconds more).
        n_seeds: random neuron sets per k in the sweep.
    """

    model: str = "factworld"
    subject: str | None = None
    relation_id: str = "P19"
    k: int = 24
    n_retain: int = 12
    retain_weight: float = 1.0
    seed: int = 0
    out_dir: str = "runs/demo"
    effects: bool = True
    n_seeds: int = 3

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.n_retain < 0:
            raise ValueError(f"n_retain must be >= 0, got {self.n_retain}")
        if self.n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {self.n_seeds}")


@dataclass
class DemoEffects:
    """The edit's effects in detail (``mechedit.evaluate.effects``' tables).

    Attributes:
        top_predictions: ``top_predictions``' table: the 5 likeliest next tokens before and with
            the edit, for the forget prompts, the paraphrases, a few held-out neighbours and one
            prompt per other relation of the subject.
        predicted_vs_observed: ``predicted_vs_observed``' table for the k selected neurons and 12
            random others (nats), and all k zeroed together.
        k_sweep: ``k_sweep``' table: forget set and held-out neighbours with the top-k vs random
            k neurons zeroed.
    """

    top_predictions: pd.DataFrame
    predicted_vs_observed: pd.DataFrame
    k_sweep: pd.DataFrame


@dataclass
class DemoResult:
    config: DemoConfig
    fact: Fact
    scores: Scores
    circuit: Circuit
    report: EditReport
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    effects: DemoEffects | None = None


def choose_fact(model: Any, world: World, config: DemoConfig) -> Fact:
    """The configured subject's fact, or a seeded pick among facts known in every template."""
    rel = world.relation.get(config.relation_id)
    if rel is None:
        raise ValueError(f"unknown relation {config.relation_id!r}; the world has {sorted(world.relation)}")
    facts = [f for f in world.facts if f.relation_id == rel.id]
    if config.subject is not None:
        return facts_about(facts, config.subject)[0]
    # every fact in every template, scored in one batched pass: [n_facts, n_templates]
    per_fact = len(rel.templates)
    prompts = [p for f in facts for p in fact_prompts(world, f) + fact_prompts(world, f, heldout=True)]
    correct = fact_item_scores(model, prompts)["accuracy"].view(len(facts), per_fact)
    known = [f for f, ok in zip(facts, correct.bool().all(dim=1).tolist()) if ok]
    if not known:
        raise RuntimeError(f"the model knows no {rel.name} fact in every template; is it trained?")
    return random.Random(config.seed).choice(known)


def run_demo(config: DemoConfig | None = None, *, progress: bool = True) -> DemoResult:
    """Run the whole pipeline once and write the run folder; see the module docstring."""
    cfg = config or DemoConfig()
    say = print if progress else (lambda *a, **k: None)
    out = Path(cfg.out_dir)  # created only once the fact is chosen: bad arguments leave no folder
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    say(f"[1/6] loading {cfg.model} ...")
    model = mechedit.load(cfg.model)
    world = zoo.load_world(cfg.model)
    seconds["load"] = time.perf_counter() - t0

    fact = choose_fact(model, world, cfg)
    say(f"[2/6] the fact: {fill(world.relation[fact.relation_id].train_templates[0], fact.subject)} -> {fact.value}")
    forget = fact_prompts(world, fact)
    neighbours = world.neighbours(fact)
    rng = random.Random(cfg.seed)
    rng.shuffle(neighbours)
    retain_facts, held_neighbours = neighbours[: cfg.n_retain], neighbours[cfg.n_retain :]
    retain = [p for f in retain_facts for p in fact_prompts(world, f)]
    person = next(p for p in world.people if p.name == fact.subject)
    other_relations = [
        p
        for rid, value in person.facts.items()
        if rid != fact.relation_id
        for p in fact_prompts(world, Fact(fact.subject, rid, value))
    ]

    say(f"[3/6] locating: gradient x activation over {model.cfg.n_layers} x {model.cfg.d_mlp} MLP neurons")
    t = time.perf_counter()
    scores = neuron_attribution(
        model, forget, retain, config=NeuronAttributionConfig(retain_weight=cfg.retain_weight), progress=progress
    )
    seconds["locate"] = time.perf_counter() - t
    circuit = scores.top_k(cfg.k, description=f"top-{cfg.k} neurons for '{fact.subject}' {fact.relation_id} = {fact.value}")
    circuit.validate(model)

    say(f"[4/6] editing: zeroing {len(circuit)} neurons (reversible activation edit)")
    say("[5/6] evaluating before vs after")
    t = time.perf_counter()
    report = evaluate_fact_edit(
        model,
        edit=ablate(model, circuit, mode="zero"),
        edited=forget,
        paraphrases=fact_prompts(world, fact, heldout=True),
        neighbours=[p for f in held_neighbours for p in fact_prompts(world, f)],
        fluency_texts=list(world.text_heldout),
        extra={"same_subject_other_relations": other_relations},
        context={"fact": asdict(fact), "k": cfg.k, "model": cfg.model},
    )
    seconds["evaluate"] = time.perf_counter() - t
    effects = None
    if cfg.effects:
        t = time.perf_counter()
        effects = measure_effects(model, scores, circuit, cfg, forget=forget, paraphrases=fact_prompts(world, fact, heldout=True),
                                  retain=retain, neighbours=[p for f in held_neighbours for p in fact_prompts(world, f)],
                                  other_relations=other_relations)
        seconds["effects"] = time.perf_counter() - t

    say(f"[6/6] writing {out}/")
    out.mkdir(parents=True, exist_ok=True)
    weight_edit = zero_neurons(model, circuit)
    paths = {
        "params": out / "params.json",
        "scores": scores.save(out / "scores"),
        "circuit": circuit.save(out / "circuit.json"),
        "weight_edit": weight_edit.save(out / "weight_edit", overwrite=True),
        "report_json": report.save(out / "report.json"),
    }
    if effects is not None:
        for name in ("top_predictions", "predicted_vs_observed", "k_sweep"):
            paths[name] = out / f"{name}.csv"
            getattr(effects, name).to_csv(paths[name], index=False)
    seconds["total"] = time.perf_counter() - t0
    paths["params"].write_text(
        json.dumps({"config": asdict(cfg), "fact": asdict(fact), "n_forget": len(forget), "n_retain": len(retain), "seconds": seconds}, indent=2) + "\n",
        encoding="utf-8",
    )
    result = DemoResult(cfg, fact, scores, circuit, report, paths, seconds, effects)
    from mechedit.viz.demo_report import write_demo_report

    paths["report_html"] = write_demo_report(result, out / "report.html", world=world)
    return result


def measure_effects(
    model: Any,
    scores: Scores,
    circuit: Circuit,
    cfg: DemoConfig,
    *,
    forget: list[Any],
    paraphrases: list[Any],
    retain: list[Any],
    neighbours: list[Any],
    other_relations: list[Any],
) -> DemoEffects:
    """The demo edit's effects in detail (see ``DemoEffects``); the model is left unedited."""
    # one prompt per other relation: the collateral damage, if any, shows as a changed answer
    firsts: dict[Any, Any] = {}
    for p in other_relations:
        firsts.setdefault(p.relation_id, p)
    shown = forget + paraphrases + neighbours[:3] + list(firsts.values())
    top = top_predictions(model, shown, n=5, edit=ablate(model, circuit, mode="zero"))
    # 12 random neurons and 3 seeds keep this under ~10 s on 2 cores; big batches are cheaper per
    # row on the tiny fact-world model
    pvo = predicted_vs_observed(model, scores, forget, retain, k=len(circuit), n_random=12, seed=cfg.seed,
                                retain_weight=cfg.retain_weight, batch_size=2048)
    n_scored = int((~scores.values.isnan()).sum())
    ks = sorted(k for k in {*DEFAULT_KS, len(circuit)} if k <= n_scored)
    sweep = k_sweep(model, scores, forget, neighbours, ks=ks, n_seeds=cfg.n_seeds, seed=cfg.seed, batch_size=2048)
    return DemoEffects(top, pvo, sweep)


def summary_table(result: DemoResult) -> str:
    """The report as aligned text: suite, metric, before, after, change."""
    frame = result.report.to_frame()
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4f}")
