"""circuit_parameters: the HF parameter entries a circuit covers, on GPT-2, GPT-NeoX, Llama and BERT.

Every mask is checked by what it does to a real forward pass: perturbing exactly the masked entries
changes exactly what the component computes, perturbing the other entries of the same tensors
leaves the component alone, and zeroing the masked entries equals the hook ablation.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import mechedit
from mechedit import components as comp
from mechedit.components import Component
from mechedit.edit.weights import WeightEdit, zero_neurons
from mechedit.hf import (
    LAYOUTS,
    NEURON_LAYOUTS,
    circuit_parameters,
    hf_parameters,
    hf_state_dict,
    hf_tied_names,
    layout,
)
from mechedit.zoo.random_model import random_checkpoint
from mechedit.zoo.tokenizer import build_tokenizer, save_tokenizer

ARCHS = ["gpt2", "neox", "llama", "bert"]
PROMPTS = ["w1 w2 w3 w4 w5 w6", "w9 w8 w7 w6 w5 w4"]
D_MODEL, N_HEADS, D_HEAD = 64, 4, 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bridges(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_parameters")
    return {arch: mechedit.load(random_checkpoint(root / arch, arch)) for arch in ARCHS}


@pytest.fixture(params=ARCHS)
def bridge(request, bridges):
    return bridges[request.param]


def _tokens(model):
    return model.to_tokens(PROMPTS)


@torch.no_grad()
def _run(model, hook=None, *, edit=None):
    """Logits, and the activation at ``hook`` (cloned) if one is named."""
    seen = {}

    def keep(act, hook):
        seen["act"] = act.detach().clone()

    logits = model.run_with_hooks(_tokens(model), fwd_hooks=[(hook, keep)] if hook else [])
    return (logits, seen["act"]) if hook else logits


@contextmanager
def _perturbed(model, masks, *, inside=True, scale=0.5):
    """Add seeded noise to the masked entries (or, with ``inside=False``, to all the others)."""
    params = hf_parameters(model)
    saved = {n: params[n].detach().clone() for n in masks}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mask in masks.items():
            where = mask if inside else ~mask
            noise = torch.randn(mask.shape, generator=gen) * scale
            params[name].add_(noise * where)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def _zeroing_edit(model, masks):
    live = hf_parameters(model)
    return WeightEdit.from_new_tensors(
        model, {n: live[n].detach().masked_fill(m, 0.0) for n, m in masks.items()}
    )


def _zero_hook(index):
    def hook(act, hook):
        act = act.clone()
        act[index] = 0.0
        return act

    return hook


def _max_diff(a, b):
    return (a - b).abs().max().item()


# --- heads ---------------------------------------------------------------------------------------


def test_head_mask_covers_the_heads_slices(bridge):
    arch = layout(bridge)
    masks = circuit_parameters(bridge, [Component("head", 1, head=2)])
    qkv_weights = [lin.weight.format(layer=1) for lin in arch.attn.qkv]
    o_weight = arch.attn.o.weight.format(layer=1)
    # q, k and v: d_head output units each, over d_model inputs; o: d_head input units
    assert sum(int(masks[n].sum()) for n in qkv_weights) == 3 * D_HEAD * D_MODEL
    assert int(masks[o_weight].sum()) == D_HEAD * D_MODEL
    assert arch.attn.o.bias.format(layer=1) not in masks  # shared by all heads
    assert all(".1." in n for n in masks)  # nothing outside layer 1


def test_perturbing_a_heads_entries_changes_only_that_head(bridge):
    layer, head = 1, 2
    masks = circuit_parameters(bridge, [Component("head", layer, head=head)])
    hook = f"blocks.{layer}.attn.hook_z"
    _, z = _run(bridge, hook)
    others = [h for h in range(N_HEADS) if h != head]

    with _perturbed(bridge, masks):
        _, z_in = _run(bridge, hook)
    assert _max_diff(z_in[:, :, head], z[:, :, head]) > 1e-3
    assert _max_diff(z_in[:, :, others], z[:, :, others]) <= 1e-6

    with _perturbed(bridge, masks, inside=False):
        _, z_out = _run(bridge, hook)
    assert _max_diff(z_out[:, :, head], z[:, :, head]) <= 1e-6
    assert _max_diff(z_out[:, :, others], z[:, :, others]) > 1e-3


def test_zeroing_heads_by_weights_equals_zeroing_hook_z(bridge):
    heads = [(0, 1), (1, 3), (1, 0)]
    expected = bridge.run_with_hooks(
        _tokens(bridge),
        fwd_hooks=[
            ("blocks.0.attn.hook_z", _zero_hook((slice(None), slice(None), [1]))),
            ("blocks.1.attn.hook_z", _zero_hook((slice(None), slice(None), [0, 3]))),
        ],
    ).detach()
    base = _run(bridge)
    assert _max_diff(expected, base) > 1e-4  # the ablation does something
    edit = _zeroing_edit(bridge, circuit_parameters(bridge, [Component("head", *h) for h in heads]))
    with edit.applied(bridge):
        assert _max_diff(_run(bridge), expected) <= 1e-5


def test_grouped_query_heads_share_their_key_value_slices(tmp_path):
    config = LlamaConfig(
        vocab_size=64, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=N_HEADS,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    save_tokenizer(build_tokenizer(f"w{i}" for i in range(59)), tmp_path)
    model = mechedit.load(tmp_path)
    masks = circuit_parameters(model, [Component("head", 0, head=3)])
    attn = "model.layers.0.self_attn"
    # head 3 reads key/value head 1 (heads 2 and 3 form a group)
    assert masks[f"{attn}.q_proj.weight"][3 * D_HEAD : 4 * D_HEAD].all()
    assert masks[f"{attn}.k_proj.weight"].shape[0] == 2 * D_HEAD
    assert (
        masks[f"{attn}.k_proj.weight"][D_HEAD:].all()
        and not masks[f"{attn}.k_proj.weight"][:D_HEAD].any()
    )

    _, z = _run(model, "blocks.0.attn.hook_z")
    with _perturbed(model, masks):
        _, z_in = _run(model, "blocks.0.attn.hook_z")
    changed = [h for h in range(N_HEADS) if _max_diff(z_in[:, :, h], z[:, :, h]) > 1e-4]
    assert changed == [2, 3]


# --- neurons -------------------------------------------------------------------------------------


def test_perturbing_a_neurons_entries_changes_only_that_neuron(bridge):
    layer, j = 1, 37
    masks = circuit_parameters(bridge, [Component("neuron", layer, neuron=j)])
    pre = circuit_parameters(bridge, [Component("neuron_pre", layer, neuron=j)])
    assert list(pre) == list(masks) and all(torch.equal(pre[n], masks[n]) for n in masks)
    hook = f"blocks.{layer}.mlp.hook_post"
    _, post = _run(bridge, hook)
    others = [i for i in range(post.shape[-1]) if i != j]

    with _perturbed(bridge, masks):
        _, post_in = _run(bridge, hook)
    assert _max_diff(post_in[..., j], post[..., j]) > 1e-3
    assert _max_diff(post_in[..., others], post[..., others]) <= 1e-6

    with _perturbed(bridge, masks, inside=False):
        _, post_out = _run(bridge, hook)
    assert _max_diff(post_out[..., j], post[..., j]) <= 1e-6
    assert _max_diff(post_out[..., others], post[..., others]) > 1e-3


def test_zeroing_neurons_by_weights_equals_zeroing_hook_post(bridge):
    """Also the BERT check: its blocks.l.mlp.hook_post fires between intermediate and output."""
    neurons = [(0, 5), (1, 37), (1, 150)]
    expected = bridge.run_with_hooks(
        _tokens(bridge),
        fwd_hooks=[
            ("blocks.0.mlp.hook_post", _zero_hook((..., [5]))),
            ("blocks.1.mlp.hook_post", _zero_hook((..., [37, 150]))),
        ],
    ).detach()
    assert _max_diff(expected, _run(bridge)) > 1e-5
    by_masks = _zeroing_edit(
        bridge,
        circuit_parameters(bridge, [Component("neuron", layer, neuron=j) for layer, j in neurons]),
    )
    for edit in (by_masks, zero_neurons(bridge, neurons)):
        with edit.applied(bridge):
            assert _max_diff(_run(bridge), expected) <= 1e-5
    assert set(by_masks.names) == set(zero_neurons(bridge, neurons).names)


# --- whole blocks --------------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["mlp", "attn"])
def test_a_whole_block_is_all_its_linears(bridge, site):
    arch = layout(bridge)
    linears = arch.attn.qkv + (arch.attn.o,) if site == "attn" else (*arch.mlp_in, arch.mlp_out)
    params = hf_parameters(bridge)
    expected = {n.format(layer=1) for lin in linears for n in lin.names} & set(params)
    masks = circuit_parameters(bridge, [Component(site, 1)])
    assert set(masks) == expected and all(m.all() for m in masks.values())
    norms = arch.attn_norms if site == "attn" else arch.mlp_norms
    with_norms = circuit_parameters(bridge, [Component(site, 1)], norms=True)
    assert set(with_norms) == expected | {n.format(layer=1) for n in norms}

    # zeroing every entry silences the block's output projection
    hook = f"blocks.1.{'attn.o' if site == 'attn' else 'mlp.out'}.hook_out"
    expected_logits = bridge.run_with_hooks(
        _tokens(bridge), fwd_hooks=[(hook, _zero_hook(...))]
    ).detach()
    with _zeroing_edit(bridge, masks).applied(bridge):
        assert _max_diff(_run(bridge), expected_logits) <= 1e-5


def test_planting_trains_exactly_the_mlp_tensors_of_a_plain_hf_model(bridges):
    from mechedit.zoo.train import _mlp_parameters

    hf = GPT2LMHeadModel(bridges["gpt2"].original_model.config)
    assert list(_mlp_parameters(hf, 1)) == [
        f"transformer.h.1.mlp.{m}.{p}" for m in ("c_fc", "c_proj") for p in ("weight", "bias")
    ]


def test_a_plain_hf_model_gets_the_bridges_masks(bridges):
    bridge = bridges["gpt2"]
    hf = GPT2LMHeadModel(bridge.original_model.config)
    circuit = [Component("head", 0, head=1), Component("neuron", 1, neuron=3), Component("mlp", 0)]
    on_bridge, on_hf = circuit_parameters(bridge, circuit), circuit_parameters(hf, circuit)
    assert list(on_bridge) == list(on_hf)
    assert all(torch.equal(on_bridge[n], on_hf[n]) for n in on_bridge)


# --- partitions ----------------------------------------------------------------------------------


def test_a_partition_is_one_output_unit(bridge):
    arch = layout(bridge)
    o = arch.attn.o.weight.format(layer=1)
    unit = 9
    masks = circuit_parameters(bridge, [Component("partition", 1, param=o, unit=unit)])
    assert list(masks) == [o] and int(masks[o].sum()) == D_MODEL  # one output unit, all inputs
    _, out = _run(bridge, "blocks.1.attn.o.hook_out")
    others = [u for u in range(D_MODEL) if u != unit]
    with _perturbed(bridge, masks):
        _, out_in = _run(bridge, "blocks.1.attn.o.hook_out")
    assert _max_diff(out_in[..., unit], out[..., unit]) > 1e-3
    assert _max_diff(out_in[..., others], out[..., others]) <= 1e-6

    # the MLP's input linear (Llama: up_proj): unit j is pre-activation j
    names = [n.format(layer=0) for n in arch.mlp_in[-1].names]
    masks = circuit_parameters(
        bridge,
        [Component("partition", 0, param=n, unit=40) for n in names if n in hf_parameters(bridge)],
    )
    _, pre = _run(bridge, "blocks.0.mlp.in.hook_out")
    with _perturbed(bridge, masks):
        _, pre_in = _run(bridge, "blocks.0.mlp.in.hook_out")
    changed = (pre_in - pre).abs().amax(dim=(0, 1)) > 1e-4
    assert changed.nonzero().flatten().tolist() == [40]


def test_masks_of_one_parameter_are_or_ed(bridges):
    bridge = bridges["neox"]
    qkv = "gpt_neox.layers.0.attention.query_key_value.weight"
    one = circuit_parameters(bridge, [Component("head", 0, head=0)])[qkv]
    two = circuit_parameters(bridge, [Component("head", 0, head=0), Component("head", 0, head=3)])
    assert int(two[qkv].sum()) == 2 * int(one.sum()) and (two[qkv] & one).sum() == one.sum()
    # GPT-NeoX interleaves q, k, v per head: head 0 owns rows 0..3*d_head-1
    assert one[: 3 * D_HEAD].all() and not one[3 * D_HEAD :].any()
    with_block = circuit_parameters(bridge, [Component("head", 0, head=0), Component("attn", 0)])
    assert with_block[qkv].all()


# --- tied parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "tied"),
    [
        ("gpt2", {"lm_head.weight": "transformer.wte.weight"}),
        (
            "bert",
            {
                "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias",
            },
        ),
        ("llama", {}),
    ],
)
def test_tied_parameters_are_listed_once_under_the_first_name(bridges, arch, tied):
    bridge = bridges[arch]
    assert hf_tied_names(bridge) == tied
    state = hf_state_dict(bridge)
    assert set(tied) <= set(state)  # the export keeps every name
    canonical = [n for n in state if n not in tied]
    assert list(hf_parameters(bridge)) == canonical
    assert list(comp.parameter_names(bridge)) == canonical
    sizes = comp.partition_sizes(bridge)
    assert list(sizes) == canonical
    partitions = comp.all_components(bridge, "partition")
    assert len(partitions) == sum(sizes.values())
    assert not {c.param for c in partitions} & set(tied)
    for alias, name in tied.items():
        masks = circuit_parameters(bridge, [Component("partition", None, param=alias, unit=5)])
        assert list(masks) == [name] and masks[name].nonzero()[:, 0].unique().tolist() == [5]


# --- the tables ----------------------------------------------------------------------------------


def test_neuron_layouts_and_partitions_come_from_one_table(bridge):
    arch_name = type(bridge.original_model).__name__
    arch = LAYOUTS[arch_name]
    assert NEURON_LAYOUTS[arch_name] == arch.neuron_layout
    sizes = comp.partition_sizes(bridge)
    d_mlp = bridge.cfg.d_mlp
    for lin in arch.mlp_in:  # the neurons are the MLP input linears' output units
        assert sizes[lin.weight.format(layer=0)] == d_mlp
    assert sizes[arch.mlp_out.weight.format(layer=0)] == D_MODEL
    fused = arch.attn.fused is not None
    assert sizes[arch.attn.qkv[0].weight.format(layer=0)] == (3 if fused else 1) * D_MODEL


def test_bad_circuits_are_clear_errors(bridges):
    bridge = bridges["gpt2"]
    cases = [
        (Component("head", 0, head=1, pos=3), "pinned to a position"),
        (Component("resid_pre", 0), "no parameters of its own"),
        (Component("head", 2, head=0), "layer 2 out of range"),
        (Component("head", 0, head=4), "4 heads"),
        (Component("neuron", 0, neuron=256), "256 neurons"),
        (Component("partition", None, param="transformer.h.0.mlp.c_fc.weight", unit=256), "256 output units"),
        (Component("partition", None, param="transformer.h.0.mlp.fc.weight", unit=0), "closest"),
    ]  # fmt: skip
    for component, message in cases:
        with pytest.raises(ValueError, match=message):
            circuit_parameters(bridge, [component])
    with pytest.raises(KeyError, match="LAYOUTS"):
        layout("MambaForCausalLM")


def test_binding_gpt2s_qkv_views_sends_gradients_to_c_attn(tmp_path):
    from mechedit.hf import bind_fused_qkv, hf_parameter

    model = mechedit.load(random_checkpoint(tmp_path, "gpt2"))
    c_attn = hf_parameter(model, "transformer.h.0.attn.c_attn.weight")
    before = _run(model)
    assert bind_fused_qkv(model) == 0  # loaded: views already share c_attn's storage
    model(_tokens(model)).sum().backward()
    assert c_attn.grad is None  # ... but the views' own Parameters take the gradient
    model.zero_grad(set_to_none=True)

    assert bind_fused_qkv(model, views=True) == 2
    assert bind_fused_qkv(model, views=True) == 0  # idempotent
    assert torch.equal(_run(model), before)
    model(_tokens(model)).sum().backward()
    assert c_attn.grad is not None and c_attn.grad.abs().sum() > 0
