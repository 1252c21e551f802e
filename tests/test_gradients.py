"""Gradient capture against central finite differences at every site, in float64.

Each check compares d metric / d activation from ``activations_and_gradients`` with
``(f(a + eps e_i) - f(a - eps e_i)) / 2 eps``, where the nudge is made by a forward hook at the
same hook point. All nudged copies run as one batch (one row per nudge), so checking every site
of a model costs a few small forwards.
"""

from __future__ import annotations

import pytest
import torch

import mechedit
from mechedit import components as comp
from mechedit.gradients import (
    activations_and_gradients,
    capture_activations,
    parameter_gradients,
)
from mechedit.zoo.random_model import random_checkpoint

# Two prompts of equal length, so no padding is involved and rows are independent.
PROMPTS = ["w1 w2 w3 w4 w5", "w9 w8 w7 w6 w5"]
# (eps, rtol): Llama's HF attention softmaxes in float32 even in a float64 model, so a tiny eps
# measures rounding noise; 1e-3 keeps the truncation error below the tolerance (DESIGN.md).
FD = {"gpt2": (1e-5, 1e-5), "neox": (1e-5, 1e-5), "llama": (1e-3, 2e-3)}
# Llama's queries and keys reach the metric only through that float32 softmax and have small
# gradients, so at eps=1e-3 rounding dominates (measured: 0.9% of the largest gradient); at 1e-2
# it is 0.07%, while the residual sites at 1e-2 show truncation error (0.5%): eps per site.
EPS_OVERRIDES = {"llama": {"attn.hook_q": 1e-2, "attn.hook_k": 1e-2}}


def _load(tmp_path_factory, arch: str, dtype=torch.float64):
    folder = random_checkpoint(tmp_path_factory.mktemp(arch), arch, n_layer=2, n_embd=32, n_head=4)
    return mechedit.load(folder, dtype=dtype)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {arch: _load(tmp_path_factory, arch) for arch in FD}


def _tokens(model):
    return model.to_tokens(PROMPTS)


def _weights(model, tokens):
    generator = torch.Generator().manual_seed(1)
    shape = (tokens.shape[1], model.cfg.d_vocab)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _row_metric(weights):
    """Per-row metric: a fixed random projection of the log-probabilities (nonlinear in logits)."""

    def metric(logits):
        return (logits.log_softmax(-1) * weights).sum((1, 2))

    return metric


def _finite_differences(model, tokens, name, grad, row_metric, eps, n_random=3):
    """FD at the largest-gradient entry and ``n_random`` seeded entries; returns (fd, analytic)."""
    generator = torch.Generator().manual_seed(0)
    flat = [int(grad.abs().argmax())] + torch.randint(0, grad.numel(), (n_random,), generator=generator).tolist()
    index = torch.stack(torch.unravel_index(torch.tensor(flat), grad.shape), dim=1)  # [k, ndim]
    batch_rows = index[:, 0].repeat_interleave(2)  # each entry nudged up then down, one row each
    rest = index[:, 1:].repeat_interleave(2, dim=0)
    delta = torch.tensor([eps, -eps], dtype=torch.float64).repeat(len(flat))

    def nudge(activation, hook):  # noqa: ARG001 - TL hook signature
        activation = activation.clone()
        activation[(torch.arange(len(batch_rows)), *rest.T)] += delta.to(activation.dtype)
        return activation

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, nudge)]):
        values = row_metric(model(tokens[batch_rows]))
    numeric = (values[0::2] - values[1::2]) / (2 * eps)
    return numeric, grad.reshape(-1)[torch.tensor(flat)]


def _site_hooks(model):
    hooks = []
    for site in comp.available_sites(model):
        spec = comp.SITES[site]
        if spec.hook is None:
            continue
        layers = range(model.cfg.n_layers) if spec.per_layer else [0]
        hooks += [comp.hook_name(site, layer) for layer in layers]
    return list(dict.fromkeys(hooks))


@pytest.mark.parametrize("arch", list(FD))
def test_gradients_match_finite_differences_at_every_site(models, arch):
    model = models[arch]
    tokens = _tokens(model)
    row_metric = _row_metric(_weights(model, tokens))
    eps, rtol = FD[arch]
    names = _site_hooks(model)
    # every site of the table this architecture has, in one capture
    assert {"hook_embed", "blocks.1.attn.hook_z", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_k"} <= set(names)
    cap = activations_and_gradients(model, tokens, names, lambda logits: row_metric(logits).sum())
    assert cap.value == pytest.approx(row_metric(model(tokens)).sum().item(), rel=1e-12)
    for name in names:
        grad = cap.gradients[name]
        assert grad.shape == cap.activations[name].shape
        assert grad.abs().max() > 0, name
        site_eps = next((e for k, e in EPS_OVERRIDES.get(arch, {}).items() if name.endswith(k)), eps)
        numeric, analytic = _finite_differences(model, tokens, name, grad, row_metric, site_eps)
        torch.testing.assert_close(
            numeric, analytic, rtol=rtol, atol=rtol * float(grad.abs().max()), msg=lambda m, n=name: f"{n}: {m}"
        )


def test_captured_activations_are_the_forward_ones_and_cost_no_parameter_gradients(models):
    model = models["gpt2"]
    tokens = _tokens(model)
    names = ["blocks.0.attn.hook_z", "blocks.1.mlp.hook_post", "blocks.1.attn.hook_pattern"]
    flags = [p.requires_grad for p in model.parameters()]
    cap = activations_and_gradients(model, tokens, names, lambda logits: logits[:, -1].logsumexp(-1).sum())
    clean = capture_activations(model, tokens, names)
    for name in names:
        assert torch.equal(cap.activations[name], clean.activations[name])
        assert not clean.activations[name].requires_grad
    assert torch.equal(clean.logits, model(tokens).detach())
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_forward_only_capture_runs_without_autograd(models):
    model = models["llama"]
    tokens = _tokens(model)
    with torch.inference_mode():
        clean = capture_activations(model, tokens, ["blocks.0.attn.hook_v", "hook_embed"])
    assert clean.activations["blocks.0.attn.hook_v"].shape == (2, tokens.shape[1], 4, 8)
    # Llama embeds tokens without positions: hook_embed is the embedding table's rows
    table = model.original_model.model.embed_tokens.weight
    assert torch.equal(clean.activations["hook_embed"], table[tokens])


def test_frozen_parameters_still_give_activation_gradients(tmp_path_factory, models):
    model = models["gpt2"]
    tokens = _tokens(model)
    names = ["hook_embed", "blocks.1.attn.hook_q"]

    def metric(logits):
        return logits[:, -1, 5].sum()

    reference = activations_and_gradients(model, tokens, names, metric)
    frozen = _load(tmp_path_factory, "gpt2").requires_grad_(False)
    cap = activations_and_gradients(frozen, tokens, names, metric)
    for name in names:
        torch.testing.assert_close(cap.gradients[name], reference.gradients[name], rtol=1e-10, atol=1e-12)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_gradients_work_under_no_grad(models):
    model = models["neox"]
    tokens = _tokens(model)
    with torch.no_grad():
        cap = activations_and_gradients(model, tokens, ["blocks.0.hook_resid_post"], lambda lg: lg.sum())
    assert cap.gradients["blocks.0.hook_resid_post"].abs().sum() > 0


def _param_fd(model, tokens, name, grad, row_metric, eps):
    param = mechedit.hf.hf_parameter(model, name)
    flat = [int(grad.abs().argmax()), 0, grad.numel() // 2]
    numeric = []
    for i in flat:
        values = []
        for d in (eps, -eps):
            with torch.no_grad():
                original = param.view(-1)[i].item()
                param.view(-1)[i] = original + d
                values.append(row_metric(model(tokens)).sum().item())
                param.view(-1)[i] = original
        numeric.append((values[0] - values[1]) / (2 * eps))
    return torch.tensor(numeric, dtype=torch.float64), grad.reshape(-1)[torch.tensor(flat)]


@pytest.mark.parametrize(
    ("arch", "names"),
    [
        ("gpt2", ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.bias", "transformer.ln_f.weight"]),
        ("llama", ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]),
    ],
)
def test_parameter_gradients_match_finite_differences(models, arch, names):
    model = models[arch]
    tokens = _tokens(model)
    row_metric = _row_metric(_weights(model, tokens))
    eps, rtol = FD[arch]
    grads = parameter_gradients(model, tokens, names, lambda logits: row_metric(logits).sum())
    assert grads.value == pytest.approx(row_metric(model(tokens)).sum().item(), rel=1e-12)
    assert all(p.grad is None for p in model.parameters())
    for name in names:
        grad = grads.gradients[name]
        assert grad.shape == mechedit.hf.hf_parameter(model, name).shape  # HF layout (Conv1D: [in, out])
        # q_proj reaches the metric only through the float32 softmax (see EPS_OVERRIDES)
        site_eps = 1e-2 if arch == "llama" and "q_proj" in name else eps
        numeric, analytic = _param_fd(model, tokens, name, grad, row_metric, site_eps)
        torch.testing.assert_close(numeric, analytic, rtol=rtol, atol=rtol * float(grad.abs().max()))


def test_parameter_gradients_of_tied_and_frozen_parameters(tmp_path_factory, models):
    model = models["gpt2"]
    tokens = _tokens(model)

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 7].sum()

    both = parameter_gradients(model, tokens, ["lm_head.weight", "transformer.wte.weight"], metric)
    # GPT-2 ties the unembedding to the token embedding: one tensor, one gradient (both uses)
    assert torch.equal(both.gradients["lm_head.weight"], both.gradients["transformer.wte.weight"])
    frozen = _load(tmp_path_factory, "gpt2").requires_grad_(False)
    again = parameter_gradients(frozen, tokens, ["transformer.wte.weight"], metric)
    torch.testing.assert_close(again.gradients["transformer.wte.weight"], both.gradients["transformer.wte.weight"])
    assert not any(p.requires_grad for p in frozen.parameters())  # flags restored


def test_parameter_gradients_refuse_unknown_and_shadowed_names(models, tmp_path):
    tokens = _tokens(models["gpt2"])
    with pytest.raises(ValueError, match=r"not in this model.*closest: transformer\.h\.0\.mlp\.c_fc\.weight"):
        parameter_gradients(models["gpt2"], tokens, ["transformer.h.0.mlp.c_fc.weigth"], lambda lg: lg.sum())
    # mechedit.load binds GPT-NeoX's q/k/v to the fused HF tensor, so its gradient arrives ...
    neox, qkv = models["neox"], "gpt_neox.layers.0.attention.query_key_value.weight"
    grad = parameter_gradients(neox, _tokens(neox), [qkv], lambda lg: lg.sum()).gradients[qkv]
    assert grad.abs().max().item() > 0
    # ... while a bridge booted directly computes with private copies: refused, not silently zero
    from transformer_lens.model_bridge import TransformerBridge

    folder = random_checkpoint(tmp_path / "neox", "neox", n_layer=2, n_embd=32, n_head=4)
    raw = TransformerBridge.boot_transformers(str(folder), dtype=torch.float64).eval()
    with pytest.raises(ValueError, match="computes with its own copies"):
        parameter_gradients(raw, _tokens(raw), [qkv], lambda lg: lg.sum())


def test_train_mode_and_inference_mode_are_refused_with_the_fix(models):
    model = models["gpt2"]
    tokens = _tokens(model)
    names = ["blocks.0.mlp.hook_post"]
    model.train()
    try:
        for call in (
            lambda: activations_and_gradients(model, tokens, names, lambda lg: lg.sum()),
            lambda: capture_activations(model, tokens, names),
            lambda: parameter_gradients(model, tokens, ["transformer.ln_f.bias"], lambda lg: lg.sum()),
        ):
            with pytest.raises(RuntimeError, match=r"training mode: model.*Call model\.eval\(\)"):
                call()
    finally:
        model.eval()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside the inference_mode block"):
        activations_and_gradients(model, tokens, names, lambda lg: lg.sum())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        parameter_gradients(model, tokens, ["transformer.ln_f.bias"], lambda lg: lg.sum())


def test_bad_metrics_and_hooks_are_named(models):
    model = models["gpt2"]
    tokens = _tokens(model)
    with pytest.raises(ValueError, match=r"scalar tensor \(0-d\), got \(2, 6, 64\)"):
        activations_and_gradients(model, tokens, ["hook_embed"], lambda lg: lg.log_softmax(-1))
    with pytest.raises(ValueError, match="does not depend on the logits"):
        activations_and_gradients(model, tokens, ["hook_embed"], lambda lg: torch.tensor(lg.sum().item()))
    with pytest.raises(ValueError, match=r"'embed\.hook_in' holds torch\.int64 values \(token ids\?\)"):
        activations_and_gradients(model, tokens, ["embed.hook_in"], lambda lg: lg.sum())
    with pytest.raises(ValueError, match=r"closest: blocks\.0\.attn\.hook_z"):
        activations_and_gradients(model, tokens, ["blocks.0.attn.hook_zz"], lambda lg: lg.sum())
    neox = models["neox"]
    with pytest.raises(ValueError, match="computes attention and MLP in parallel"):
        activations_and_gradients(neox, _tokens(neox), ["blocks.0.hook_resid_mid"], lambda lg: lg.sum())
    llama = models["llama"]
    with pytest.raises(RuntimeError, match=r"did not fire.*rotary"):
        capture_activations(llama, _tokens(llama), ["hook_pos_embed"])


def test_a_gradient_that_comes_back_none_names_the_hook(tmp_path_factory):
    # BERT's bridge reads the attention pattern back after the HF module used it: no gradient.
    bert = _load(tmp_path_factory, "bert", dtype=torch.float32)
    tokens = bert.to_tokens("w1 w2 w3")
    with pytest.raises(RuntimeError, match=r"gradient at \['blocks\.0\.attn\.hook_pattern'\] came back None"):
        activations_and_gradients(bert, tokens, ["blocks.0.attn.hook_pattern"], lambda lg: lg.sum())
