"""Attribution patching (nodes and neurons, AtP and integrated gradients): equal to
TransformerLens's node scores, first-order equal to exact patching, converging to it under
integrated gradients, and finding the fact world's planted layer by contrast."""

from __future__ import annotations

import random

import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import attribution_patch

import mechedit
from mechedit import zoo
from mechedit.locate import activation_patching, attribution_patching
from mechedit.prompts import PromptPair
from mechedit.tokens import tokenize_pairs
from mechedit.zoo.random_model import random_checkpoint

PAIRS = [
    PromptPair(clean="w1 w2 w3 w4 w5 w6", corrupt="w1 w2 w9 w10 w5 w6", answer="w20", wrong_answer="w21"),
    PromptPair(clean="w3 w2 w3 w8 w5 w7", corrupt="w3 w2 w11 w12 w5 w7", answer="w22", wrong_answer="w23"),
]


@pytest.fixture(scope="module", params=["gpt2", "neox", "llama"])
def arch_model(request, tmp_path_factory):
    folder = random_checkpoint(tmp_path_factory.mktemp(request.param), request.param, n_layer=2, n_embd=64, n_head=4, seed=5)
    return mechedit.load(folder)


def test_node_scores_equal_transformerlens(arch_model):
    model = arch_model
    batch = tokenize_pairs(model, PAIRS)
    largest = 0.0
    # per pair: run ours on one pair at a time and compare exactly
    for i in range(len(PAIRS)):
        answer, wrong = int(batch.answer_ids[i]), int(batch.wrong_ids[i])
        tl = attribution_patch(model, batch.clean_tokens[i : i + 1], batch.corrupt_tokens[i : i + 1],
                               lambda logits, a=answer, w=wrong: (logits[:, -1, a] - logits[:, -1, w]).sum())
        one = attribution_patching(model, PAIRS[i : i + 1], sites=("embed", "head", "mlp_out"), progress=False)
        worst = 0.0
        for node, score in tl.node_scores.items():
            if node.kind == "embed":
                mine = one["embed"].values[0, node.position]
            elif node.kind == "attn_head_out":
                mine = one["head"].values[node.layer, node.head, node.position]
            else:
                mine = one["mlp_out"].values[node.layer, node.position]
            worst = max(worst, abs(float(mine) - score))
            largest = max(largest, abs(score))
        assert worst <= 1e-5
    assert largest > 1e-3


def test_first_order_equals_exact_patching_of_a_small_step(tmp_path):
    """AtP is the derivative of exact patching along (other - base): check it per neuron."""
    model = mechedit.load(random_checkpoint(tmp_path, "gpt2", n_layer=2, n_embd=64, n_head=4, seed=5))
    model = model.to(torch.float64)
    batch = tokenize_pairs(model, PAIRS[:1])
    atp = attribution_patching(model, batch, sites=("neuron",), progress=False)
    name = "blocks.0.mlp.hook_post"
    acts = {}
    for which, tokens in (("clean", batch.clean_tokens), ("corrupt", batch.corrupt_tokens)):
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, lambda a, hook, w=which: acts.__setitem__(w, a.clone()))]):
            model(tokens)
    delta = acts["clean"] - acts["corrupt"]
    answer, wrong = int(batch.answer_ids[0]), int(batch.wrong_ids[0])

    def ld(neuron=None, pos=None, eps=0.0):
        def bump(a, hook):
            a = a.clone()
            a[:, pos, neuron] += eps * delta[:, pos, neuron]
            return a

        hooks = [] if neuron is None else [(name, bump)]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(batch.corrupt_tokens)[0, -1]
        return float(logits[answer] - logits[wrong])

    base = ld()
    scores = atp["neuron"].values[0]  # [neuron, pos]
    top = scores.abs().flatten().topk(5).indices
    eps = 1e-4
    for flat in top.tolist():
        neuron, pos = divmod(flat, scores.shape[1])
        fd = (ld(neuron, pos, eps) - base) / eps
        assert fd == pytest.approx(float(scores[neuron, pos]), rel=1e-3, abs=1e-9)


def test_integrated_gradients(arch_model):
    model = arch_model
    one = attribution_patching(model, PAIRS, sites=("head",), ig_steps=1, progress=False)
    plain = attribution_patching(model, PAIRS, sites=("head",), progress=False)
    torch.testing.assert_close(one["head"].values, plain["head"].values)
    # "activations" IG: the cells of a whole hook sum to the exact effect of patching it (completeness)
    exact = activation_patching(model, PAIRS[1:], site="resid_pre", per_position=False, progress=False, hook_check=False)
    errors = []
    for k in (4, 64):
        ig = attribution_patching(model, PAIRS[1:], sites=("resid_pre",), ig_steps=k, ig_mode="activations",
                                  per_position=False, progress=False)
        errors.append((ig["resid_pre"].values - exact.values).abs().max().item())
    # a left Riemann sum: the error shrinks like 1/k
    assert errors[1] <= errors[0] / 8 and errors[1] <= 0.05 * exact.values.abs().max().item(), errors
    inputs = attribution_patching(model, PAIRS, sites=("head", "mlp_out"), ig_steps=5, progress=False)
    assert inputs.config["ig_steps"] == 5 and not torch.equal(inputs["head"].values, plain["head"].values)


def test_bad_input(arch_model):
    model = arch_model
    with pytest.raises(ValueError, match="ig_steps"):
        attribution_patching(model, PAIRS, ig_steps=0)
    with pytest.raises(ValueError, match="empty"):
        attribution_patching(model, [])
    with pytest.raises(ValueError, match="cannot score site"):
        attribution_patching(model, PAIRS, sites=("pattern",))
    with pytest.raises(ValueError, match="one value per row"):
        attribution_patching(model, PAIRS, sites=("head",), metric=lambda lg, a, w: lg.sum(), progress=False)
    with pytest.raises(ValueError, match="same length|token length|tokenis"):
        attribution_patching(model, [PromptPair(clean="w1 w2 w3", corrupt="w1 w2", answer="w4", wrong_answer="w5")])
    model.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            attribution_patching(model, PAIRS)
    finally:
        model.eval()


def _fact_pairs(world, facts, pool, rng):
    from mechedit.zoo.world import fill

    out = []
    for fact in facts:
        partner = rng.choice([g for g in pool if g.relation_id == fact.relation_id and g.subject != fact.subject and g.value != fact.value])
        template = world.relation[fact.relation_id].train_templates[1]  # "the <relation> of {} is"
        out.append(PromptPair(clean=fill(template, fact.subject), corrupt=fill(template, partner.subject),
                              answer=fact.value, wrong_answer=partner.value))
    return out


@pytest.fixture(scope="module")
def planted_world():
    name = "factworld-planted"
    model, world = mechedit.load(name), zoo.load_world(name)
    rng = random.Random(0)
    planted = _fact_pairs(world, world.planted_facts, world.planted_facts, rng)
    control = _fact_pairs(world, rng.sample(world.facts, 20), world.facts, rng)
    exact = {site: activation_patching(model, planted, site=site, progress=False, hook_check=False)
             for site in ("head", "resid_pre")}
    return model, zoo.metadata(name)["planted_layer"], planted, control, exact


def _correlations(exact, atp):
    return {site: torch.corrcoef(torch.stack([exact[site].values.flatten(), atp[site].values.flatten()]))[0, 1].item()
            for site in exact}


def test_integrated_gradients_agree_with_exact_patching_on_the_fact_world(planted_world):
    """Measured: Pearson with exact patching, heads / per-position resid_pre: IG (inputs, k=5)
    0.947 / 0.982; IG (activations, k=5) 0.941 / 0.990."""
    model, _, planted, _, exact = planted_world
    ig = attribution_patching(model, planted, sites=("head", "resid_pre"), ig_steps=5, progress=False)
    correlations = _correlations(exact, ig)
    assert min(correlations.values()) >= 0.9, correlations


@pytest.mark.xfail(strict=True, reason=(
    "plain AtP on the fact world: Pearson with exact patching 0.547 (heads), 0.673 (per-position "
    "resid_pre); the logit difference saturates (corrupt -6.4 nats to clean +7.0), which a first-"
    "order estimate cannot follow; integrated gradients (k=5) reach 0.947 / 0.982"))
def test_plain_atp_agrees_with_exact_patching_on_the_fact_world(planted_world):
    model, _, planted, _, exact = planted_world
    atp = attribution_patching(model, planted, sites=("head", "resid_pre"), progress=False)
    correlations = _correlations(exact, atp)
    assert min(correlations.values()) >= 0.9, correlations


def test_contrast_puts_the_planted_layer_first(planted_world):
    model, layer, planted, control, _ = planted_world
    contrast = attribution_patching(model, planted, sites=("mlp_out",), per_position=False, control=control, progress=False)
    assert int(contrast["mlp_out"].values.argmax()) == layer, contrast["mlp_out"].values.tolist()


def test_verification_diagnostic_patches_the_estimates_top_cells(arch_model):
    from mechedit.evaluate import verify_attribution

    model = arch_model
    atp = attribution_patching(model, PAIRS, sites=("head", "mlp_out"), progress=False)
    check = verify_attribution(model, PAIRS, atp["head"], top_k=5, n_random=6, seed=1)
    assert len(check.components) == 11 and check.n_top == 5
    assert all(c.site == "head" and c.pos is not None for c in check.components)
    # the exact column really is exact patching of those cells
    exact = activation_patching(model, PAIRS, site="head", progress=False, hook_check=False)
    want = torch.stack([exact.values[c.layer, c.head, c.pos] for c in check.components]).double()
    torch.testing.assert_close(check.exact, want, atol=1e-6, rtol=0)
    assert check.pearson > 0.9 and 0 <= check.top_k_recall <= 1 and check.relative_l1 >= 0
    again = verify_attribution(model, PAIRS, atp["head"], top_k=5, n_random=6, seed=1)
    assert again.components == check.components
    whole = verify_attribution(model, PAIRS, attribution_patching(model, PAIRS, sites=("mlp_out",), per_position=False, progress=False)["mlp_out"], top_k=1, n_random=5)
    assert len(whole.components) == 2  # only two layers to check


def test_grad_drop_blocks_one_layer_at_a_time(arch_model):
    """GradDrop is the mean over layers of |AtP| with that layer's residual writes blocked:
    recompute it by hand from per-layer runs and compare; last-layer nodes, whose only path to
    the logits is direct, keep their plain |AtP| score scaled by (L - 1 + ...) terms."""
    from mechedit.gradients import activations_and_gradients, capture_activations

    model = arch_model
    batch = tokenize_pairs(model, PAIRS)
    gd = attribution_patching(model, batch, sites=("mlp_out",), grad_drop=True, per_position=False, progress=False)
    plain = attribution_patching(model, batch, sites=("mlp_out",), per_position=False, progress=False)
    n_layers = int(model.cfg.n_layers)
    names = [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    clean = capture_activations(model, batch.clean_tokens, names).activations
    rows = torch.arange(len(PAIRS))

    def total(logits):
        read = logits[rows, batch.last_positions]
        return (read.gather(1, batch.answer_ids[:, None]) - read.gather(1, batch.wrong_ids[:, None])).sum()

    want = torch.zeros(len(PAIRS), n_layers)
    for dropped in range(n_layers):
        block = [(f"blocks.{dropped}.{h}", lambda a, hook: a.detach()) for h in ("hook_attn_out", "hook_mlp_out")]
        with model.hooks(fwd_hooks=block):
            cap = activations_and_gradients(model, batch.corrupt_tokens, names, total, allow_unused=True)
        for layer, n in enumerate(names):
            want[:, layer] += ((clean[n] - cap.activations[n]) * cap.gradients[n]).sum((1, 2)).abs()
    want = (want / (n_layers - 1)).mean(0)
    torch.testing.assert_close(gd["mlp_out"].values, want, atol=1e-6, rtol=1e-5)
    assert bool((gd["mlp_out"].values >= 0).all()) and not torch.allclose(gd["mlp_out"].values, plain["mlp_out"].values.abs())
    with pytest.raises(ValueError, match="grad_drop"):
        attribution_patching(model, batch, grad_drop=True, ig_steps=3)
