"""Component addresses and the site -> hook-name table, checked against real bridges."""

from __future__ import annotations

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

from mechedit import components as comp
from mechedit.components import SITES, Component

HOOKED_SITES = [site for site, spec in SITES.items() if spec.hook is not None]


def _layers(site, n_layers):
    """Layers a site has: every block, or only 0 for the embeddings (computed before the blocks)."""
    return range(n_layers) if SITES[site].per_layer else [0]


@pytest.mark.parametrize("site", HOOKED_SITES)
def test_every_site_hook_exists_for_every_layer(tiny_bridge, site):
    for layer in _layers(site, tiny_bridge.cfg.n_layers):
        name = comp.hook_name(site, layer)
        assert name in tiny_bridge.hook_dict
        assert comp.check_hook_name(tiny_bridge, name) == name


def test_hook_names_on_a_three_layer_model_built_here(tmp_path):
    import mechedit
    from mechedit.zoo import random_gpt2_checkpoint

    model = mechedit.load(random_gpt2_checkpoint(tmp_path, n_layer=3, n_embd=32, n_head=2))
    for site in HOOKED_SITES:
        for layer in _layers(site, 3):
            assert comp.hook_name(site, layer) in model.hook_dict
    with pytest.raises(
        ValueError, match=r"layer 3 out of range: the model has 3 layers \(0\.\.2\)"
    ):
        comp.validate(model, Component("neuron", 3, neuron=0))


def test_hook_names_on_the_fact_world():
    import mechedit
    from mechedit import zoo

    try:
        folder = zoo.checkpoint_dir("factworld")
    except (FileNotFoundError, KeyError) as err:
        pytest.skip(f"fact world checkpoint not built yet: {err}")
    model = mechedit.load(folder)
    for site in HOOKED_SITES:
        for layer in _layers(site, model.cfg.n_layers):
            assert comp.hook_name(site, layer) in model.hook_dict


def test_hook_tensors_have_the_documented_shapes(tiny_bridge):
    cfg = tiny_bridge.cfg
    tokens = tiny_bridge.to_tokens("w1 w2 w3")
    layer = {site: 1 if SITES[site].per_layer else 0 for site in HOOKED_SITES}
    names = [comp.hook_name(site, layer[site]) for site in HOOKED_SITES]
    _, cache = tiny_bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    expected = {
        "head": (1, 4, cfg.n_heads, cfg.d_head),
        "q": (1, 4, cfg.n_heads, cfg.d_head),
        "k": (1, 4, cfg.n_heads, cfg.d_head),
        "v": (1, 4, cfg.n_heads, cfg.d_head),
        "pattern": (1, cfg.n_heads, 4, 4),  # head axis before the query positions
        "neuron": (1, 4, cfg.d_mlp),
        "neuron_pre": (1, 4, cfg.d_mlp),
    }
    for site in HOOKED_SITES:
        shape = tuple(cache[comp.hook_name(site, layer[site])].shape)
        assert shape == expected.get(site, (1, 4, cfg.d_model)), site
        sizes = {"batch": 1, "pos": 4, "key_pos": 4, "d_model": cfg.d_model, "d_head": cfg.d_head,
                 "head": cfg.n_heads, "neuron": cfg.d_mlp}
        assert shape == tuple(sizes[d] for d in SITES[site].dims), site  # the table's layout


def test_hook_name_examples_and_axes():
    assert comp.hook_name("neuron", 3) == "blocks.3.mlp.hook_post"
    assert comp.hook_name("neuron_pre", 0) == "blocks.0.mlp.hook_pre"
    assert comp.hook_name("head", 1) == "blocks.1.attn.hook_z"
    assert comp.hook_name(Component("resid_mid", 2)) == "blocks.2.hook_resid_mid"
    assert Component("mlp", 1).hook_name == "blocks.1.hook_mlp_out"
    assert comp.site_axes("neuron") == ("layer", "neuron")
    assert comp.site_axes("head") == ("layer", "head")
    assert comp.site_axes("resid_pre") == ("layer",)
    assert comp.site_axes("partition") == ("partition",)


def test_unknown_site_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        Component("mlp_post", 0, neuron=1)
    message = str(err.value)
    assert "site 'mlp_post' is not known" in message
    assert "did you mean 'neuron'" in message
    for site in SITES:
        assert site in message
    with pytest.raises(ValueError, match="valid sites: resid_pre"):
        comp.hook_name("resid", 0)


@pytest.mark.parametrize(
    ("component", "message"),
    [
        (
            Component("neuron", 9, neuron=0),
            r"layer 9 out of range: the model has 2 layers \(0\.\.1\)",
        ),
        (
            Component("neuron", 1, neuron=256),
            r"neuron 256 out of range: the model has 256 neurons per layer \(0\.\.255\)",
        ),
        (
            Component("head", 0, head=4),
            r"head 4 out of range: the model has 4 heads per layer \(0\.\.3\)",
        ),
        (
            Component("resid_pre", 0, pos=64),
            r"pos 64 out of range: the model's context is 64 tokens",
        ),
        (Component("resid_pre", 0, pos=-65), r"pos -65 out of range"),
        (
            Component("partition", 0, param="transformer.h.0.mlp.c_fc.weight", unit=256),
            r"unit of 'transformer.h.0.mlp.c_fc.weight' 256 out of range: the model has 256 units",
        ),
        (
            Component("partition", None, param="nope.weight", unit=0),
            r"parameter 'nope.weight' is not in this model",
        ),
    ],
)
def test_validate_rejects_out_of_range(tiny_bridge, component, message):
    with pytest.raises(ValueError, match=message):
        comp.validate(tiny_bridge, component)


def test_validate_accepts_in_range(tiny_bridge):
    for component in [
        Component("neuron", 1, neuron=255, pos=-1),
        Component("head", 1, head=3, pos=63),
        Component("mlp", 0),
        Component("partition", 1, param="transformer.h.1.mlp.c_proj.weight", unit=63),
    ]:
        assert comp.validate(tiny_bridge, component) is component


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(site="neuron", layer=0), r"needs neuron= an int >= 0, got None"),
        (dict(site="neuron", layer=0, neuron=-1), r"needs neuron= an int >= 0, got -1"),
        (dict(site="head", layer=0, head=True), r"needs head= an int >= 0, got True"),
        (
            dict(site="resid_pre", layer=0, neuron=3),
            r"takes no neuron=.*sites with a neuron: neuron, neuron_pre",
        ),
        (dict(site="neuron", layer=0, neuron=1, head=2), r"takes no head="),
        (dict(site="mlp_out", layer=-1), r"layer must be an int >= 0, got -1"),
        (dict(site="mlp_out", layer=None), r"needs a layer"),
        (dict(site="mlp_out", layer=1.0), r"layer must be an int >= 0, got 1.0"),
        (dict(site="resid_post", layer=0, pos="last"), r"pos must be an int or None"),
        (dict(site="partition", layer=0, unit=1), r"needs param= a parameter name"),
        (dict(site="partition", layer=0, param="w", unit=1, pos=0), r"takes no pos="),
        (dict(site="neuron", layer=0, neuron=1, param="w"), r"takes no param="),
    ],
)
def test_component_fields_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Component(**kwargs)


def test_check_hook_name_suggests_close_names(tiny_bridge):
    with pytest.raises(
        ValueError, match=r"not in this model's hook_dict.*closest: blocks\.0\.mlp\.hook_post"
    ):
        comp.check_hook_name(tiny_bridge, "blocks.0.mlp.hook_psot")


def test_all_components_enumerates_and_validates(tiny_bridge):
    cfg = tiny_bridge.cfg
    neurons = comp.all_components(tiny_bridge, "neuron")
    assert len(neurons) == cfg.n_layers * cfg.d_mlp
    assert neurons[0] == Component("neuron", 0, neuron=0)
    assert neurons[-1] == Component("neuron", cfg.n_layers - 1, neuron=cfg.d_mlp - 1)
    assert len(comp.all_components(tiny_bridge, "head", layers=[1])) == cfg.n_heads
    assert comp.all_components(tiny_bridge, "resid_pre") == [
        Component("resid_pre", 0),
        Component("resid_pre", 1),
    ]
    comp.validate_all(tiny_bridge, neurons)
    with pytest.raises(ValueError, match="layer 5 out of range"):
        comp.all_components(tiny_bridge, "mlp", layers=[5])


def test_validate_all_lists_every_bad_component(tiny_bridge):
    bad = [Component("neuron", 0, neuron=999), Component("head", 7, head=0), Component("mlp", 0)]
    with pytest.raises(ValueError) as err:
        comp.validate_all(tiny_bridge, bad)
    assert "2 component(s) do not fit" in str(err.value)
    assert "L0 neuron 999" in str(err.value) and "L7 head 0" in str(err.value)


def test_partition_units_follow_meaning_not_layout(tiny_bridge):
    # HF GPT-2's Conv1D stores [in, out]; a unit is an output feature, i.e. a column.
    assert (
        comp.partition_size(tiny_bridge, "transformer.h.0.mlp.c_fc.weight") == tiny_bridge.cfg.d_mlp
    )
    assert (
        comp.partition_size(tiny_bridge, "transformer.h.0.mlp.c_proj.weight")
        == tiny_bridge.cfg.d_model
    )
    assert (
        comp.partition_size(tiny_bridge, "transformer.h.0.mlp.c_fc.bias") == tiny_bridge.cfg.d_mlp
    )

    class TwoLayouts(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 5)  # weight [out=5, in=3]
            self.conv = Conv1D(7, 3)  # weight [in=3, out=7]

    model = TwoLayouts()
    assert comp.partition_size(model, "linear.weight") == 5
    assert comp.partition_size(model, "conv.weight") == 7
    assert comp.partition_size(model, "conv.bias") == 7


def test_partition_names_are_plain_hf_names(tiny_bridge):
    names = comp.parameter_names(tiny_bridge)
    assert "transformer.h.0.mlp.c_fc.weight" in names and "transformer.wte.weight" in names
    assert "lm_head.weight" not in names  # tied to transformer.wte.weight: listed once
    # the bridge's aliases of the same tensors are not separate partitions
    assert not any("_original_component" in n or ".attn.q." in n or ".mlp.in." in n for n in names)
    sizes = comp.partition_sizes(tiny_bridge)
    assert sizes["transformer.h.1.attn.c_attn.weight"] == 3 * tiny_bridge.cfg.d_model
    assert sizes["transformer.wte.weight"] == tiny_bridge.cfg.d_vocab  # one unit per token row
    partitions = comp.all_components(tiny_bridge, "partition")
    assert len(partitions) == sum(sizes.values())
    comp.validate_all(tiny_bridge, partitions)
    assert comp.parse_partition_key(comp.partition_key("a.b.weight", 12)) == ("a.b.weight", 12)
    with pytest.raises(ValueError, match="not of the form"):
        comp.parse_partition_key("a.b.weight")


def test_components_are_frozen_hashable_and_readable():
    neuron = Component("neuron", 1, neuron=7)
    assert {neuron, Component("neuron", 1, neuron=7)} == {neuron}
    assert neuron.index == 7 and Component("mlp_out", 0).index is None
    assert neuron.at(3) == Component("neuron", 1, neuron=7, pos=3)
    assert str(neuron.at(3)) == "L1 neuron 7 @pos 3"
    assert repr(neuron) == "Component('neuron', 1, neuron=7)"
    with pytest.raises(AttributeError):
        neuron.layer = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="has no hook"):
        Component("partition", 0, param="w", unit=0).hook_name  # noqa: B018
