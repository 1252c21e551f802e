"""Rank-one edits (ROME, AlphaEdit's projection) on tiny random GPT-2 / GPT-NeoX / Llama models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mechedit
from mechedit.artifacts import ModelMismatchError
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.edit import WeightEdit
from mechedit.edit.export import export_hf
from mechedit.edit.rank_one import (
    RankOneConfig,
    collect_keys,
    compute_key,
    compute_keys,
    compute_value,
    key_covariance,
    located_layer,
    mlp_out_weight,
    null_space_basis,
    rank_one_delta,
    rank_one_edit,
)
from mechedit.edit.weights import bitwise_equal
from mechedit.hf import hf_model, hf_parameters
from mechedit.locate import causal_tracing
from mechedit.metrics import score_continuations
from mechedit.prompts import FactPrompt
from mechedit.zoo.random_model import random_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("gpt2", "neox", "llama")
# The MLP output projection of layer 0, written out by hand (not read from mechedit.hf), and
# whether HF stores it [d_mlp, d_model] (GPT-2's Conv1D) rather than nn.Linear's [d_model, d_mlp].
OUT_PROJ = {
    "gpt2": ("transformer.h.{}.mlp.c_proj.weight", True),
    "neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h.weight", False),
    "llama": ("model.layers.{}.mlp.down_proj.weight", False),
}
TEXTS = [" ".join(f"w{(7 * i + 3 * j) % 59}" for j in range(8)) for i in range(24)]
FACT = FactPrompt(prompt="w1 w2 w3 w4 w5", subject="w2 w3", target="w6", target_new="w9")


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory):
    folder = random_checkpoint(
        tmp_path_factory.mktemp(request.param), request.param, n_layer=3, n_embd=64, n_head=4
    )
    return request.param, mechedit.load(str(folder))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return mechedit.load(
        str(random_checkpoint(tmp_path_factory.mktemp("g"), "gpt2", n_layer=3, n_embd=64, n_head=4))
    )


def _snapshot(model):
    return {n: p.detach().clone() for n, p in hf_parameters(model).items()}


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


def _owner(model, param):
    return next(m for m in hf_model(model).modules() if getattr(m, "weight", None) is param)


def test_hook_post_is_exactly_the_input_of_the_edited_weight(arch_model):
    """``blocks.L.mlp.hook_post`` is what the HF output projection reads, on every architecture."""
    arch, model = arch_model
    layer = 1
    name, weight, bias = mlp_out_weight(model, layer)
    assert name == OUT_PROJ[arch][0].format(layer)
    got = {}
    module = _owner(model, hf_parameters(model)[name])
    handle = module.register_forward_pre_hook(
        lambda mod, args: got.__setitem__("hf_input", args[0].detach())
    )
    try:
        with model.hooks(
            fwd_hooks=[
                (
                    f"blocks.{layer}.mlp.hook_post",
                    lambda a, hook=None: got.__setitem__("post", a.detach()),
                )
            ]
        ):
            model(model.to_tokens(TEXTS[:3]))
    finally:
        handle.remove()
    assert got["post"].shape[-1] == weight.shape[1]
    torch.testing.assert_close(
        got["post"], got["hf_input"].reshape(got["post"].shape), rtol=0, atol=0
    )


def test_edit_equals_rome_closed_form_written_here(arch_model):
    """Given k*, v*, C: W' = W + (v* - W k* - b) (C^-1 k*)^T / (k*^T C^-1 k*) in HF storage."""
    arch, model = arch_model
    layer = 1
    hf_name, stored_transposed = OUT_PROJ[arch]
    hf_name = hf_name.format(layer)
    param = hf_parameters(model)[hf_name]
    w = (param.detach().T if stored_transposed else param.detach()).double()  # [d_model, d_mlp]
    d_model, d_mlp = w.shape
    bias = dict(hf_parameters(model)).get(hf_name.replace("weight", "bias"))
    b = torch.zeros(d_model, dtype=torch.float64) if bias is None else bias.detach().double()
    g = torch.Generator().manual_seed(1)
    k = torch.rand(d_mlp, generator=g, dtype=torch.float64)
    v = torch.randn(d_model, generator=g, dtype=torch.float64)
    c = _spd(d_mlp, 2)

    cinv_k = torch.linalg.inv(c) @ k
    expected = w + torch.outer((v - w @ k - b) / (cinv_k @ k), cinv_k)
    expected_hf = (expected.T if stored_transposed else expected).float()

    edit = rank_one_edit(
        model, [FACT], layer=layer, key=k, value=v, covariance=c, config=RankOneConfig(cov_ridge=0)
    )
    assert edit.names == (hf_name,)
    assert (edit.new_tensors[hf_name] - expected_hf).abs().max() <= 1e-5
    new_w = edit.new_tensors[hf_name].double()
    new_w = new_w.T if stored_transposed else new_w
    assert (new_w @ k + b - v).abs().max() <= 1e-4  # W' k* + b = v*
    assert edit.params["edits"][0]["key_norm"] == pytest.approx(float(k.norm()))
    assert edit.params["edits"][0]["value_norm"] == pytest.approx(float(v.norm()))


def test_computed_keys_values_and_covariance_give_the_same_edit(gpt2):
    """rank_one_edit's own k*, δ and C equal the public pieces, composed by rank_one_delta."""
    cfg = RankOneConfig(v_steps=3, n_prefixes=2)
    prefixes = ["w40 w41 w42", "w50 w51"]
    edit = rank_one_edit(gpt2, [FACT], layer=0, texts=TEXTS, prefixes=prefixes, config=cfg)
    k = compute_key(gpt2, 0, [FACT], prefixes=prefixes)
    fit = compute_value(gpt2, 0, [FACT], prefixes=prefixes, config=cfg)
    c = key_covariance(gpt2, 0, TEXTS)
    name, w, _ = mlp_out_weight(gpt2, 0)
    expected = w.double() + rank_one_delta(k, fit.delta, c, ridge=cfg.cov_ridge)
    assert (edit.new_tensors[name].double().T - expected).abs().max() <= 1e-5
    assert torch.allclose(compute_keys(gpt2, 0, [FACT], prefixes=prefixes).mean(0), k)
    assert edit.params["edits"][0]["n_contexts"] == 3
    assert edit.params["edits"][0]["delta_norm"] == pytest.approx(float(fit.delta.norm()), rel=1e-6)


def test_alphaedit_leaves_preserved_keys_outputs_unchanged(arch_model):
    """Preserved texts' MLP outputs at the edited layer move by <= 1e-5; the new key still gets v*."""
    arch, model = arch_model
    layer = 1
    preserved = TEXTS[:12]
    k0 = collect_keys(model, layer, preserved)
    assert k0.shape[0] < k0.shape[1]  # fewer keys than dimensions: an exact null space exists
    name, w, b = mlp_out_weight(model, layer)
    b = torch.zeros(w.shape[0]) if b is None else b
    k = compute_key(model, layer, [FACT])
    v = (w.double() @ k + b.double()) + torch.randn(
        w.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    cfg = RankOneConfig(null_space_tol=1e-9)
    edit = rank_one_edit(
        model, [FACT], layer=layer, texts=TEXTS, key=k, value=v, preserve=preserved, config=cfg
    )
    plain = rank_one_edit(model, [FACT], layer=layer, texts=TEXTS, key=k, value=v, config=cfg)

    def outputs():
        got = []
        with model.hooks(
            fwd_hooks=[
                (
                    f"blocks.{layer}.hook_mlp_out",
                    lambda a, hook=None: got.append(a.detach().clone()),
                )
            ]
        ):
            model(model.to_tokens(preserved))
        return got[0][:, 1:] if model.cfg.default_prepend_bos else got[0]

    before = outputs()
    with edit.applied(model):
        after = outputs()
    with plain.applied(model):
        after_plain = outputs()
    assert (after - before).abs().max() <= 1e-5
    assert (after_plain - before).abs().max() > 1e-3  # without the projection they do move
    new_w = edit.new_tensors[name].double()
    new_w = new_w.T if OUT_PROJ[arch][1] else new_w
    assert (new_w @ k + b.double() - v).abs().max() <= 1e-4
    assert edit.params["alphaedit"]["n_preserved"] == k0.shape[0]


def test_null_space_basis_and_least_squares_mode():
    g = torch.Generator().manual_seed(0)
    k0 = torch.randn(5, 16, generator=g, dtype=torch.float64)
    basis = null_space_basis(k0, tol=1e-9)
    assert basis.shape == (16, 11)
    assert (k0 @ basis).abs().max() < 1e-10
    with pytest.raises(ValueError, match="no null space"):
        null_space_basis(torch.randn(40, 16, generator=g, dtype=torch.float64), tol=1e-9)
    # contexts mode: u = (nλC + K^T K)^-1 K^T 1, the minimiser of mean (u.k_i - 1)^2 + λ u^T C u
    keys = torch.randn(6, 16, generator=g, dtype=torch.float64)
    c, r = _spd(16, 4), torch.randn(8, generator=g, dtype=torch.float64)
    delta_w = rank_one_delta(keys, r, c, cov_weight=0.3)
    u = delta_w.T @ r / (r @ r)
    chol = torch.linalg.cholesky(6 * 0.3 * c)
    design = torch.cat([keys, chol.T])  # stacked least squares: [K; sqrt(λC)] u ≈ [1; 0]
    target = torch.cat([torch.ones(6, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)])
    assert torch.allclose(u, torch.linalg.lstsq(design, target[:, None]).solution[:, 0], atol=1e-10)


def test_revert_is_exact_only_one_matrix_changes_save_load_export(gpt2, tmp_path):
    before = _snapshot(gpt2)
    edit = rank_one_edit(
        gpt2, [FACT], layer=1, texts=TEXTS, config=RankOneConfig(v_steps=2, n_prefixes=1)
    )
    assert all(
        bitwise_equal(p.detach(), before[n]) for n, p in hf_parameters(gpt2).items()
    )  # not applied
    edit.apply(gpt2)
    changed = [
        n for n, p in hf_parameters(gpt2).items() if not bitwise_equal(p.detach(), before[n])
    ]
    assert changed == ["transformer.h.1.mlp.c_proj.weight"]
    diff = hf_parameters(gpt2)[changed[0]].detach().double() - before[changed[0]].double()
    assert torch.linalg.matrix_rank(diff, rtol=1e-6) == 1
    edit.revert(gpt2)
    assert all(bitwise_equal(p.detach(), before[n]) for n, p in hf_parameters(gpt2).items())

    loaded = WeightEdit.load(edit.save(tmp_path / "edit"))
    assert loaded.kind == "rank_one" and loaded.params["layer"] == 1
    assert bitwise_equal(loaded.new_tensors[changed[0]], edit.new_tensors[changed[0]])
    out = export_hf(gpt2, tmp_path / "hf", edit=loaded)
    exported = load_file(str(out / "model.safetensors"))
    assert bitwise_equal(exported[changed[0]], edit.new_tensors[changed[0]])


def test_multi_token_new_answer_is_teacher_forced(gpt2):
    """A two-token new answer: its teacher-forced log-probability rises with the edit."""
    fact = FactPrompt(prompt=FACT.prompt, subject=FACT.subject, target="w6", target_new="w9 w10")
    cfg = RankOneConfig(
        fact_token="last", clamp_norm_factor=50.0, weight_decay=0.0, v_steps=15, kl_factor=0.0
    )
    edit = rank_one_edit(gpt2, [fact], layer=0, texts=TEXTS, config=cfg)
    record = edit.params["edits"][0]
    assert record["loss_after"] < record["loss_before"] - 0.5

    def logprob():
        return float(score_continuations(gpt2, [fact.prompt], ["w9 w10"]).total.sum())

    before = logprob()
    with edit.applied(gpt2):
        after = logprob()
    assert after > before + 1.0


def test_layer_from_a_causal_tracing_circuit(gpt2):
    facts = [
        FactPrompt(prompt=f"w{i} w{i + 1} w3 w4", subject=f"w{i} w{i + 1}", target="w5")
        for i in (10, 20)
    ]
    circuit = causal_tracing(
        gpt2, facts, kinds=("mlp",), n_noise=2, window=1, progress=False
    ).mlp.top_k(1)
    (component,) = circuit
    assert located_layer(gpt2, circuit) == component.layer
    cfg = RankOneConfig(v_steps=1, n_prefixes=0)
    layer = component.layer if component.layer < 2 else 0
    edit = rank_one_edit(
        gpt2, [FACT], layer=Circuit.of(gpt2, [Component("mlp", layer)]), texts=TEXTS, config=cfg
    )
    assert edit.params["layer"] == layer


def test_bad_inputs(gpt2, tmp_path):
    cfg = RankOneConfig(v_steps=1, n_prefixes=0)
    other = mechedit.load(
        str(random_checkpoint(tmp_path / "other", "gpt2", n_layer=3, n_embd=64, n_head=4, seed=5))
    )
    with pytest.raises(ModelMismatchError):
        rank_one_edit(
            gpt2, [FACT], layer=Circuit.of(other, [Component("mlp", 0)]), texts=TEXTS, config=cfg
        )
    with pytest.raises(ValueError, match="empty"):
        rank_one_edit(gpt2, [FACT], layer=Circuit(()), texts=TEXTS, config=cfg)
    two = Circuit(
        (
            Component("neuron", 0, neuron=3),
            Component("neuron", 1, neuron=4),
            Component("neuron", 1, neuron=5),
        )
    )
    with pytest.raises(ValueError, match="layer_rule"):
        located_layer(gpt2, two)
    assert (
        located_layer(gpt2, two, rule="most") == 1 and located_layer(gpt2, two, rule="first") == 0
    )
    with pytest.raises(ValueError, match="out of range"):
        rank_one_edit(gpt2, [FACT], layer=3, texts=TEXTS, config=cfg)
    with pytest.raises(ValueError, match="model's last"):
        rank_one_edit(gpt2, [FACT], layer=2, texts=TEXTS, config=cfg)
    with pytest.raises(ValueError, match="target_new"):
        rank_one_edit(
            gpt2, [FactPrompt(prompt="w1 w2 w3", subject="w2", target="w4")], layer=0, texts=TEXTS
        )
    with pytest.raises(ValueError, match="texts="):
        rank_one_edit(gpt2, [FACT], layer=0, config=cfg)
    with pytest.raises(ValueError, match="both key and value"):
        rank_one_edit(gpt2, [FACT], layer=0, texts=TEXTS, key=torch.zeros(256))
    with pytest.raises(ValueError, match="fact_token"):
        RankOneConfig(fact_token="first")
    gpt2.train()
    try:
        with pytest.raises(RuntimeError, match="evaluation mode"):
            rank_one_edit(gpt2, [FACT], layer=0, texts=TEXTS, config=cfg)
    finally:
        gpt2.eval()
