"""mechedit's exact activation patching equals TransformerLens 4.3's ``patching`` module.

TransformerLens runs one full forward per cell and reports ``metric(patched)``; mechedit reports
``metric(patched) - metric(base)``, so TL's values minus its metric on the unpatched corrupt run
must equal mechedit's scores (fast and naive) on GPT-2, GPT-NeoX and Llama. Both tools get the
same token tensors (GPT-NeoX's bridge prepends no BOS here, GPT-2's and Llama's do).

TL's functions run unchanged on a ``TransformerBridge``; the only workaround is TL's missing
per-neuron sweep, built from ``generic_activation_patch`` with a setter that patches one neuron
at one position and an explicit ``index_df`` of (layer, pos, neuron) cells.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

import mechedit
from mechedit.locate.activation_patching import activation_patching
from mechedit.prompts import PromptPair
from mechedit.tokens import tokenize_pairs
from mechedit.zoo.random_model import random_checkpoint

ARCHS = ("gpt2", "neox", "llama")
TOL = 1e-5

# Unpadded, same-length prompts; clean and corrupt differ at one or two word positions.
PAIRS = [
    PromptPair(clean="w1 w2 w3 w4 w5 w6", corrupt="w1 w9 w3 w4 w5 w6", answer="w7", wrong_answer="w8"),
    PromptPair(clean="w11 w12 w13 w14 w15 w16", corrupt="w11 w12 w19 w14 w15 w30", answer="w17", wrong_answer="w18"),
    PromptPair(clean="w21 w22 w23 w24 w25 w26", corrupt="w21 w42 w43 w24 w25 w26", answer="w27", wrong_answer="w28"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tl_models(tmp_path_factory) -> dict:
    root: Path = tmp_path_factory.mktemp("tl_patching")
    return {
        arch: mechedit.load(random_checkpoint(root / arch, arch, n_layer=2, n_embd=64, n_head=4, seed=3))
        for arch in ARCHS
    }


def _setup(model, direction: str = "denoising"):
    """Tokens, TL metric and TL inputs: (pairs batch, base tokens, other run's cache, metric, base metric)."""
    batch = tokenize_pairs(model, PAIRS)
    rows = torch.arange(len(PAIRS))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at_last = logits[rows, batch.last_positions]
        return (at_last[rows, batch.answer_ids] - at_last[rows, batch.wrong_ids]).mean()

    base, other = (
        (batch.corrupt_tokens, batch.clean_tokens) if direction == "denoising" else (batch.clean_tokens, batch.corrupt_tokens)
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(other)
        base_metric = metric(model(base))
    return batch, base, cache, metric, base_metric


def _neuron_pos_setter(corrupted_activation, index, clean_activation):
    """TL patch setter for one MLP neuron at one position: index = [layer, pos, neuron]."""
    _, pos, neuron = index
    corrupted_activation[:, pos, neuron] = clean_activation[:, pos, neuron]
    return corrupted_activation


def _check_equal(mine: torch.Tensor, theirs: torch.Tensor, floor: float = 1e-3) -> None:
    # the comparison must be able to fail: random models give effects well above the tolerance
    assert theirs.abs().max() > floor
    assert not torch.isnan(mine).any()
    assert (mine - theirs).abs().max() <= TOL, (mine - theirs).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_pre_and_heads_match_tl(tl_models, arch):
    model = tl_models[arch]
    batch, corrupt, clean_cache, metric, base = _setup(model)
    with torch.no_grad():
        tl_resid = tl_patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric) - base
        tl_head = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupt, clean_cache, metric) - base
    assert tl_resid.shape == (2, corrupt.shape[1])
    for method in ("fast", "naive"):
        resid = activation_patching(model, batch, method=method, progress=False)
        assert resid.axes == ("layer", "pos")
        _check_equal(resid.values, tl_resid)
        head = activation_patching(model, batch, site="head", method=method, progress=False)
        assert head.axes == ("layer", "head", "pos")
        _check_equal(head.values, tl_head.permute(0, 2, 1))  # TL: [layer, pos, head]


@pytest.mark.parametrize("arch", ARCHS)
def test_block_every_matches_tl(tl_models, arch):
    model = tl_models[arch]
    batch, corrupt, clean_cache, metric, base = _setup(model)
    with torch.no_grad():
        tl_every = tl_patching.get_act_patch_block_every(model, corrupt, clean_cache, metric) - base
    for i, site in enumerate(("resid_pre", "attn_out", "mlp_out")):
        mine = activation_patching(model, batch, site=site, method="fast", progress=False)
        _check_equal(mine.values, tl_every[i])


@pytest.mark.parametrize("arch", ARCHS)
def test_neurons_match_tl_generic_patch(tl_models, arch):
    model = tl_models[arch]
    batch, corrupt, clean_cache, metric, base = _setup(model)
    neurons, positions = (0, 5, model.cfg.d_mlp - 1), (1, 2, corrupt.shape[1] - 1)
    cells = pd.DataFrame(
        [(layer, pos, n) for layer in range(model.cfg.n_layers) for pos in positions for n in neurons],
        columns=["layer", "pos", "neuron"],
    )
    with torch.no_grad():
        tl_flat = tl_patching.generic_activation_patch(
            model, corrupt, clean_cache, metric, _neuron_pos_setter, "post", index_df=cells
        ) - base
    for method in ("fast", "naive"):
        mine = activation_patching(
            model, batch, site="neuron", units=neurons, positions=positions, method=method, progress=False
        )
        assert mine.axes == ("layer", "neuron", "pos")
        picked = mine.values[cells["layer"].tolist(), cells["neuron"].tolist(), cells["pos"].tolist()]
        _check_equal(picked, tl_flat, floor=2e-4)  # one of 256 neurons moves the metric little


@pytest.mark.parametrize("arch", ARCHS)
def test_noising_matches_tl_with_clean_and_corrupt_swapped(tl_models, arch):
    model = tl_models[arch]
    batch, clean, corrupt_cache, metric, base = _setup(model, direction="noising")
    with torch.no_grad():
        tl_resid = tl_patching.get_act_patch_resid_pre(model, clean, corrupt_cache, metric) - base
    mine = activation_patching(model, batch, direction="noising", method="fast", progress=False)
    _check_equal(mine.values, tl_resid)
    # the swap matters: the noising scores are not the denoising ones
    denoise = activation_patching(model, batch, method="fast", progress=False)
    assert (mine.values - denoise.values).abs().max() > 1e-3
