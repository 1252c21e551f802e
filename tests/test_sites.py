"""The per-architecture site table checked against real bridges of four architectures."""

from __future__ import annotations

import pytest
import torch

import mechedit
from mechedit import components as comp
from mechedit.components import SITES, Component
from mechedit.gradients import capture_activations
from mechedit.zoo.random_model import ARCHITECTURES, random_checkpoint

EXPECTED_MISSING = {
    "gpt2": set(),
    "neox": {"resid_mid", "pos_embed"},
    "llama": {"pos_embed"},
    "bert": {"embed", "attn_out", "resid_mid", "pattern"},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {
        arch: mechedit.load(random_checkpoint(tmp_path_factory.mktemp(arch), arch, n_layer=2, n_embd=32, n_head=4))
        for arch in ARCHITECTURES
    }


def _fired(model, tokens):
    """Every hook in hook_dict that fires on ``tokens``, with its shape (gated hooks skipped)."""
    shapes = {}

    def keep(name):
        def hook(activation, hook):  # noqa: ARG001
            shapes[name] = tuple(activation.shape)

        return hook

    handles = []
    for name, point in model.hook_dict.items():
        try:
            handles.append(point.add_hook(keep(name)))
        except ValueError:  # hooks gated behind set_use_* flags refuse to be added
            continue
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        model.reset_hooks()
    return shapes


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_site_table_matches_what_each_bridge_computes(models, arch):
    model = models[arch]
    cfg = model.cfg
    assert set(comp.missing_sites(model)) == EXPECTED_MISSING[arch]
    tokens = model.to_tokens("w1 w2 w3")
    fired = _fired(model, tokens)
    n_pos = tokens.shape[1]
    sizes = {"batch": 1, "pos": n_pos, "key_pos": n_pos, "d_model": cfg.d_model, "d_head": cfg.d_head}
    for site in comp.available_sites(model):
        spec = SITES[site]
        if spec.hook is None:
            continue
        for layer in range(cfg.n_layers) if spec.per_layer else [0]:
            name = comp.hook_name(site, layer)
            assert name in model.hook_dict and name in fired, (arch, name)
            dims = {**sizes, **({spec.index: comp.index_size(model, site)} if spec.index else {})}
            assert fired[name] == tuple(dims[d] for d in spec.dims), (arch, name)
    # sites the table calls missing are absent from hook_dict, or never fire, or (BERT) hold
    # something else than the name says -- checked by value in tests/test_checks.py
    for site in EXPECTED_MISSING[arch]:
        name = comp.hook_name(site, 0)
        if arch != "bert":
            assert name not in model.hook_dict or name not in fired, (arch, name)


def test_bert_hook_embed_is_the_normalised_embedding_sum(models):
    bert = models["bert"]
    names = ["hook_embed", "embed.hook_out", "blocks.0.hook_resid_pre"]
    acts = capture_activations(bert, bert.to_tokens("w1 w2 w3"), names).activations
    assert torch.equal(acts["hook_embed"], acts["blocks.0.hook_resid_pre"])
    assert (acts["hook_embed"] - acts["embed.hook_out"]).abs().max() > 0.1  # not the token rows


@pytest.mark.parametrize(
    ("arch", "component", "message"),
    [
        ("neox", Component("resid_mid", 0), r"GPT-NeoX computes attention and MLP in parallel.*use resid_pre / resid_post"),
        ("llama", Component("pos_embed", 0), r"Llama encodes positions by rotating queries and keys"),
        ("neox", Component("pos_embed", 0), r"GPT-NeoX encodes positions by rotating"),
        ("bert", Component("attn_out", 1), r"BERT is post-LayerNorm: its bridge's hook_attn_out is LN1"),
        ("bert", Component("pattern", 0, head=1), r"only observes it"),
    ],
)
def test_unavailable_sites_say_why(models, arch, component, message):
    with pytest.raises(ValueError, match=message):
        comp.validate(models[arch], component)
    with pytest.raises(ValueError, match=message):
        comp.require_site(models[arch], component.site)


def test_raw_hook_names_of_missing_sites(models):
    with pytest.raises(ValueError, match=r"'blocks\.1\.hook_resid_mid' is not in this model: GPT-NeoX computes"):
        comp.check_hook_name(models["neox"], "blocks.1.hook_resid_mid")
    # present in hook_dict but never run on Llama: the capture says so, with the reason
    with pytest.raises(RuntimeError, match="did not fire.*rotary"):
        capture_activations(models["llama"], models["llama"].to_tokens("w1"), ["hook_pos_embed"])


def test_embedding_sites_live_at_layer_zero(models):
    gpt2 = models["gpt2"]
    assert comp.hook_name("embed", 0) == "hook_embed"
    assert Component("pos_embed", 0).hook_name == "hook_pos_embed"
    assert comp.all_components(gpt2, "embed") == [Component("embed", 0)]
    assert comp.all_components(gpt2, "embed", layers=[1]) == []
    assert comp.site_axes("embed") == ("layer",)
    assert comp.site_axes("pattern") == ("layer", "head")
    with pytest.raises(ValueError, match="computed once, before the blocks, so its layer is always 0"):
        Component("embed", 1)
    with pytest.raises(ValueError, match="its layer is always 0"):
        comp.hook_name("pos_embed", 2)
    comp.validate_all(gpt2, [Component("embed", 0, pos=-1), Component("pattern", 1, head=3), Component("k", 0, head=0)])
    with pytest.raises(ValueError, match=r"head 4 out of range"):
        comp.validate(gpt2, Component("q", 0, head=4))


def test_grouped_query_attention_keys_have_their_own_head_count(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mechedit.zoo.tokenizer import SPECIAL_TOKENS, build_tokenizer, save_tokenizer

    tok = build_tokenizer(f"w{i}" for i in range(8))
    config = LlamaConfig(
        vocab_size=len(SPECIAL_TOKENS) + 8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=16,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    save_tokenizer(tok, tmp_path)
    model = mechedit.load(tmp_path)
    assert comp.index_size(model, "q") == 4 and comp.index_size(model, "k") == comp.index_size(model, "v") == 2
    acts = capture_activations(model, model.to_tokens("w1 w2"), ["blocks.0.attn.hook_k", "blocks.0.attn.hook_q"])
    assert acts.activations["blocks.0.attn.hook_k"].shape[2] == 2
    assert acts.activations["blocks.0.attn.hook_q"].shape[2] == 4
    with pytest.raises(ValueError, match=r"head 2 out of range: the model has 2 heads"):
        comp.validate(model, Component("v", 0, head=2))
