"""Robustness attacks (``mechedit.evaluate.robustness``) on a deliberately shallow fact-world edit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import mechedit
from mechedit.components import Component
from mechedit.edit.finetune import FinetuneConfig, finetune
from mechedit.evaluate import fact_edit_suites
from mechedit.evaluate.facts import FactEditSuites
from mechedit.evaluate.robustness import (
    ATTACKS,
    RobustnessConfig,
    RobustnessFormatError,
    RobustnessReport,
    RobustnessRow,
    robustness_report,
)
from mechedit.hf import hf_parameters
from mechedit.prompts import FactPrompt
from mechedit.zoo import load_world
from mechedit.zoo.random_model import random_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in hf_parameters(model).items()}


@pytest.fixture(scope="module")
def shallow():
    """Twelve people's birth cities (six cities, two people each) forgotten by NPO on the last
    MLP's output bias alone: one constant vector added to the residual stream, the shallowest
    edit there is. Cities are shared across the attack/held-out split on purpose (relearning one
    person's city can lift the other's)."""
    original, edited = mechedit.load("factworld"), mechedit.load("factworld")
    world = load_world("factworld")
    facts = [f for f in world.facts if f.relation_id == "P19"]
    by_city: dict[str, list] = {}
    for f in facts:
        by_city.setdefault(f.value, []).append(f)
    forget = [f for city in sorted(by_city)[:6] for f in by_city[city][:2]]
    retain = [f for f in facts if f not in set(forget)][:12]
    texts = world.text_heldout[:20]
    forget_case = fact_edit_suites(world, forget, neighbours_per_fact=1, fluency_texts=texts)
    forget_case = dataclasses.replace(forget_case, same_subject=())
    retain_case = fact_edit_suites(world, retain, case="retain", neighbours_per_fact=0, fluency_texts=texts)
    retain_case = dataclasses.replace(retain_case, same_subject=())
    layer = edited.cfg.n_layers - 1
    bias = [Component("partition", layer, param=f"transformer.h.{layer}.mlp.c_proj.bias", unit=u)
            for u in range(edited.cfg.d_model)]
    edit = finetune(edited, bias, forget=forget_case.efficacy, progress=False,
                    config=FinetuneConfig(objectives={"npo": 1.0}, lr=0.5, steps=60, forget_target=0.2, eval_every=1))
    edit.apply(edited)
    before = (_snapshot(original), _snapshot(edited))
    report = robustness_report(original, edited, forget_case, retain_case, progress=False,
                               config=RobustnessConfig(relearn_lr=1e-3, lora_lr=1e-2, latent_epsilon=1.0))
    return dict(original=original, edited=edited, forget=forget_case, retain=retain_case, report=report,
                before=before)


def test_each_attack_recovers_part_of_a_shallow_edit(shallow):
    report = shallow["report"]
    forgot = report.get("efficacy", "choice_accuracy_true", "none", case="forget")
    # On the retrained factworld (issue 7) one offset vector stops at 0.38-0.42 of the forget
    # people's cities still first among the candidates, however it is trained (measured: lr 0.2 /
    # 0.5 / 1.0, 60-150 steps, p_true down to 0.02); lr 0.5 gives 0.42 (0.71 at the earlier lr 0.2)
    assert forgot.original == 1.0 and forgot.edited <= 0.45
    # measured (seed 0) on the retrained factworld: relearn_full 0.18, probe_retrained 1.0,
    # latent_universal 0.32, latent_per_example 1.0, direction_ablation 1.0 (relearn_lora: the
    # xfail below). The latent bound is 1.0 of the residual norm: at 0.5 the universal
    # perturbation recovered 0.0 and the per-example one 0.64 (the earlier model: 0.32 and 1.0).
    floors = {"relearn_full": 0.15, "latent_universal": 0.1,
              "latent_per_example": 0.5, "direction_ablation": 0.5}
    for attack, floor in floors.items():
        assert report.recovery(attack) > floor, attack
    probe = report.to_frame().query("suite == 'probe' and attack == 'probe_retrained'").iloc[0]
    # a constant offset: a probe re-fitted on the edited model reads the city as before
    assert probe.recovery > 0.8
    assert probe.original > 0.5  # the original's probe reads it for unseen people at all
    # after the edited bias (the last depth) a re-fitted probe still reads the city; the
    # original's frozen probe, whose standardisation does not know the offset, reads less
    probes = report.context["attacks"]["probes"]
    assert probes["depths"][-1] == "resid_post 5"
    refit, frozen = probes["edited"]["test_accuracy"][-1], probes["frozen_on_edited"][-1]
    assert refit >= probes["original"]["test_accuracy"][-1] - 0.1
    assert frozen < refit - 0.2


@pytest.mark.xfail(strict=True, reason=(
    "on the factworld retrained in issue 7, LoRA relearning on the attack half lowers the held-out half "
    "instead of lifting it: recovery -0.25 (lora lr 1e-2), 0.0 (3e-3), -0.38 (seed 1); the earlier model 0.29. "
    "Full relearning transfers little too (0.18; 20 -> 40 steps: -0.14; seed 1: 0.0)"))
def test_lora_relearning_recovers_part_of_a_shallow_edit(shallow):
    assert shallow["report"].recovery("relearn_lora") > 0.1


def test_attacks_are_measured_on_the_held_out_half_only(shallow):
    report, forget = shallow["report"], shallow["forget"]
    split = report.context["split"]
    attack, held = set(split["attack_subjects"]), set(split["heldout_subjects"])
    assert attack and held and not attack & held
    assert attack | held == {p.subject for p in forget.efficacy}
    n_held = sum(p.subject in held for p in forget.efficacy)
    frame = report.to_frame()
    relearn = frame.query("attack == 'relearn_full' and suite == 'efficacy'")
    assert set(relearn.n) == {n_held} and set(relearn.case) == {"forget_heldout"}
    # relearning did learn what it trained on (so the held-out figure is the transfer)
    assert report.context["attacks"]["relearn_full"]["loss_last"] < 0.1 * report.context["attacks"]["relearn_full"]["loss_first"]


def test_models_are_left_bit_identical(shallow):
    for model, snapshot in zip((shallow["original"], shallow["edited"]), shallow["before"], strict=True):
        live = hf_parameters(model)
        assert all(torch.equal(live[n], t) for n, t in snapshot.items())


def test_lora_relearning_leaves_the_edited_model_bit_identical(shallow):
    edited = shallow["edited"]
    snapshot = _snapshot(edited)
    config = RobustnessConfig(attacks=("relearn_lora",), relearn_steps=3, lora_targets="all")
    forget = FactEditSuites(efficacy=shallow["forget"].efficacy)  # efficacy only: a quick measurement
    retain = FactEditSuites(efficacy=shallow["retain"].efficacy[:14], case="retain")
    report = robustness_report(shallow["original"], edited, forget, retain, config=config, progress=False)
    assert report.context["attacks"]["relearn_lora"]["steps"] == 3
    live = hf_parameters(edited)
    assert all(torch.equal(live[n], t) for n, t in snapshot.items())


def test_report_round_trips_through_json(shallow, tmp_path):
    report = shallow["report"]
    path = report.save(tmp_path / "robustness.json")
    back = RobustnessReport.load(path)
    assert back.context == report.context
    assert len(back.rows) == len(report.rows)
    for a, b in zip(back.rows, report.rows, strict=True):
        assert (a.case, a.suite, a.measure, a.attack, a.n) == (b.case, b.suite, b.measure, b.attack, b.n)
        for key in ("original", "edited", "attacked"):
            x, y = getattr(a, key), getattr(b, key)
            assert (math.isnan(x) and math.isnan(y)) or x == y
    frame = back.to_frame()
    assert list(frame.columns) == ["case", "suite", "measure", "attack", "original", "edited", "attacked", "recovery", "n"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "mechedit.edit_report", "version": 2, "rows": [], "context": {}}')
    with pytest.raises(RobustnessFormatError):
        RobustnessReport.load(bad)


def test_recovery_definition():
    def row(original, edited, attacked):
        return RobustnessRow("forget_heldout", "efficacy", "choice_accuracy_true", "x", original, edited, attacked, 4)

    assert row(1.0, 0.2, 0.6).recovery == pytest.approx(0.5)
    assert row(1.0, 0.2, 0.0).recovery == pytest.approx(-0.25)  # the attack made it worse
    assert math.isnan(row(0.25, 0.25, 0.5).recovery)  # the edit changed nothing: undefined
    assert math.isnan(row(1.0, 0.2, math.nan).recovery)  # no attack


def test_bad_inputs_are_refused(shallow, tiny_bridge):
    original, edited, forget, retain = (shallow[k] for k in ("original", "edited", "forget", "retain"))
    with pytest.raises(ValueError, match="no facts"):
        fact_edit_suites(load_world("factworld"), [])
    with pytest.raises(ValueError, match="efficacy is empty"):
        FactEditSuites(efficacy=())
    overlapping = dataclasses.replace(retain, efficacy=retain.efficacy + forget.efficacy[:1])
    with pytest.raises(ValueError, match="forgotten and retained"):
        robustness_report(original, edited, forget, overlapping, progress=False)
    one_person = FactEditSuites(efficacy=tuple(p for p in forget.efficacy if p.subject == forget.efficacy[0].subject))
    with pytest.raises(ValueError, match="at least 2 subjects"):
        robustness_report(original, edited, one_person, retain, progress=False)
    with pytest.raises(ValueError, match="same object"):
        robustness_report(original, original, forget, retain, progress=False)
    with pytest.raises(ValueError, match="differ in names or shapes|differ in architecture"):
        robustness_report(original, tiny_bridge, forget, retain, progress=False)
    with pytest.raises(ValueError, match="unknown attacks"):
        RobustnessConfig(attacks=("relearn",))
    with pytest.raises(ValueError, match="unknown measures"):
        RobustnessConfig(measures=("accuracy",))
    with pytest.raises(ValueError, match="latent_layer"):
        robustness_report(original, edited, forget, retain, progress=False,
                          config=RobustnessConfig(attacks=("latent_universal",), latent_layer=99))


def _tiny_case(subjects, case, *, two_tokens=False):
    prompts = [
        FactPrompt(prompt=f"{s} {t}", target=f"w{40 + i % 3}" + (" w50" if two_tokens else ""), subject=s,
                   relation_id="R", candidates=None if two_tokens else ("w40", "w41", "w42"))
        for i, s in enumerate(subjects)
        for t in ("w20 w21", "w22 w23")
    ]
    return FactEditSuites(efficacy=tuple(prompts), paraphrase=tuple(prompts[::2]), case=case)


@pytest.mark.parametrize(
    ("arch", "positions", "two_tokens"), [("gpt2", "last", False), ("neox", "all", False), ("llama", "last", True)]
)
def test_attacks_run_on_tiny_models(tmp_path, arch, positions, two_tokens):
    folder = random_checkpoint(tmp_path / arch, arch, n_layer=2, n_embd=64, n_head=4)
    original, edited = mechedit.load(folder), mechedit.load(folder)
    with torch.no_grad():
        for p in hf_parameters(edited).values():
            if p.ndim == 2:
                p.add_(0.05 * torch.randn_like(p))
    snapshot = _snapshot(edited)
    forget = _tiny_case([f"w{i}" for i in range(1, 7)], "forget", two_tokens=two_tokens)
    retain = _tiny_case([f"w{i}" for i in range(7, 13)], "retain", two_tokens=two_tokens)
    config = RobustnessConfig(relearn_steps=2, latent_steps=2, latent_positions=positions, lora_targets="all",
                              ablation_direction="svd", ablation_rank=2)
    report = robustness_report(original, edited, forget, retain, config=config, progress=False)
    frame = report.to_frame().query("case == 'forget_heldout'")
    assert set(frame.attack) == set(ATTACKS)
    # every attacked score is a real measurement (a fraction or a probability)
    assert frame.attacked.between(0, 1).all()
    measures = set(frame.query("suite == 'efficacy'").measure)
    assert measures == ({"p_true", "exact_true"} if two_tokens else {"p_true", "exact_true", "choice_accuracy_true"})
    assert report.context["attacks"]["direction_ablation"]["ablated"]  # random edits change every depth
    live = hf_parameters(edited)
    assert all(torch.equal(live[n], t) for n, t in snapshot.items())
    if arch == "gpt2":  # deterministic for a seed
        again = robustness_report(original, edited, forget, retain, config=config, progress=False)
        assert again.to_frame().equals(report.to_frame())
