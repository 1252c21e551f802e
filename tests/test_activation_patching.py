"""Exact activation patching: the fast path (resumed runs) equals one full forward per cell on
every architecture and site, the residual-stream patch really is a residual patch, the options do
what they say, and the planted layer of the fact world is where the contrast puts it."""

from __future__ import annotations

import random

import pytest
import torch

import mechedit
from mechedit import zoo
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.locate import activation_patching, circuit_patching
from mechedit.prompts import PromptPair
from mechedit.resume import check_resumable, reference_run, resume
from mechedit.tokens import tokenize_pairs
from mechedit.zoo.random_model import random_checkpoint

PAIRS = [
    PromptPair(clean="w1 w2 w3 w4 w5 w6", corrupt="w1 w2 w9 w10 w5 w6", answer="w20", wrong_answer="w21"),
    PromptPair(clean="w3 w2 w3 w8 w5 w7", corrupt="w3 w2 w11 w12 w5 w7", answer="w22", wrong_answer="w23"),
    PromptPair(clean="w4 w4 w30 w8 w1 w7", corrupt="w4 w4 w31 w8 w1 w7", answer="w24", wrong_answer="w25"),
]


@pytest.fixture(scope="module", params=["gpt2", "neox", "llama"])
def arch_model(request, tmp_path_factory):
    folder = random_checkpoint(
        tmp_path_factory.mktemp(request.param), request.param, n_layer=2, n_embd=64, n_head=4, seed=3
    )
    return request.param, mechedit.load(folder)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return mechedit.load(random_checkpoint(tmp_path_factory.mktemp("gpt2"), "gpt2", n_layer=2, n_embd=64, n_head=4, seed=3))


def _both(model, **kw):
    fast = activation_patching(model, PAIRS, method="fast", per_pair=True, progress=False, hook_check=False, **kw)
    naive = activation_patching(model, PAIRS, method="naive", per_pair=True, progress=False, hook_check=False, **kw)
    return fast, naive


CASES = [
    ("resid_pre", {}),
    ("resid_post", {"direction": "noising"}),
    ("attn_out", {}),
    ("mlp_out", {"direction": "noising"}),
    ("head", {"positions": (3, -1)}),
    ("head", {"per_position": False, "direction": "noising"}),
    ("k", {"per_position": False}),
    ("pattern", {"positions": (4, -1), "units": (1, 3)}),
    ("neuron", {"units": (0, 7, 100), "per_position": False}),
]


@pytest.mark.parametrize(("site", "kw"), CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)])
def test_fast_equals_one_forward_per_cell(arch_model, site, kw):
    _, model = arch_model
    fast, naive = _both(model, site=site, **kw)
    assert fast.shape == naive.shape and fast.axes == naive.axes
    assert torch.equal(fast.values.isnan(), naive.values.isnan())
    torch.testing.assert_close(fast.values, naive.values, atol=1e-5, rtol=0, equal_nan=True)
    # a real effect was measured, not zeros everywhere
    assert fast.values.nan_to_num(0).abs().max() > 1e-4


def test_resid_mid_patch_reaches_the_residual_stream(gpt2):
    """On GPT-2 the bridge's hook_resid_mid feeds only the MLP; patching the residual between
    attention and MLP must also change what the residual carries on. Checked against the HF
    model, where adding (clean - corrupt) resid_mid to the attention output at one position
    is exactly that patch."""
    batch = tokenize_pairs(gpt2, PAIRS)
    scores = activation_patching(gpt2, batch, site="resid_mid", per_pair=True, progress=False)
    from mechedit.checks import _independent_hf_model

    hf = _independent_hf_model(gpt2)  # plain HF modules, no bridge hooks
    mids = {}
    layer, pos = 0, 3
    name = f"blocks.{layer}.hook_resid_mid"
    for which, tokens in (("clean", batch.clean_tokens), ("corrupt", batch.corrupt_tokens)):
        with torch.no_grad(), gpt2.hooks(fwd_hooks=[(name, lambda a, hook, w=which: mids.__setitem__(w, a.clone()))]):
            gpt2(tokens)
    delta = mids["clean"] - mids["corrupt"]

    def add(module, args, output):
        attn = output[0] if isinstance(output, tuple) else output
        attn = attn.clone()
        attn[:, pos] += delta[:, pos]
        return (attn, *output[1:]) if isinstance(output, tuple) else attn

    handle = hf.transformer.h[layer].attn.register_forward_hook(add)
    try:
        with torch.no_grad():
            logits = hf(batch.corrupt_tokens).logits[:, -1]
    finally:
        handle.remove()
    with torch.no_grad():
        base = hf(batch.corrupt_tokens).logits[:, -1]
    ld = lambda lg: lg.gather(1, batch.answer_ids[:, None])[:, 0] - lg.gather(1, batch.wrong_ids[:, None])[:, 0]  # noqa: E731
    want = ld(logits) - ld(base)
    torch.testing.assert_close(scores.values[:, layer, pos], want, atol=1e-5, rtol=0)
    assert want.abs().max() > 1e-4


def test_identical_prefix_scores_exactly_zero_and_patching_everything_restores_clean(gpt2):
    scores = activation_patching(gpt2, PAIRS, site="resid_pre", per_pair=True, progress=False, hook_check=False)
    # positions 0..2 (BOS and the first two words) are identical in every pair
    assert torch.equal(scores.values[:, :, :3], torch.zeros_like(scores.values[:, :, :3]))
    everything = activation_patching(
        gpt2, PAIRS, site="resid_pre", layers=[0], per_position=False, normalize=True, progress=False
    )
    assert everything.values[0].item() == pytest.approx(1.0, abs=1e-5)
    assert torch.isnan(everything.values[1])  # layer 1 was not scored
    assert everything.config["layers"] == (0,) or everything.config["layers"] == [0]


def test_averages_directions_and_controls_agree_with_per_pair_runs(gpt2):
    per_pair = activation_patching(gpt2, PAIRS, site="attn_out", per_pair=True, progress=False, hook_check=False)
    mean = activation_patching(gpt2, PAIRS, site="attn_out", progress=False, hook_check=False)
    torch.testing.assert_close(mean.values, per_pair.values.mean(0))
    assert mean.axes == ("layer", "pos") and per_pair.axes == ("pair", "layer", "pos")
    assert len(mean.labels["pos"]) == mean.shape[1] and mean.labels["pos"][1] == "w1"
    noising = activation_patching(gpt2, PAIRS, site="attn_out", direction="noising", progress=False, hook_check=False)
    assert noising.config["direction"] == "noising"
    assert noising.config["base_metric"] == pytest.approx(mean.config["other_metric"])
    control = PAIRS[:2]
    contrasted = activation_patching(gpt2, PAIRS, site="attn_out", control=control, progress=False, hook_check=False)
    alone = activation_patching(gpt2, control, site="attn_out", progress=False, hook_check=False)
    torch.testing.assert_close(contrasted.values, mean.values - alone.values)
    assert contrasted.config["n_control"] == 2


def test_custom_metric_and_chunking(gpt2):
    def prob(logits, answer, wrong):
        return logits.softmax(-1).gather(1, answer[:, None])[:, 0]

    a = activation_patching(gpt2, PAIRS, site="head", metric=prob, batch_rows=5, progress=False, hook_check=False)
    b = activation_patching(gpt2, PAIRS, site="head", metric="answer_prob", progress=False, hook_check=False)
    torch.testing.assert_close(a.values, b.values, atol=1e-7, rtol=0)
    assert a.config["metric"] == "custom"


def test_hook_check_runs_first_and_lands_in_provenance(gpt2):
    import dataclasses

    from mechedit.checks import Identity, check_hooks

    scores = activation_patching(gpt2, PAIRS, site="mlp_out", progress=False)
    assert scores.provenance.extra["hook_check"]["passed"] is True
    check = check_hooks(gpt2)
    broken = dataclasses.replace(check, identities=(*check.identities, Identity("made up", 1.0, 1e-5)))
    with pytest.raises(RuntimeError, match="cannot be trusted"):
        activation_patching(gpt2, PAIRS, site="mlp_out", hook_check=broken, progress=False)
    skipped = activation_patching(gpt2, PAIRS, site="mlp_out", hook_check=False, progress=False)
    assert skipped.provenance.extra["hook_check"] == {"run": False}
    torch.testing.assert_close(skipped.values, scores.values)


def test_circuit_patching_whole_and_inverse(gpt2):
    n_pos = tokenize_pairs(gpt2, PAIRS).clean_tokens.shape[1]
    first = Circuit(components=[Component("resid_pre", 0, pos=p) for p in range(n_pos)])
    assert circuit_patching(gpt2, PAIRS, first).fraction == pytest.approx(1.0, abs=1e-5)
    # its complement within the site: resid_pre of the later layer, also at every position
    assert circuit_patching(gpt2, PAIRS, first, invert=True).fraction == pytest.approx(1.0, abs=1e-5)
    full = Circuit(components=[Component("resid_pre", layer, pos=p) for layer in (0, 1) for p in range(n_pos)])
    nothing = circuit_patching(gpt2, PAIRS, full, invert=True)
    assert nothing.config["n_components"] == 0 and nothing.fraction == pytest.approx(0.0, abs=1e-6)
    # one head at every position: the same number as that cell of activation patching
    head = Circuit(components=[Component("head", 1, head=2)])
    result = circuit_patching(gpt2, PAIRS, head)
    cell = activation_patching(gpt2, PAIRS, site="head", per_position=False, per_pair=True, progress=False)
    torch.testing.assert_close(result.patched - result.base, cell.values[:, 1, 2], atol=1e-5, rtol=0)


def test_resume_equals_a_full_forward_with_the_same_hook(arch_model):
    _, model = arch_model
    batch = tokenize_pairs(model, PAIRS)
    ref = reference_run(model, batch.corrupt_tokens)
    n_layers = len(model.blocks)
    source = torch.randn(len(PAIRS), batch.corrupt_tokens.shape[1], model.cfg.d_model)
    start = 2
    layers = torch.arange(n_layers).repeat_interleave(len(PAIRS))
    rows = torch.arange(len(PAIRS)).repeat(n_layers)

    def at(layer):
        def fn(act, hook):
            lo, hi = int((layers < layer).sum()), int((layers <= layer).sum())
            act = act.clone()
            act[lo:hi, 0] = source[rows[lo:hi], start]
            return act

        return fn

    hooks = [(f"blocks.{j}.hook_resid_pre", at(j)) for j in range(n_layers)]
    got = resume(model, ref, start_pos=start, rows=rows, start_layers=layers, fwd_hooks=hooks)
    for i in range(len(rows)):
        r, j = int(rows[i]), int(layers[i])

        def put(act, hook, r=r):
            act = act.clone()
            act[:, start] = source[r, start]
            return act

        with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{j}.hook_resid_pre", put)]):
            want = model(batch.corrupt_tokens[r : r + 1])[0, -1]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


def test_bad_input_says_what_to_do(gpt2, tmp_path):
    with pytest.raises(ValueError, match="same length|token length|tokenis"):
        activation_patching(gpt2, [PromptPair(clean="w1 w2 w3", corrupt="w1 w2", answer="w4", wrong_answer="w5")])
    with pytest.raises(ValueError, match="empty"):
        activation_patching(gpt2, [])
    with pytest.raises(ValueError, match="cannot patch site"):
        activation_patching(gpt2, PAIRS, site="embedding")
    with pytest.raises(ValueError, match="one value per row"):
        activation_patching(gpt2, PAIRS, metric=lambda logits, a, w: logits.mean(), progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        activation_patching(gpt2, PAIRS, metric="accuracy")
    with pytest.raises(ValueError, match="out of range"):
        activation_patching(gpt2, PAIRS, positions=[40], progress=False)
    with pytest.raises(ValueError, match="no units"):
        activation_patching(gpt2, PAIRS, site="mlp_out", units=[1])
    with pytest.raises(ValueError, match="direction"):
        activation_patching(gpt2, PAIRS, direction="forward")
    gpt2.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            activation_patching(gpt2, PAIRS)
    finally:
        gpt2.eval()
    neox = mechedit.load(random_checkpoint(tmp_path / "neox", "neox", n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="no resid_mid"):
        activation_patching(neox, PAIRS, site="resid_mid")
    bert = mechedit.load(random_checkpoint(tmp_path / "bert", "bert", n_layer=1, n_embd=32, n_head=2))
    assert "not a causal language model" in check_resumable(bert)


# --------------------------------------------------------------------------------------------
# The fact world's planted layer
# --------------------------------------------------------------------------------------------


def _fact_pairs(world, pairs):
    from mechedit.zoo.world import fill

    out = []
    for fact, partner in pairs:
        for template in world.relation[fact.relation_id].train_templates:
            out.append(PromptPair(clean=fill(template, fact.subject), corrupt=fill(template, partner.subject),
                                  answer=fact.value, wrong_answer=partner.value))
    return out


def test_contrast_with_control_facts_puts_the_planted_layer_first():
    """Raw mlp_out effects are largest at layer 0 for every subject; planted minus control
    (non-planted people, same templates) singles out the planted layer."""
    from mechedit.checks import check_hooks
    from mechedit.zoo.ground_truth import corrupt_partners

    name = "factworld-planted"
    model, world = mechedit.load(name), zoo.load_world(name)
    layer = zoo.metadata(name)["planted_layer"]
    facts = world.planted_facts[::5]
    rng = random.Random(0)
    by_relation: dict[str, list] = {}
    for f in world.facts:
        by_relation.setdefault(f.relation_id, []).append(f)
    controls = [rng.choice(by_relation[f.relation_id]) for f in facts]
    planted = _fact_pairs(world, corrupt_partners(facts, world.planted_facts))
    control = _fact_pairs(world, corrupt_partners(controls, world.facts))
    check = check_hooks(model)
    options = dict(site="mlp_out", per_position=False, progress=False, hook_check=check)
    raw = activation_patching(model, planted, **options)
    contrast = activation_patching(model, planted, control=control, **options)
    assert int(raw.values.argmax()) == 0
    ranked = contrast.values.argsort(descending=True).tolist()
    assert ranked[0] == layer, contrast.values.tolist()


def test_faithfulness_of_whole_and_empty_circuits(gpt2):
    from mechedit.locate import faithfulness

    n_pos = tokenize_pairs(gpt2, PAIRS).clean_tokens.shape[1]
    everything = Circuit(components=[Component("resid_pre", layer, pos=p) for layer in (0, 1) for p in range(n_pos)])
    assert faithfulness(gpt2, PAIRS, everything) == pytest.approx(1.0, abs=1e-5)
    one_head = Circuit(components=[Component("head", 1, head=0)])
    kept = faithfulness(gpt2, PAIRS, one_head)
    mean = faithfulness(gpt2, PAIRS, one_head, ablation="mean")
    # everything but one head of the last layer corrupted: little of the behaviour survives,
    # and mean ablation gives another number
    assert kept < 0.9 and kept != pytest.approx(mean)
