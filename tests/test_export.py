"""Bridge <-> HF name mapping and export to a plain Hugging Face checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import mechedit
from mechedit.edit.export import export_hf
from mechedit.edit.weights import BaseModelMismatchError, WeightEdit, zero_neurons
from mechedit.hf import hf_parameter, hf_parameters, hf_state_dict
from mechedit.provenance import weights_hash
from mechedit.zoo import random_gpt2_checkpoint
from mechedit.zoo.tokenizer import build_tokenizer, save_tokenizer

PROMPTS = ["w1 w2 w3 w4 w5", "w9 w8 w7 w6 w5"]


@pytest.fixture
def model(tiny_gpt2_dir):
    return mechedit.load(tiny_gpt2_dir)


def _load_hf(folder):
    """The export as plain transformers loads it, with the eager attention the bridge matches."""
    return AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


def _hf_logits(folder_or_model, tokens):
    hf = (
        folder_or_model
        if isinstance(folder_or_model, torch.nn.Module)
        else _load_hf(folder_or_model)
    )
    with torch.no_grad():
        return hf(tokens).logits


def _logits(bridge, tokens):
    with torch.no_grad():
        return bridge(tokens)


def _fresh_hf_keys(bridge):
    return list(type(bridge.original_model)(bridge.original_model.config).state_dict())


# --- the name mapping ----------------------------------------------------------------------------


def test_hf_state_dict_has_plain_names_and_shares_storage(tiny_bridge, tiny_gpt2_dir):
    state = hf_state_dict(tiny_bridge)
    assert list(state) == list(GPT2LMHeadModel(tiny_bridge.original_model.config).state_dict())
    assert (
        "transformer.h.0.attn.c_attn.weight" in state
        and "transformer.h.0.mlp.c_proj.weight" in state
    )
    assert not any("_original_component" in n for n in state)

    on_disk = load_file(
        str(tiny_gpt2_dir / "model.safetensors")
    )  # save_pretrained drops tied lm_head
    assert set(state) - set(on_disk) == {"lm_head.weight"}
    assert all(torch.equal(state[n], t) for n, t in on_disk.items())

    params = hf_parameters(tiny_bridge, tied_aliases=True)
    for name, tensor in state.items():
        assert tensor.data_ptr() == params[name].data_ptr()
    # by default each parameter once: the tied lm_head under its canonical name
    assert list(hf_parameters(tiny_bridge)) == [n for n in state if n != "lm_head.weight"]
    # The bridge's q view shares storage with c_attn: an edit of c_attn reaches it.
    wrapped = dict(tiny_bridge.original_model.named_parameters())
    q = wrapped["transformer.h.0._original_component.attn.q._original_component.weight"]
    assert (
        q.untyped_storage().data_ptr()
        == params["transformer.h.0.attn.c_attn.weight"].untyped_storage().data_ptr()
    )


def test_hf_parameter_names_the_valid_choices(tiny_bridge):
    with pytest.raises(KeyError, match="valid names include"):
        hf_parameter(tiny_bridge, "transformer.h.0.mlp.in.weight")
    with pytest.raises(TypeError, match="mechedit.load"):
        hf_state_dict(torch.nn.Linear(2, 2))


# --- export ---------------------------------------------------------------------------------------


def test_export_of_an_edited_model_loads_in_plain_transformers(model, tmp_path):
    tokens = model.to_tokens(PROMPTS)
    base_hash = weights_hash(model)
    edit = zero_neurons(model, [(0, 7), (1, 30), (1, 31)])
    out = export_hf(model, tmp_path / "export", edit=edit)
    assert weights_hash(model) == base_hash  # exporting with an edit leaves the live model alone

    assert {"config.json", "model.safetensors", "tokenizer.json", "mechedit.json"} <= {
        p.name for p in out.iterdir()
    }
    with edit.applied(model):
        bridge_logits = _logits(model, tokens)
    hf_logits = _hf_logits(out, tokens)
    assert (hf_logits - bridge_logits).abs().max().item() <= 1e-5
    assert (
        hf_logits - _logits(model, tokens)
    ).abs().max().item() > 1e-4  # the edit is in the export

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert list(hf.state_dict()) == _fresh_hf_keys(model)
    assert hf.config.output_attentions is False  # the bridge's loading flag is not exported
    written = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(written[n], t) for n, t in edit.new_tensors.items())

    note = json.loads((out / "mechedit.json").read_text())
    assert note["format"] == "mechedit.hf_export" and note["version"] == 1
    assert note["source"]["weights_hash"] == base_hash
    assert note["edit"]["kind"] == "zero_neurons"
    assert note["edit"]["params"] == {"neurons": [[0, 7], [1, 30], [1, 31]]}
    assert note["edit"]["result"]["weights_hash"] == edit.result.weights_hash

    # Reloaded through mechedit, the export is exactly the edited model.
    reloaded = mechedit.load(out)
    assert weights_hash(reloaded) == edit.result.weights_hash
    assert torch.equal(_logits(reloaded, tokens), bridge_logits)


def test_export_with_the_edit_applied_or_not_writes_the_same_weights(model, tmp_path):
    edit = zero_neurons(model, [(1, 3)])
    export_hf(model, tmp_path / "a", edit=edit)
    with edit.applied(model):
        export_hf(model, tmp_path / "b", edit=edit)
        export_hf(model, tmp_path / "c")
    a, b, c = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]) for n in a)
    assert json.loads((tmp_path / "c" / "mechedit.json").read_text())["edit"] is None


def test_export_without_edit_reproduces_the_checkpoint(tiny_bridge, tiny_gpt2_dir, tmp_path):
    out = export_hf(tiny_bridge, tmp_path / "plain")
    original, exported = (
        load_file(str(tiny_gpt2_dir / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[n], exported[n]) for n in original)


def test_attention_edit_through_the_fused_qkv_matches_hf(model, tmp_path):
    """c_attn is what the bridge's q/k/v views read: the bridge and the HF export must agree."""
    tokens = model.to_tokens(PROMPTS)
    name = "transformer.h.0.attn.c_attn.weight"
    new = hf_state_dict(model)[name].clone()
    new[:, :64] *= 3.0  # the query columns
    edit = WeightEdit.from_new_tensors(model, {name: new}, kind="scale_queries")
    before = _logits(model, tokens)
    with edit.applied(model):
        bridge_logits = _logits(model, tokens)
    assert (bridge_logits - before).abs().max().item() > 1e-4
    out = export_hf(model, tmp_path / "x", edit=edit)
    assert (_hf_logits(out, tokens) - bridge_logits).abs().max().item() <= 1e-5


def test_export_refuses_a_wrong_base_and_a_non_empty_folder(model, tmp_path):
    other = mechedit.load(
        random_gpt2_checkpoint(tmp_path / "other", n_layer=2, n_embd=64, n_head=4, seed=3)
    )
    edit = zero_neurons(model, [(0, 1)])
    with pytest.raises(BaseModelMismatchError, match="check_base=False"):
        export_hf(other, tmp_path / "x", edit=edit)
    export_hf(other, tmp_path / "x", edit=edit, check_base=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hf(model, tmp_path / "x")
    export_hf(model, tmp_path / "x", overwrite=True)


# --- nn.Linear architectures: the same pipeline, the layout transposed ---------------------------


def _tiny_checkpoint(folder, arch):
    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                  pad_token_id=2)  # fmt: skip
    if arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **common))
    model.save_pretrained(str(folder))
    save_tokenizer(build_tokenizer(f"w{i}" for i in range(59)), folder)
    return folder


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_neuron_zeroing_and_export_on_linear_layout_models(arch, tmp_path):
    bridge = mechedit.load(_tiny_checkpoint(tmp_path / "ckpt", arch))
    tokens = bridge.to_tokens(PROMPTS)
    neurons = [(0, 2), (0, 127), (1, 64)]

    def zero(index):
        def hook(act, hook):
            act = act.clone()
            act[..., index] = 0.0
            return act

        return hook

    with torch.no_grad():
        expected = bridge.run_with_hooks(
            tokens,
            fwd_hooks=[
                ("blocks.0.mlp.hook_post", zero([2, 127])),
                ("blocks.1.mlp.hook_post", zero([64])),
            ],
        )
    edit = zero_neurons(bridge, neurons)
    layer0_in = next(
        n for n in edit.names if n.startswith(("gpt_neox.layers.0.", "model.layers.0."))
    )
    assert (
        edit.new_tensors[layer0_in].shape[0] == 128
    )  # nn.Linear [out=d_mlp, in=d_model]: a row per neuron
    with edit.applied(bridge):
        edited = _logits(bridge, tokens)
    assert (edited - expected).abs().max().item() <= 1e-6

    out = export_hf(bridge, tmp_path / "export", edit=edit)
    assert (_hf_logits(out, tokens) - edited).abs().max().item() <= 1e-5


def test_weights_the_bridge_copies_cannot_be_edited(tmp_path):
    """A NeoX bridge booted directly computes attention with its own q/k/v copies, not
    query_key_value; mechedit.load makes it compute with query_key_value itself."""
    from transformer_lens.model_bridge import TransformerBridge

    folder = _tiny_checkpoint(tmp_path / "ckpt", "gpt_neox")
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    raw = TransformerBridge.boot_transformers(str(folder))
    with pytest.raises(KeyError, match="own copies"):
        hf_parameter(raw, name)
    assert name in hf_state_dict(raw)

    bridge = mechedit.load(folder)
    tokens = bridge.to_tokens(PROMPTS)
    before = _logits(bridge, tokens)
    assert (before - _logits(raw, tokens)).abs().max().item() == 0.0  # same function
    qkv = hf_parameter(bridge, name)
    with torch.no_grad():
        qkv.mul_(0.5)
    assert (_logits(bridge, tokens) - before).abs().max().item() > 1e-3  # the edit is seen


# --- training through the bridge reaches the exported tensors ------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_one_training_step_through_the_bridge_exports_exactly(arch, tmp_path):
    """GPT-NeoX's bridge used to train private q/k/v copies: the export was 0.19 off in logits."""
    from mechedit.zoo.random_model import random_checkpoint

    folder = random_checkpoint(tmp_path / "ckpt", arch)
    bridge = mechedit.load(folder)
    tokens = bridge.to_tokens(PROMPTS)
    before = _logits(bridge, tokens)

    optimizer = torch.optim.SGD(bridge.parameters(), lr=1.0)
    bridge(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).mean().neg().backward()
    optimizer.step()
    trained = _logits(bridge, tokens)
    assert (trained - before).abs().max().item() > 1e-2  # the step changed the model

    exported = _hf_logits(export_hf(bridge, tmp_path / "export"), tokens)
    assert (exported - trained).abs().max().item() <= 1e-5

    replay = WeightEdit.from_diff(mechedit.load(folder), bridge)
    fresh = mechedit.load(folder)
    with replay.applied(fresh):
        assert (_logits(fresh, tokens) - trained).abs().max().item() <= 1e-5


def test_bert_zeroed_neurons_export_and_reload_in_transformers(tmp_path):
    from transformers import BertForMaskedLM

    from mechedit.zoo.random_model import random_checkpoint

    bridge = mechedit.load(random_checkpoint(tmp_path / "ckpt", "bert"))
    tokens = bridge.to_tokens(PROMPTS)
    edit = zero_neurons(bridge, [(0, 3), (1, 100), (1, 255)])
    assert "bert.encoder.layer.1.intermediate.dense.weight" in edit.names
    with edit.applied(bridge):
        edited = _logits(bridge, tokens)
    assert (edited - _logits(bridge, tokens)).abs().max().item() > 1e-5

    out = export_hf(bridge, tmp_path / "export", edit=edit)
    hf = BertForMaskedLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert (_hf_logits(hf, tokens) - edited).abs().max().item() <= 1e-5

    plain = export_hf(bridge, tmp_path / "plain")  # no edit: the model itself round-trips
    hf = BertForMaskedLM.from_pretrained(str(plain), attn_implementation="eager").eval()
    assert (_hf_logits(hf, tokens) - _logits(bridge, tokens)).abs().max().item() <= 1e-5


def test_the_core_imports_no_stage_and_export_lives_with_the_edits():
    import subprocess
    import sys

    core = "mechedit, mechedit.circuit, mechedit.components, mechedit.hf, mechedit.interventions, mechedit.models, mechedit.provenance, mechedit.scores, mechedit.metrics, mechedit.tokens"
    code = (
        f"import sys; import {core}; "
        "stages = [m for m in sys.modules if m.split('.')[:2] in (['mechedit', s] for s in ('edit', 'locate', 'evaluate', 'viz'))]; "
        "print(stages); sys.exit(1 if stages else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    package = Path(mechedit.__file__).parent
    assert not (package / "export.py").exists() and (package / "edit" / "export.py").is_file()


def test_export_of_a_recorded_training_run_matches_the_trained_model(model, tmp_path):
    tokens = model.to_tokens(PROMPTS)
    names = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.bias"]
    with WeightEdit.recording(model, names) as rec:
        params = [hf_parameter(model, n) for n in names]
        loss = model(tokens, return_type="loss")
        with torch.no_grad():
            for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                p -= 0.5 * g
    trained = _logits(model, tokens)
    rec.edit.revert(model)
    out = export_hf(model, tmp_path / "export", edit=rec.edit)
    assert (_hf_logits(out, tokens) - trained).abs().max().item() <= 1e-5
    assert (_logits(model, tokens) - trained).abs().max().item() > 1e-4  # the model was reverted
