"""Per-row interventions: exact per-row patching, positions against real tokens, gradients."""

from __future__ import annotations

import pytest
import torch

from mechedit.circuit import Circuit
from mechedit.components import Component, hook_name
from mechedit.edit import ablate
from mechedit.interventions import Intervention, RealTokens, patch, real_tokens
from mechedit.tokens import tokenize_prompts

CLEAN = ["w1 w2 w3 w4 w5", "w9 w8 w7 w6 w5", "w3 w3 w4 w4 w5"]
CORRUPT = ["w11 w2 w3 w4 w5", "w9 w18 w7 w6 w5", "w3 w3 w14 w4 w5"]
RAGGED = ["w1 w2", "w3 w4 w5 w6 w7", "w8 w9 w10"]
SITES = [hook_name("neuron", 0), hook_name("head", 1), hook_name("resid_pre", 1)]


def _cache(model, tokens, names, **kwargs):
    store = {}

    def keep(name):
        def hook(activation, hook=None):
            store[name] = activation.detach().clone()

        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
        logits = model(tokens, **kwargs)
    return logits, store


@pytest.fixture(scope="module")
def pair(tiny_bridge):
    return tiny_bridge.to_tokens(CLEAN), tiny_bridge.to_tokens(CORRUPT)


# -- per-row patching is exact -------------------------------------------------------------------


@pytest.mark.parametrize("name", SITES)
def test_per_row_patch_equals_one_row_at_a_time(tiny_bridge, pair, name):
    clean, corrupt = pair
    _, cache = _cache(tiny_bridge, clean, [name])
    rows, positions = torch.arange(3), torch.tensor([1, 3, -1])  # a different cell per row
    with torch.no_grad(), patch(
        tiny_bridge,
        [Intervention(name, "replace", source=cache[name], rows=rows, positions=positions)],
    ):
        batched = tiny_bridge(corrupt)

    one_by_one = []
    for i in range(3):
        single = Intervention(name, "replace", source=cache[name], rows=i, positions=positions[i])
        with torch.no_grad(), patch(tiny_bridge, [single]):
            one_by_one.append(tiny_bridge(corrupt)[i])
    assert torch.equal(batched, torch.stack(one_by_one))

    def manual(activation, hook=None):
        activation = activation.clone()
        for i, p in enumerate([1, 3, 5]):
            activation[i, p] = cache[name][i, p]
        return activation

    with torch.no_grad():
        expected = tiny_bridge.run_with_hooks(corrupt, fwd_hooks=[(name, manual)])
        unpatched = tiny_bridge(corrupt)
    assert torch.equal(batched, expected)
    assert (batched - unpatched).abs().max() > 1e-4  # the patch did something


def test_index_form_and_mask_form_agree_on_heads(tiny_bridge, pair):
    clean, corrupt = pair
    name = hook_name("head", 0)
    _, cache = _cache(tiny_bridge, clean, [name])
    # rows 0 and 2, head 1 at position 2 and head 3 at position 4
    rows = torch.tensor([[0], [2]])
    positions, heads = torch.tensor([2, 4]), torch.tensor([1, 3])
    mask = torch.zeros(3, 6, tiny_bridge.cfg.n_heads, dtype=torch.bool)
    mask[rows, positions, heads] = True
    by_index = Intervention(name, "replace", source=cache[name], rows=rows, positions=positions, units=heads)
    by_mask = Intervention(name, "replace", source=cache[name], mask=mask)
    with torch.no_grad():
        _, z = _cache(tiny_bridge, corrupt, [name])
    edited = by_index.apply_to(z[name])
    assert torch.equal(edited, by_mask.apply_to(z[name]))
    changed = (edited != z[name]).any(-1)  # [batch, pos, head]
    assert torch.equal(changed, mask & (cache[name] != z[name]).any(-1))
    assert changed.sum() >= 2


def test_add_scale_and_sources_of_each_shape(tiny_bridge, pair):
    _, corrupt = pair
    name = hook_name("neuron", 1)
    _, z = _cache(tiny_bridge, corrupt, [name])
    a = z[name]  # [3, 6, 256]
    noise = torch.randn(256)
    added = Intervention(name, "add", source=noise, source_shape="token", positions=2).apply_to(a)
    assert torch.equal(added[:, 2], a[:, 2] + noise)
    assert torch.equal(added[:, [0, 1, 3, 4, 5]], a[:, [0, 1, 3, 4, 5]])
    alpha = torch.tensor([0.0, 0.5, 2.0])
    scaled = Intervention(name, "scale", source=alpha, source_shape="row", units=[7, 9]).apply_to(a)
    assert torch.equal(scaled[..., [7, 9]], a[..., [7, 9]] * alpha[:, None, None])
    per_pos = torch.arange(6.0)[:, None].expand(6, 256)
    placed = Intervention(name, "replace", source=per_pos, source_shape="position", units=0).apply_to(a)
    assert torch.equal(placed[..., 0], torch.arange(6.0).expand(3, 6))
    zeroed = Intervention(name, "zero", rows=1).apply_to(a)
    assert torch.all(zeroed[1] == 0) and torch.equal(zeroed[[0, 2]], a[[0, 2]])


# -- positions count each row's real tokens --------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_position_is_each_rows_last_real_token(tiny_bridge, side):
    batch = tokenize_prompts(tiny_bridge, RAGGED, padding_side=side)
    last = batch.last_positions
    first = batch.attention_mask.int().argmax(1)
    name = hook_name("neuron", 0)
    for positions, where in ((-1, last), (0, first), (1, first + 1)):
        iv = Intervention(name, "zero", positions=positions)
        _, before = _cache(tiny_bridge, batch.tokens, [name], attention_mask=batch.attention_mask)
        edited = iv.apply_to(before[name], batch)
        expected = before[name].clone()
        expected[torch.arange(3), where] = 0.0
        assert torch.equal(edited, expected), (side, positions)
    # "every position" means every real token: pads are left alone
    every = Intervention(name, "zero").apply_to(before[name], batch.attention_mask)
    assert torch.equal(every == 0, batch.attention_mask[:, :, None].expand_as(every) | (before[name] == 0))


@pytest.mark.parametrize("side", ["right", "left"])
def test_activation_edit_pos_minus_one_matches_unpadded_runs(tiny_bridge, side):
    batch = tokenize_prompts(tiny_bridge, RAGGED, padding_side=side)
    circuit = Circuit(tuple(Component("neuron", 1, neuron=j, pos=-1) for j in range(0, 256, 2)))
    edit = ablate(tiny_bridge, circuit)
    with torch.no_grad():
        with edit.applied(tiny_bridge, attention_mask=batch):
            padded = tiny_bridge(batch.tokens, attention_mask=batch.attention_mask)
        with edit.applied(tiny_bridge):
            with real_tokens(batch):  # the per-batch form used across many batches
                padded_again = tiny_bridge(batch.tokens, attention_mask=batch.attention_mask)
            singles = [tiny_bridge(tiny_bridge.to_tokens(p))[0, -1] for p in RAGGED]
        unedited = tiny_bridge(batch.tokens, attention_mask=batch.attention_mask)
    rows = torch.arange(3)
    at_last = padded[rows, batch.last_positions]
    assert torch.equal(padded, padded_again)
    assert torch.allclose(at_last, torch.stack(singles), atol=1e-5)
    assert (at_last - unedited[rows, batch.last_positions]).abs().max() > 1e-3


def test_position_outside_a_row_names_the_row(tiny_bridge):
    batch = tokenize_prompts(tiny_bridge, RAGGED)
    a = torch.zeros(3, batch.tokens.shape[1], 8)
    with pytest.raises(ValueError, match=r"positions \[3\] out of range for row 0, which has 3 real tokens"):
        Intervention("blocks.0.mlp.hook_post", "zero", positions=3).apply_to(a, batch)
    with pytest.raises(ValueError, match=r"attention mask is \(3, 6\) but .* sees"):
        Intervention("blocks.0.mlp.hook_post", "zero", positions=0).apply_to(torch.zeros(2, 6, 8), batch)
    with pytest.raises(ValueError, match="gaps"):
        RealTokens.of(torch.tensor([[True, False, True]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"op": "swap"}, "op 'swap' is not known"),
        ({"op": "zero", "source": 1.0}, "takes no source"),
        ({"op": "add"}, "needs source="),
        ({"op": "zero", "rows": [-1]}, "rows must be >= 0"),
        ({"op": "zero", "positions": [0.5]}, "positions must be ints"),
        ({"op": "zero", "rows": [0, 1], "positions": [0, 1, 2]}, "must broadcast together"),
        ({"op": "zero", "rows": 0, "mask": torch.ones(1, 1, dtype=torch.bool)}, "either mask="),
    ],
)
def test_bad_interventions_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Intervention("blocks.0.mlp.hook_post", **kwargs)


def test_wrong_source_shapes_say_what_is_expected():
    a = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match=r"must have the activation's shape \[2, 4, 8\]"):
        Intervention("h", "replace", source=torch.zeros(8)).apply_to(a)
    with pytest.raises(ValueError, match=r"must be \[batch\] = \[2\] or \[2, 8\]"):
        Intervention("h", "scale", source=torch.zeros(3), source_shape="row").apply_to(a)
    with pytest.raises(ValueError, match="units \\[8\\] out of range"):
        Intervention("h", "zero", units=8).apply_to(a)


def test_patch_refuses_unknown_hooks_and_leaves_no_hooks(tiny_bridge, pair):
    with pytest.raises(ValueError, match="not in this model's hook_dict"):
        with patch(tiny_bridge, [Intervention("blocks.0.mlp.hook_postt", "zero")]):
            pass
    points = {id(p): p for p in tiny_bridge.hook_dict.values()}
    assert sum(len(p.fwd_hooks) for p in points.values()) == 0


# -- gradients -----------------------------------------------------------------------------------


def test_per_row_alpha_scaling_gives_each_rows_gradient(tiny_bridge, pair):
    _, corrupt = pair
    name = hook_name("neuron", 0)
    answer = 5

    def metric(alpha):
        with patch(tiny_bridge, [Intervention(name, "scale", source=alpha, source_shape="row", positions=-1)]):
            logits = tiny_bridge(corrupt)
        return logits[:, -1, answer]  # [batch]: one output per row

    alpha = torch.tensor([0.25, 0.5, 1.0], requires_grad=True)
    out = metric(alpha)
    (grad_row0,) = torch.autograd.grad(out[0], alpha, retain_graph=True)
    assert grad_row0[0] != 0 and torch.all(grad_row0[1:] == 0)  # rows do not mix
    (grad,) = torch.autograd.grad(out.sum(), alpha)
    eps = 1e-2
    with torch.no_grad():
        bumps = torch.eye(3) * eps
        central = torch.stack(
            [(metric(alpha + bumps[i]) - metric(alpha - bumps[i]))[i] / (2 * eps) for i in range(3)]
        )
    assert torch.allclose(grad, central, rtol=2e-2, atol=1e-4)


def test_replacing_with_a_fresh_leaf_gives_integrated_gradients_inputs(tiny_bridge, pair):
    clean, _ = pair
    name = hook_name("neuron", 1)
    _, cache = _cache(tiny_bridge, clean[:1], [name])
    steps = torch.linspace(0, 1, 5)
    baseline = cache[name][0, -1]  # [d_mlp]
    leaf = (steps[:, None] * baseline).requires_grad_()  # [steps, d_mlp]
    tokens = clean[:1].expand(5, -1)
    with patch(tiny_bridge, [Intervention(name, "replace", source=leaf, source_shape="row", positions=-1)]):
        logits = tiny_bridge(tokens)
    (grad,) = torch.autograd.grad(logits[:, -1, 3].sum(), leaf)
    assert grad.shape == (5, 256) and grad.abs().sum() > 0
    assert torch.allclose(logits[-1], tiny_bridge(clean[:1])[0].detach(), atol=1e-5)  # α = 1: unchanged
