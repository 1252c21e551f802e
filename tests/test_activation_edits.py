"""Activation edits on the tiny bridge: real effects inside, bit-exact restoration after."""

from __future__ import annotations

import pytest
import torch

from mechedit.circuit import Circuit
from mechedit.components import Component, hook_name, parameter_names
from mechedit.edit import ActivationEdit, ablate, mean_activations
from mechedit.provenance import weights_hash

PROMPT = "w1 w2 w3 w4 w5"


@pytest.fixture(scope="module")
def tokens(tiny_bridge):
    return tiny_bridge.to_tokens(PROMPT)


def _run(model, tokens, fwd_hooks=()):
    with torch.no_grad():
        return (
            model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks)) if fwd_hooks else model(tokens)
        )


def _hook_count(model) -> int:
    # hook_dict maps aliases to the same HookPoint: count each point once.
    points = {id(point): point for point in model.hook_dict.values()}
    return sum(len(point.fwd_hooks) for point in points.values())


def _setter(fn):
    """A manual reference hook: clone the activation and let ``fn`` edit it in place."""

    def hook(activation, hook=None):
        activation = activation.clone()
        fn(activation)
        return activation

    return hook


def _capture(store, name):
    def hook(activation, hook=None):
        store[name] = activation.detach().clone()

    return hook


# -- restoration ----------------------------------------------------------------------------------


def test_edit_changes_logits_inside_and_restores_them_bit_exactly(tiny_bridge, tokens):
    before, hash_before, hooks_before = (
        _run(tiny_bridge, tokens),
        weights_hash(tiny_bridge),
        _hook_count(tiny_bridge),
    )
    circuit = Circuit.of(
        tiny_bridge,
        [Component("neuron", 0, neuron=n) for n in range(0, 256, 3)]
        + [Component("head", 1, head=2)],
    )
    with ablate(tiny_bridge, circuit) as edit:
        assert edit.is_applied
        inside = _run(tiny_bridge, tokens)
    assert not edit.is_applied
    assert (inside - before).abs().max() > 1e-3
    assert torch.equal(_run(tiny_bridge, tokens), before)
    assert _hook_count(tiny_bridge) == hooks_before
    assert weights_hash(tiny_bridge) == hash_before


def test_restored_after_an_exception_inside_the_with(tiny_bridge, tokens):
    before = _run(tiny_bridge, tokens)
    with pytest.raises(KeyError, match="boom"):
        with ablate(tiny_bridge, [Component("mlp_out", 1)]):
            assert not torch.equal(_run(tiny_bridge, tokens), before)
            raise KeyError("boom")
    assert _hook_count(tiny_bridge) == 0
    assert torch.equal(_run(tiny_bridge, tokens), before)


def test_restored_after_an_error_raised_by_the_hook_itself(tiny_bridge, tokens):
    before = _run(tiny_bridge, tokens)
    with pytest.raises(
        ValueError, match=r"positions \[9\] out of range for a sequence of 6 tokens"
    ):
        with ablate(tiny_bridge, [Component("neuron", 0, neuron=1)], positions=[9]):
            _run(tiny_bridge, tokens)
    assert _hook_count(tiny_bridge) == 0
    assert torch.equal(_run(tiny_bridge, tokens), before)


def test_other_hooks_survive_the_edit(tiny_bridge, tokens):
    seen = {}
    name = hook_name("resid_post", 1)
    with tiny_bridge.hooks(fwd_hooks=[(name, _capture(seen, name))]):
        with ablate(tiny_bridge, [Component("neuron", 1, neuron=4)]):
            pass
        assert _hook_count(tiny_bridge) == 1
        _run(tiny_bridge, tokens)
        assert name in seen
    assert _hook_count(tiny_bridge) == 0


def test_apply_revert_object_form(tiny_bridge, tokens):
    before = _run(tiny_bridge, tokens)
    edit = ActivationEdit(
        tiny_bridge, [Component("neuron", 1, neuron=9), Component("neuron", 1, neuron=10)]
    )
    assert edit.apply() is edit
    with pytest.raises(RuntimeError, match="already applied"):
        edit.apply()
    edited = _run(tiny_bridge, tokens)
    edit.revert()
    edit.revert()  # a second revert is harmless
    assert torch.equal(_run(tiny_bridge, tokens), before)
    assert torch.equal(_run(tiny_bridge, tokens, edit.fwd_hooks), edited)
    with edit:
        assert torch.equal(_run(tiny_bridge, tokens), edited)


# -- zero and scale ---------------------------------------------------------------------------


def test_zeroing_a_neuron_equals_a_manual_hook(tiny_bridge, tokens):
    j = 37
    name = hook_name("neuron", 1)
    manual = _run(tiny_bridge, tokens, [(name, _setter(lambda a: a[..., j].zero_()))])
    with ablate(tiny_bridge, [Component("neuron", 1, neuron=j)]):
        via_edit = _run(tiny_bridge, tokens)
    assert torch.equal(via_edit, manual)
    assert not torch.equal(via_edit, _run(tiny_bridge, tokens))


def test_many_neurons_one_hook_vectorised(tiny_bridge, tokens):
    chosen = [3, 17, 40, 41, 200]
    name = hook_name("neuron", 0)
    manual = _run(
        tiny_bridge, tokens, [(name, _setter(lambda a: a.__setitem__((..., chosen), 0.0)))]
    )
    edit = ablate(tiny_bridge, [Component("neuron", 0, neuron=j) for j in chosen])
    assert [n for n, _ in edit.fwd_hooks] == [name]
    with edit:
        assert len(tiny_bridge.hook_dict[name].fwd_hooks) == 1
        assert torch.equal(_run(tiny_bridge, tokens), manual)


def test_positions_own_and_edit_wide(tiny_bridge, tokens):
    name = hook_name("neuron", 0)

    def manual(a):
        a[:, -1, 5] = 0  # neuron 5 at the edit's positions (last token)
        a[:, 2, 6] = 0  # neuron 6 pinned to position 2

    expected = _run(tiny_bridge, tokens, [(name, _setter(manual))])
    circuit = [Component("neuron", 0, neuron=5), Component("neuron", 0, neuron=6, pos=2)]
    with ablate(tiny_bridge, circuit, positions=-1):
        assert torch.equal(_run(tiny_bridge, tokens), expected)
    with ablate(tiny_bridge, circuit, positions=torch.tensor([5])):
        assert torch.equal(_run(tiny_bridge, tokens), expected)


def test_whole_vector_site_at_a_position(tiny_bridge, tokens):
    name = hook_name("resid_pre", 1)
    expected = _run(tiny_bridge, tokens, [(name, _setter(lambda a: a[:, 3].zero_()))])
    with ablate(tiny_bridge, [Component("resid_pre", 1, pos=3)]):
        assert torch.equal(_run(tiny_bridge, tokens), expected)


def test_zeroing_a_head_zeroes_only_that_head(tiny_bridge, tokens):
    name = hook_name("head", 1)
    clean, seen = {}, {}
    _run(tiny_bridge, tokens, [(name, _capture(clean, name))])
    with ablate(tiny_bridge, [Component("head", 1, head=2)]):
        _run(tiny_bridge, tokens, [(name, _capture(seen, name))])  # runs after the edit's hook
    z, z0 = seen[name], clean[name]
    assert z.shape == (1, 6, tiny_bridge.cfg.n_heads, tiny_bridge.cfg.d_head)
    assert torch.all(z[:, :, 2] == 0) and z0[:, :, 2].abs().sum() > 0
    assert torch.equal(z[:, :, [0, 1, 3]], z0[:, :, [0, 1, 3]])


def test_zeroing_all_heads_leaves_only_the_output_bias(tiny_bridge, tokens):
    layer = 1
    bias = parameter_names(tiny_bridge)[f"transformer.h.{layer}.attn.c_proj.bias"].detach()
    expected = _run(
        tiny_bridge,
        tokens,
        [(hook_name("attn_out", layer), _setter(lambda a: a.copy_(bias.expand_as(a))))],
    )
    heads = [Component("head", layer, head=h) for h in range(tiny_bridge.cfg.n_heads)]
    with ablate(tiny_bridge, heads):
        assert torch.allclose(_run(tiny_bridge, tokens), expected, atol=1e-6)


def test_scale(tiny_bridge, tokens):
    component = [Component("neuron", 1, neuron=11), Component("head", 0, head=1)]
    with ablate(tiny_bridge, component, mode="scale", scale=1.0):
        assert torch.equal(_run(tiny_bridge, tokens), _run(tiny_bridge, tokens, []))
    with ablate(tiny_bridge, component, mode="scale", scale=0.0):
        scaled_zero = _run(tiny_bridge, tokens)
    with ablate(tiny_bridge, component):
        assert torch.equal(_run(tiny_bridge, tokens), scaled_zero)
    name = hook_name("neuron", 1)
    expected = _run(tiny_bridge, tokens, [(name, _setter(lambda a: a[..., 11].mul_(3.0)))])
    with ablate(tiny_bridge, [component[0]], mode="scale", scale=3.0):
        assert torch.equal(_run(tiny_bridge, tokens), expected)


# -- mean ablation -------------------------------------------------------------------------------


def test_mean_over_the_prompt_itself_is_the_positional_mean(tiny_bridge, tokens):
    j, name = 21, hook_name("neuron", 0)
    clean, seen = {}, {}
    _run(tiny_bridge, tokens, [(name, _capture(clean, name))])
    expected_mean = clean[name][0, :, j].mean()
    with ablate(
        tiny_bridge, [Component("neuron", 0, neuron=j)], mode="mean", reference=[PROMPT]
    ) as edit:
        assert torch.allclose(edit.means[name][j], expected_mean, atol=1e-6)
        edited_logits = _run(tiny_bridge, tokens, [(name, _capture(seen, name))])
    assert torch.allclose(seen[name][0, :, j], expected_mean.expand(6), atol=1e-6)
    others = [i for i in range(tiny_bridge.cfg.d_mlp) if i != j]
    assert torch.equal(seen[name][..., others], clean[name][..., others])
    manual = _run(tiny_bridge, tokens, [(name, _setter(lambda a: a[..., j].fill_(expected_mean)))])
    assert torch.allclose(edited_logits, manual, atol=1e-6)


def test_per_position_mean_over_the_prompt_itself_changes_nothing(tiny_bridge, tokens):
    before = _run(tiny_bridge, tokens)
    circuit = [Component("neuron", 1, neuron=n) for n in range(20)] + [
        Component("head", 0, head=3),
        Component("resid_mid", 1),
    ]
    with ablate(tiny_bridge, circuit, mode="mean", reference=tokens, per_position=True):
        assert torch.allclose(_run(tiny_bridge, tokens), before, atol=1e-5)


def test_mean_over_prompts_of_different_lengths(tiny_bridge):
    prompts = ["w1 w2", "w3 w4 w5 w6", "w7 w8"]
    name = hook_name("head", 1)
    store, parts = {}, []
    for prompt in prompts:
        _run(tiny_bridge, tiny_bridge.to_tokens(prompt), [(name, _capture(store, name))])
        parts.append(store[name][0])
    every_token = torch.cat(parts)  # [all positions, n_heads, d_head]
    means = mean_activations(tiny_bridge, [name], prompts)
    assert torch.allclose(means[name], every_token.mean(0), atol=1e-6)
    without_bos = mean_activations(tiny_bridge, [name], prompts, exclude_bos=True)
    assert torch.allclose(without_bos[name], torch.cat([p[1:] for p in parts]).mean(0), atol=1e-6)
    with pytest.raises(
        ValueError, match="per_position means need reference prompts of one token length"
    ):
        mean_activations(tiny_bridge, [name], prompts, per_position=True)


def test_per_position_mean_needs_a_long_enough_reference(tiny_bridge, tokens):
    with pytest.raises(
        ValueError, match="per-position source covers 3 positions but the input has 6"
    ):
        with ablate(
            tiny_bridge, [Component("mlp", 0)], mode="mean", reference=["w1 w2"], per_position=True
        ):
            _run(tiny_bridge, tokens)
    assert _hook_count(tiny_bridge) == 0


# -- argument errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("circuit", "kwargs", "message"),
    [
        (
            [Component("neuron", 0, neuron=1)],
            {"mode": "erase"},
            r"mode 'erase' is not known; valid modes: zero, mean, scale",
        ),
        ([Component("neuron", 0, neuron=1)], {"mode": "mean"}, r"mode='mean' needs reference="),
        ([Component("neuron", 0, neuron=1)], {"reference": ["w1"]}, r"other modes take none"),
        ([Component("neuron", 0, neuron=1)], {"mode": "scale"}, r"mode='scale' needs scale="),
        (
            [Component("neuron", 0, neuron=1)],
            {"mode": "scale", "scale": float("nan")},
            r"finite number",
        ),
        ([Component("neuron", 0, neuron=1)], {"per_position": True}, r"apply to mode='mean' only"),
        ([Component("neuron", 0, neuron=1)], {"positions": [1.5]}, r"positions must be ints"),
        (
            [Component("neuron", 7, neuron=1)],
            {},
            r"layer 7 out of range: the model has 2 layers \(0\.\.1\)",
        ),
        ([Component("neuron", 0, neuron=999)], {}, r"neuron 999 out of range"),
        (
            [Component("partition", 0, param="transformer.h.0.mlp.c_fc.weight", unit=0)],
            {},
            r"is a weight partition, not an activation",
        ),
        ([], {}, r"the circuit is empty"),
        ([Component("mlp", 0)], {"mode": "mean", "reference": []}, r"reference must be prompts"),
    ],
)
def test_bad_arguments(tiny_bridge, circuit, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ablate(tiny_bridge, circuit, **kwargs)
    assert _hook_count(tiny_bridge) == 0


def test_duplicates_and_non_components_are_rejected(tiny_bridge):
    with pytest.raises(ValueError, match="duplicate components"):
        ablate(tiny_bridge, [Component("mlp", 0), Component("mlp", 0)])
    with pytest.raises(ValueError, match="holds Components"):
        ablate(tiny_bridge, [("neuron", 0, 1)])


# -- the pipeline through files ------------------------------------------------------------------


def test_scores_to_circuit_file_to_edit(tiny_bridge, tokens, tmp_path):
    from mechedit.scores import Scores

    name = hook_name("neuron", 0)
    clean = {}
    _run(tiny_bridge, tokens, [(name, _capture(clean, name))])
    magnitude = clean[name][0].abs().mean(0)  # [d_mlp]: mean |activation| over positions
    scores = Scores(magnitude[None], ("layer", "neuron"), "neuron", "mean_abs_activation")
    path = scores.top_k(3).save(tmp_path / "circuit.json")
    circuit = Circuit.load(path).validate(tiny_bridge)
    chosen = magnitude.topk(3).indices.tolist()
    assert [c.neuron for c in circuit] == chosen

    expected = _run(
        tiny_bridge, tokens, [(name, _setter(lambda a: a.__setitem__((..., chosen), 0.0)))]
    )
    edit = ablate(tiny_bridge, circuit, positions=[1, -1])
    with edit:
        partial = _run(tiny_bridge, tokens)
    assert not torch.equal(partial, expected)  # only two positions were edited
    with ablate(tiny_bridge, circuit):
        assert torch.equal(_run(tiny_bridge, tokens), expected)
    description = edit.to_dict()
    assert description["mode"] == "zero" and description["positions"] == [1, -1]
    assert Circuit.from_dict(description["circuit"]) == circuit


# -- the edit protocol: apply(model) / applied(model) / save / load --------------------------------


def test_activation_edits_follow_the_edit_protocol(tiny_bridge):
    from mechedit.edit import Edit, zero_neurons

    assert isinstance(ablate(tiny_bridge, [Component("neuron", 0, neuron=1)]), Edit)
    assert isinstance(zero_neurons(tiny_bridge, [(0, 1)]), Edit)
    assert not isinstance(object(), Edit)


@pytest.mark.parametrize(
    ("circuit", "kwargs"),
    [
        ([Component("neuron", 0, neuron=j) for j in (3, 50, 200)] + [Component("head", 1, head=2, pos=-1)], {}),
        (
            [Component("neuron", 1, neuron=j) for j in range(40)] + [Component("resid_mid", 0)],
            {"mode": "mean", "reference": ["w1 w2 w3", "w4 w5 w6 w7 w8"], "exclude_bos": True},
        ),
        ([Component("head", 0, head=1)], {"mode": "mean", "reference": ["w5 w6 w7 w8 w9 w10 w11"], "per_position": True}),
        ([Component("mlp", 1)], {"mode": "scale", "scale": 0.5, "positions": [1, -1]}),
    ],
)
def test_save_then_load_into_a_fresh_model_gives_identical_logits(
    tiny_bridge, tiny_gpt2_dir, tokens, tmp_path, circuit, kwargs
):
    import os

    import mechedit
    from mechedit.edit import ActivationEdit, load_edit

    edit = ablate(tiny_bridge, circuit, **kwargs)
    with edit.applied(tiny_bridge):
        expected = _run(tiny_bridge, tokens)
    assert not torch.equal(expected, _run(tiny_bridge, tokens))
    folder = edit.save(tmp_path / "edit")
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        assert (folder / name).stat().st_mode & 0o777 == 0o644 & ~umask, name

    fresh = mechedit.load(tiny_gpt2_dir)
    loaded = ActivationEdit.load(folder)
    assert type(load_edit(folder)) is ActivationEdit
    with pytest.raises(RuntimeError, match="no model"):
        loaded.apply()
    with loaded.applied(fresh) as model:
        assert model is fresh and loaded.is_applied
        assert torch.equal(_run(fresh, tokens), expected)
    assert not loaded.is_applied
    assert torch.equal(_run(fresh, tokens), _run(tiny_bridge, tokens))
    assert loaded.manifest() == edit.manifest()
    for name, mean in edit.means.items():
        assert torch.equal(loaded.means[name], mean.cpu())


def test_loaded_edit_refuses_a_model_with_other_weights(tiny_bridge, tiny_gpt2_dir, tokens, tmp_path):
    import mechedit
    from mechedit.edit import ActivationEdit, BaseModelMismatchError

    edit = ablate(tiny_bridge, [Component("neuron", 0, neuron=4)], mode="mean", reference=[PROMPT])
    folder = edit.save(tmp_path / "edit")
    other = mechedit.load(tiny_gpt2_dir)
    with torch.no_grad():
        parameter_names(other)["transformer.h.0.mlp.c_fc.bias"][0] += 1.0
    loaded = ActivationEdit.load(folder)
    with pytest.raises(BaseModelMismatchError, match="built on weights"):
        loaded.apply(other)
    assert _hook_count(other) == 0 and not loaded.is_applied
    unedited = _run(other, tokens)
    with loaded.applied(other, check_base=False):
        assert not torch.equal(_run(other, tokens), unedited)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        edit.save(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m.update(version=2), "newer mechedit"),
        (lambda m: m.pop("circuit"), r"missing \['circuit'\]"),
        (lambda m: m.update(mode="erase"), "mode 'erase' is not known"),
        (lambda m: m.update(per_position="yes"), "'per_position' must be bool"),
        (lambda m: m["circuit"].update(format="x"), "'circuit'"),
        (lambda m: m.update(means={}), "'means' must list exactly the hooks"),
        (lambda m: m["base"].pop("weights_hash"), "missing"),
    ],
)
def test_malformed_activation_edit_folders_are_refused(tiny_bridge, tmp_path, damage, message):
    import json

    from mechedit.edit import ActivationEdit, EditFormatError

    edit = ablate(tiny_bridge, [Component("neuron", 0, neuron=4)], mode="mean", reference=[PROMPT])
    folder = edit.save(tmp_path / "edit")
    manifest = json.loads((folder / "manifest.json").read_text())
    damage(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EditFormatError, match=message):
        ActivationEdit.load(folder)


def test_missing_or_damaged_means_file_is_a_format_error(tiny_bridge, tmp_path):
    from mechedit.edit import ActivationEdit, EditFormatError

    edit = ablate(tiny_bridge, [Component("mlp", 0)], mode="mean", reference=[PROMPT])
    folder = edit.save(tmp_path / "edit")
    (folder / "means.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(EditFormatError, match="not a readable safetensors file"):
        ActivationEdit.load(folder)
    (folder / "means.safetensors").unlink()
    with pytest.raises(EditFormatError, match="incomplete"):
        ActivationEdit.load(folder)
    with pytest.raises(EditFormatError, match="not found"):
        ActivationEdit.load(tmp_path / "nowhere")


def test_revert_on_another_model_object_is_refused(tiny_bridge, tiny_gpt2_dir):
    import mechedit
    from mechedit.edit import EditStateError

    edit = ablate(tiny_bridge, [Component("neuron", 0, neuron=4)])
    edit.apply(tiny_bridge)
    try:
        with pytest.raises(EditStateError, match="different model"):
            edit.revert(mechedit.load(tiny_gpt2_dir))
    finally:
        edit.revert(tiny_bridge)
    assert _hook_count(tiny_bridge) == 0
