"""Circuit-restricted fine-tuning, its objectives and F-Learning on tiny random models."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import mechedit
from mechedit.artifacts import ModelMismatchError
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
    WeightEdit,
    exact_match,
    f_learning,
    finetune,
)
from mechedit.edit.finetune import _draw
from mechedit.edit.objectives import LossInputs, objectives_from
from mechedit.edit.weights import bitwise_equal
from mechedit.hf import circuit_parameters, hf_parameters
from mechedit.metrics import ContinuationLogprobs
from mechedit.prompts import FactPrompt
from mechedit.zoo.random_model import random_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

FORGET = [("w1 w2 w3", "w4"), ("w5 w6", "w7 w8")]  # one multi-token answer, teacher-forced
RETAIN = [("w9 w10", "w11"), ("w12 w13 w14", "w15")]
TEXT = ["w20 w21 w22 w23 w24 w25", "w30 w31 w32"]
CIRCUIT = [Component("mlp", 1), Component("head", 0, head=1), Component("neuron", 0, neuron=3)]


@pytest.fixture(scope="module", params=["gpt2", "neox", "llama"])
def model(request, tmp_path_factory):
    folder = random_checkpoint(tmp_path_factory.mktemp(request.param), request.param, n_layer=2, n_embd=64, n_head=4)
    return mechedit.load(folder)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return mechedit.load(random_checkpoint(tmp_path_factory.mktemp("gpt2"), "gpt2", n_layer=2, n_embd=64, n_head=4))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in hf_parameters(model).items()}


def _config(**kw):
    base = dict(objectives=(NPO(), RetainCE(), RetainKL(), RandomMismatch(weight=0.5)), lr=1e-2, steps=4,
                weight_decay=0.1)
    return FinetuneConfig(**{**base, **kw})


# --- only the circuit changes; optimiser state; revert; save/load -------------------------------


def test_only_circuit_entries_change_and_revert_is_exact(model, tmp_path, monkeypatch):
    optimisers = []
    adamw = torch.optim.AdamW

    def spy(params, **kw):
        opt = adamw(params, **kw)
        optimisers.append(opt)
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    before = _snapshot(model)
    masks = circuit_parameters(model, CIRCUIT)
    edit = finetune(model, CIRCUIT, forget=FORGET, retain=RETAIN, general_text=TEXT, config=_config(), progress=False)

    # the model is left as it was; the edit is not applied
    assert not edit.is_applied
    assert all(bitwise_equal(p, before[n]) for n, p in hf_parameters(model).items())

    # frozen parameters are not in the optimiser: its leaves hold exactly the covered entries
    (opt,) = optimisers
    live = {id(p) for p in hf_parameters(model).values()}
    held = [p for group in opt.param_groups for p in group["params"]]
    assert not any(id(p) in live for p in held)
    assert sum(p.numel() for p in held) == sum(int(m.sum()) for m in masks.values())
    assert sum(opt.state[p]["exp_avg"].numel() for p in held) == sum(int(m.sum()) for m in masks.values())

    edit.apply(model)
    after = _snapshot(model)
    changed = 0
    for name, old in before.items():
        new = after[name]
        mask = masks.get(name)
        if mask is None:
            assert bitwise_equal(new, old), f"{name} is outside the circuit but changed"
            continue
        # weight decay 0.1 ran on the packed entries only: uncovered entries keep their bits
        assert bitwise_equal(new[~mask], old[~mask]), f"uncovered entries of {name} changed"
        moved = int((new[mask] != old[mask]).sum())
        # every covered tensor trains, GPT-2's c_attn too (its gradient arrives through q/k/v views)
        assert moved > 0, f"no covered entry of {name} changed"
        changed += moved
    assert changed > 0.5 * sum(int(m.sum()) for m in masks.values())
    assert set(edit.names) <= set(masks)

    edit.revert(model)
    assert all(bitwise_equal(p, before[n]) for n, p in hf_parameters(model).items())

    loaded = WeightEdit.load(edit.save(tmp_path / "edit"))
    assert loaded.params == edit.params and loaded.kind == "finetune"
    with loaded.applied(model):
        assert all(bitwise_equal(p, after[n]) for n, p in hf_parameters(model).items())
    assert all(bitwise_equal(p, before[n]) for n, p in hf_parameters(model).items())


def test_run_is_recorded_and_deterministic(gpt2):
    cfg = _config(steps=3)
    a = finetune(gpt2, CIRCUIT, forget=FORGET, retain=RETAIN, general_text=TEXT, config=cfg, progress=False)
    b = finetune(gpt2, CIRCUIT, forget=FORGET, retain=RETAIN, general_text=TEXT, config=cfg, progress=False)
    assert a.names == b.names and all(bitwise_equal(a.new_tensors[n], b.new_tensors[n]) for n in a.names)
    run = a.params["run"]
    assert [r["step"] for r in run["curve"]] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "npo", "retain_ce", "retain_kl", "random_mismatch"} <= set(run["curve"][0])
    # NPO starts at (2/beta) log 2 (theta = reference), the KL term at 0
    assert run["curve"][0]["npo"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    assert run["curve"][0]["retain_kl"] == pytest.approx(0.0, abs=1e-6)
    # cosine schedule from lr down
    assert run["curve"][0]["lr"] == pytest.approx(1e-2) and run["curve"][2]["lr"] < run["curve"][1]["lr"] < 1e-2
    assert a.params["config"]["objectives"][0] == {"name": "npo", "weight": 1.0, "beta": 0.1}
    assert a.params["data"]["forget"]["n"] == 2


def test_edit_reaches_its_target_and_stops_early(gpt2):
    edit_rows = [("w1 w2 w3", "w40"), ("w5 w6", "w41 w42")]
    assert exact_match(gpt2, edit_rows) == 0.0
    cfg = FinetuneConfig({"edit_ce": 1.0}, lr=3e-2, steps=60, edit_target=1.0, eval_every=2)
    edit = finetune(gpt2, [Component("mlp", 0), Component("mlp", 1)], edit=edit_rows, config=cfg, progress=False)
    run = edit.params["run"]
    assert run["stopped_early"] and run["steps"] < 60 and run["checks"][-1]["edit_accuracy"] == 1.0
    with edit.applied(gpt2):
        assert exact_match(gpt2, edit_rows) == 1.0
    assert exact_match(gpt2, edit_rows) == 0.0


def test_forget_objective_lowers_answers(gpt2):
    from mechedit.metrics import score_continuations

    before = score_continuations(gpt2, [p for p, _ in FORGET], [a for _, a in FORGET]).total
    for objective in (GradientAscent(), LogOneMinusP(), NPO(), SimNPO()):
        edit = finetune(gpt2, [Component("mlp", 1)], forget=FORGET,
                        config=FinetuneConfig((objective,), lr=1e-2, steps=3), progress=False)
        with edit.applied(gpt2):
            after = score_continuations(gpt2, [p for p, _ in FORGET], [a for _, a in FORGET]).total
        assert (after < before - 0.05).all(), (objective.name, before, after)


# --- objectives: closed-form gradients ----------------------------------------------------------


def _answers(values, lengths):
    """Leaf token log-probs [batch, k] (right-padded with 0) and their mask."""
    width = max(lengths)
    rows = [v + [0.0] * (width - len(v)) for v in values]
    lp = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return lp, ContinuationLogprobs(lp.masked_fill(~mask, 0.0), mask)


VALUES, LENGTHS = [[-0.1, -0.3], [-0.05], [-2.0, -0.2]], [2, 1, 2]


def _grad_per_row(objective, **extra):
    lp, answers = _answers(VALUES, LENGTHS)
    loss = objective.loss(LossInputs(answers=answers, **extra))
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, grad, answers.total.detach(), answers.mask


def test_gradient_ascent_gradient_is_plus_one_over_batch():
    _, grad, _, mask = _grad_per_row(GradientAscent())
    assert torch.allclose(grad, mask.double() / 3)  # > 0: a descent step lowers every answer token


def test_log_one_minus_p_gradient():
    floor = 1e-4
    loss, grad, total, mask = _grad_per_row(LogOneMinusP(floor=floor))
    p = total.exp()
    assert loss.item() == pytest.approx(-torch.log(1 - p + floor).mean().item())
    expected = (p / (1 - p + floor) / 3)[:, None] * mask
    assert torch.allclose(grad, expected) and (grad[mask] > 0).all()
    # bounded below: at p -> 0 the loss is -log(1 + floor), not -inf
    _, very_low = _answers([[-80.0]], [1])
    assert LogOneMinusP(floor=floor).loss(LossInputs(answers=very_low)).item() == pytest.approx(-math.log1p(floor))
    # finite at p = 1
    _, certain = _answers([[0.0]], [1])
    assert LogOneMinusP(floor=floor).loss(LossInputs(answers=certain)).item() == pytest.approx(-math.log(floor))


def test_npo_is_weighted_gradient_ascent_and_tends_to_it():
    ref = torch.tensor([-1.0, -0.5, -1.0], dtype=torch.float64)
    beta = 0.5
    loss, grad, total, mask = _grad_per_row(NPO(beta=beta), reference_total=ref)
    _, ga, _, _ = _grad_per_row(GradientAscent())
    weights = 2 * torch.sigmoid(beta * (total - ref))
    assert torch.allclose(grad, ga * weights[:, None])
    assert loss.item() == pytest.approx(-(2 / beta) * torch.nn.functional.logsigmoid(-beta * (total - ref)).mean().item())
    _, tiny_beta, _, _ = _grad_per_row(NPO(beta=1e-6), reference_total=ref)
    assert torch.allclose(tiny_beta, ga, atol=1e-6)


def test_npo_model_gradient_equals_gradient_ascent_as_beta_goes_to_zero(gpt2):
    """On a model: d NPO / d theta -> d GA / d theta as beta -> 0, with a reference != theta."""
    from mechedit.edit.finetune import _answer_logprobs, _Answers

    weight = hf_parameters(gpt2)["transformer.h.1.mlp.c_proj.weight"]
    batch = _Answers.of(gpt2, FORGET)

    def grad(objective):
        with torch.enable_grad():
            weight.requires_grad_(True)
            answers = _answer_logprobs(gpt2, batch.tokens, batch.starts, batch.lengths)
            ref = answers.total.detach() + torch.tensor([1.5, -2.0])
            (g,) = torch.autograd.grad(objective.loss(LossInputs(answers=answers, reference_total=ref)), weight)
        return g

    ga = grad(GradientAscent())
    assert ga.abs().max() > 0
    scale = ga.abs().max()
    # float32 rounding of (2/beta) * log sigmoid: ~1e-5 relative at beta = 1e-5
    assert (grad(NPO(beta=1e-5)) - ga).abs().max() < 1e-4 * scale
    assert (grad(NPO(beta=1.0)) - ga).abs().max() > 0.1 * scale


def test_simnpo_gradient():
    beta, gamma = 2.5, 0.3
    _, grad, total, mask = _grad_per_row(SimNPO(beta=beta, gamma=gamma))
    n = torch.tensor(LENGTHS, dtype=torch.float64)
    per_row = 2 / n * torch.sigmoid(beta / n * total + gamma) / 3
    assert torch.allclose(grad, per_row[:, None] * mask) and (grad[mask] > 0).all()


def test_cross_entropies_raise_their_answers():
    for objective in (EditCE(), RetainCE(), RandomMismatch()):
        loss, grad, total, mask = _grad_per_row(objective)
        n = torch.tensor(LENGTHS, dtype=torch.float64)
        assert loss.item() == pytest.approx((-total / n).mean().item())
        assert torch.allclose(grad, -(1 / n / 3)[:, None] * mask)  # < 0: descent raises them


def test_retain_kl_is_zero_with_zero_gradient_at_the_start_and_positive_after():
    reference = torch.randn(2, 3, 7, dtype=torch.float64).log_softmax(-1)
    logits = reference.clone().requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = RetainKL().loss(LossInputs(logits=logits, reference_logprobs=reference, mask=mask))
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and grad.abs().max() < 1e-12
    moved = (reference + torch.randn_like(reference)).requires_grad_(True)
    loss = RetainKL().loss(LossInputs(logits=moved, reference_logprobs=reference, mask=mask))
    p = reference.exp()
    expected = (p * (reference - moved.log_softmax(-1))).sum(-1)[mask].mean()  # KL(P_ref || P)
    assert loss.item() == pytest.approx(expected.item()) and loss.item() > 0


def test_random_mismatch_draws_other_answers_seeded():
    rows = [("a b", "x"), ("c d", "y"), ("e f", "z")] * 5
    pool = ["x", "y", "z", "u"]
    one = _draw(rows, pool, torch.Generator().manual_seed(3))
    two = _draw(rows, pool, torch.Generator().manual_seed(3))
    assert one == two
    assert all(new != old for (_, new), (_, old) in zip(one, rows, strict=True))
    assert len({a for _, a in one}) >= 3


# --- F-Learning ---------------------------------------------------------------------------------


def test_f_learning_is_one_circuit_edit_that_learns_the_new_answers(gpt2):
    facts = [FactPrompt(prompt="w1 w2 w3", target="w4", target_new="w40"), ("w5 w6", "w7", "w41 w42")]
    new = [("w1 w2 w3", "w40"), ("w5 w6", "w41 w42")]
    circuit = [Component("mlp", 0), Component("mlp", 1)]
    before = _snapshot(gpt2)
    cfg = FLearningConfig(
        old=FinetuneConfig((EditCE(),), lr=1e-2, steps=3),
        lam=1.0,
        learn=FinetuneConfig((EditCE(),), lr=3e-2, steps=60, edit_target=1.0, eval_every=2),
    )
    edit = f_learning(gpt2, circuit, edit=facts, config=cfg, progress=False)
    assert edit.kind == "f_learning" and not edit.is_applied
    assert set(edit.names) <= set(circuit_parameters(gpt2, circuit))
    runs = edit.params["runs"]
    assert runs["old"]["steps"] == 3 and runs["learn"]["checks"][-1]["edit_accuracy"] == 1.0
    assert edit.params["delta_norm"] > 0
    with edit.applied(gpt2):
        assert exact_match(gpt2, new) == 1.0
    assert all(bitwise_equal(p, before[n]) for n, p in hf_parameters(gpt2).items())


def test_f_learning_full_scope_trains_everything(gpt2):
    cfg = FLearningConfig(
        old=FinetuneConfig((EditCE(),), lr=1e-2, steps=2),
        learn=FinetuneConfig((EditCE(),), lr=1e-3, steps=2),
        learn_scope="full",
    )
    edit = f_learning(gpt2, [Component("mlp", 1)], edit=[("w1 w2", "w3", "w4")], config=cfg, progress=False)
    assert len(edit.names) > len(circuit_parameters(gpt2, [Component("mlp", 1)]))


# --- bad input ----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(gpt2, tmp_path):
    ok = FinetuneConfig({"npo": 1.0, "retain_ce": 1.0}, steps=1)
    run = lambda circuit=CIRCUIT, config=ok, **data: finetune(  # noqa: E731
        gpt2, circuit, config=config, progress=False, **{"forget": FORGET, "retain": RETAIN, **data}
    )
    other = mechedit.load(random_checkpoint(tmp_path / "other", "gpt2", n_layer=2, n_embd=64, n_head=4, seed=1))
    foreign = Circuit.of(other, CIRCUIT)
    with pytest.raises(ModelMismatchError, match="came from"):
        run(circuit=foreign)
    with pytest.raises(ValueError, match="empty"):
        run(circuit=Circuit(()))
    with pytest.raises(ValueError, match="no parameters of its own"):
        run(circuit=[Component("resid_pre", 0)])
    with pytest.raises(ValueError, match="also in the retain set"):
        run(retain=[*RETAIN, (FORGET[0][0], "w9")])
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError, match="finite number >= 0"):
            FinetuneConfig({"npo": bad})
    with pytest.raises(ValueError, match="unknown objectives"):
        FinetuneConfig({"dpo": 1.0})
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        NPO(beta=0.0)
    with pytest.raises(ValueError, match="at least one objective"):
        objectives_from({})
    with pytest.raises(ValueError, match="lr must be"):
        FinetuneConfig({"npo": 1.0}, lr=math.nan)
    with pytest.raises(ValueError, match=r"read \['general_text'\]"):
        run(config=FinetuneConfig({"npo": 1.0, "retain_kl": 1.0}, steps=1), retain=())
    with pytest.raises(ValueError, match="no objective reads them"):
        run(general_text=TEXT)
    with pytest.raises(ValueError, match="no target_new"):
        finetune(gpt2, CIRCUIT, edit=[FactPrompt(prompt="w1 w2", target="w3")], config=FinetuneConfig({"edit_ce": 1.0}), progress=False)
    gpt2.train()
    try:
        with pytest.raises(RuntimeError, match="evaluation mode"):
            run()
    finally:
        gpt2.eval()
    with pytest.raises(ValueError, match="old.objectives"):
        FLearningConfig(old=FinetuneConfig({"npo": 1.0}))
    with pytest.raises(ValueError, match="lam"):
        FLearningConfig(lam=-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a circuit made on this model passes the provenance check
        run(circuit=Circuit.of(gpt2, CIRCUIT))
