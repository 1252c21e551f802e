"""Promoted tokens read from the raw HF weights by hand, and neuron heatmaps that stay
readable (sorted rows, binned wide axes) while still marking the right neurons."""

from __future__ import annotations

import pytest
import torch

import mechedit
from mechedit.components import Component
from mechedit.hf import hf_model, hf_parameters
from mechedit.scores import Scores
from mechedit.unembedding import neuron_logit_effects, promoted_tokens
from mechedit.viz import heatmap
from mechedit.zoo.random_model import random_checkpoint

# (architecture, HF name of the MLP's output weight, is it stored [in, out], final norm weight)
HF_NAMES = {
    "gpt2": ("transformer.h.{l}.mlp.c_proj.weight", True, "transformer.ln_f.weight"),
    "neox": ("gpt_neox.layers.{l}.mlp.dense_4h_to_h.weight", False, "gpt_neox.final_layer_norm.weight"),
    "llama": ("model.layers.{l}.mlp.down_proj.weight", False, "model.norm.weight"),
}


@pytest.mark.parametrize("arch", sorted(HF_NAMES))
def test_promoted_tokens_match_the_hf_weights_by_hand(tmp_path, arch):
    random_checkpoint(tmp_path, arch, n_layer=2, n_embd=64, n_head=4)
    model = mechedit.load(tmp_path)
    w_name, in_out, norm_name = HF_NAMES[arch]
    params = hf_parameters(model, tied_aliases=True)
    w_out = params[w_name.format(l=1)]
    rows = (w_out if in_out else w_out.T)[[3, 17]]  # [2, d_model]: what neurons 3 and 17 write
    unembed = hf_model(model).get_output_embeddings().weight  # [vocab, d_model]
    by_hand = (rows * params[norm_name]) @ unembed.T
    torch.testing.assert_close(neuron_logit_effects(model, 1, [3, 17]), by_hand.float(), rtol=1e-5, atol=1e-5)
    got = promoted_tokens(model, [Component("neuron", 1, neuron=3), Component("neuron", 1, neuron=17)], k=4, chunk=1)
    tok = model.tokenizer
    want = tuple(tok.convert_ids_to_tokens(by_hand[0].topk(4).indices.tolist()))
    assert got[Component("neuron", 1, neuron=3)] == want
    with pytest.raises(ValueError, match="MLP neurons"):
        promoted_tokens(model, [Component("head", 1, head=0)])
    with pytest.raises(ValueError, match="out of range"):
        neuron_logit_effects(model, 1, [10_000])


def _wide_scores(n_layers: int, n_neurons: int) -> Scores:
    values = torch.linspace(-1, 1, n_layers * n_neurons).reshape(n_layers, n_neurons).flip(1) * 0.01
    values[1, 5000 % n_neurons] = -3.0  # the one strong neuron, negative
    values[0, 7] = 2.0
    return Scores(values, ("layer", "neuron"), "neuron", "made-up")


def test_wide_heatmap_is_binned_and_keeps_the_strongest_neuron_of_each_bin():
    scores = _wide_scores(3, 11_008)
    mark = [Component("neuron", 1, neuron=5000), Component("neuron", 0, neuron=7)]
    fig = heatmap(scores, mark=mark, notes={mark[0]: "promotes: paris london"}, max_columns=4096)
    heat = fig.data[0]
    assert len(heat.x) == 3670  # bins of 3 neurons
    assert heat.z[1][5000 // 3] == pytest.approx(-3.0)  # the sign of the strongest entry is kept
    assert heat.customdata[1][5000 // 3] == "5000"
    marks = next(t for t in fig.data if t.name == "selected")
    assert list(marks.x) == [heat.x[5000 // 3], heat.x[7 // 3]]
    assert "promotes: paris london" in marks.text[0] and "<br>" not in marks.text[1]


def test_sorted_heatmap_puts_each_rows_largest_first_and_tracks_marks():
    scores = _wide_scores(2, 300)
    fig = heatmap(scores, order="sorted", mark=[Component("neuron", 1, neuron=5000 % 300)], max_columns=50)
    heat = fig.data[0]
    assert len(heat.x) == 50
    assert heat.z[0][0] == pytest.approx(2.0) and heat.customdata[0][0] == "7"
    row = torch.tensor(heat.z[1])
    assert torch.all(row.abs()[:-1] >= row.abs()[1:]) and row[0] == pytest.approx(-3.0)
    marks = next(t for t in fig.data if t.name == "selected")
    assert list(marks.x) == ["0"] and heat.customdata[1][0] == str(5000 % 300)
    with pytest.raises(ValueError, match="order"):
        heatmap(scores, order="by-layer")
