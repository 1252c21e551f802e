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
from mechedit.edges import tl_node_label
from mechedit.locate import (
    activation_patching,
    attribution_patching,
    edge_attribution_patching,
    edge_faithfulness,
)
from mechedit.prompts import PromptPair
from mechedit.tokens import tokenize_pairs
from mechedit.zoo.prompts import fact_pairs
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


@pytest.fixture(scope="module")
def planted_world():
    name = "factworld-planted"
    model, world = mechedit.load(name), zoo.load_world(name)
    rng = random.Random(0)
    planted = fact_pairs(world, world.planted_facts, pool=world.planted_facts, rng=rng)
    control = fact_pairs(world, rng.sample(world.facts, 20), rng=rng)
    exact = {site: activation_patching(model, planted, site=site, progress=False, hook_check=False)
             for site in ("head", "resid_pre", "q")}
    return model, zoo.metadata(name)["planted_layer"], planted, control, exact


def _correlations(exact, atp):
    return {site: torch.corrcoef(torch.stack([exact[site].values.flatten(), atp[site].values.flatten()]))[0, 1].item()
            for site in exact if site in atp.scores}


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


# --- edges (EAP) --------------------------------------------------------------------------------


def test_edge_scores_equal_transformerlens(arch_model):
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig

    model = arch_model
    batch = tokenize_pairs(model, PAIRS)
    for i in range(len(PAIRS)):
        a, w = int(batch.answer_ids[i]), int(batch.wrong_ids[i])
        tl = attribution_patch(model, batch.clean_tokens[i : i + 1], batch.corrupt_tokens[i : i + 1],
                               lambda logits, a=a, w=w: (logits[:, -1, a] - logits[:, -1, w]).sum(),
                               EdgeAttributionConfig(granularity="edge"))
        mine = edge_attribution_patching(model, PAIRS[i : i + 1], per_position=True, progress=False, hook_check=False)
        assert int(mine.mask.sum()) * batch.clean_tokens.shape[1] == len(tl.edge_scores)
        ours = torch.tensor([
            float(mine.values[wn.position, mine.writers.index(tl_node_label(wn)), mine.readers.index(tl_node_label(rn))])
            for wn, rn in tl.edge_scores
        ])
        theirs = torch.tensor(list(tl.edge_scores.values()))
        assert theirs.abs().max() > 1e-3
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ig_steps", [1, 3])
def test_edges_out_of_a_writer_sum_to_its_node_score(arch_model, ig_steps):
    """Every writer feeds the logits, so its outgoing edges add up to its node AtP score."""
    model = arch_model
    edges = edge_attribution_patching(model, PAIRS, ig_steps=ig_steps, progress=False, hook_check=False)
    nodes = attribution_patching(model, PAIRS, sites=("embed", "head", "mlp_out"), per_position=False,
                                 ig_steps=ig_steps, progress=False, hook_check=False)
    sums = edges.writer_scores()
    want = {"embed": float(nodes["embed"].values[0])}
    for layer in range(int(model.cfg.n_layers)):
        want[f"m{layer}"] = float(nodes["mlp_out"].values[layer])
        for head in range(int(model.cfg.n_heads)):
            want[f"a{layer}.h{head}"] = float(nodes["head"].values[layer, head])
    assert max(abs(sums[k] - v) for k, v in want.items()) <= 1e-5 * max(1.0, max(abs(v) for v in want.values()))


def test_edge_faithfulness_is_exact_and_equals_transformerlens(arch_model):
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig
    from transformer_lens.tools.analysis.attribution_patching import faithfulness as tl_faithfulness

    model = arch_model
    edges = edge_attribution_patching(model, PAIRS, progress=False, hook_check=False)
    every = [(w, r) for i, w in enumerate(edges.writers) for j, r in enumerate(edges.readers) if edges.mask[i, j]]
    assert edge_faithfulness(model, PAIRS, every).recovered == pytest.approx(1.0, abs=1e-5)
    assert edge_faithfulness(model, PAIRS, []).recovered == pytest.approx(0.0, abs=1e-4)
    # TransformerLens's per-position edges, every position of the 30 strongest labelled edges
    batch = tokenize_pairs(model, PAIRS[:1])
    a, w = int(batch.answer_ids[0]), int(batch.wrong_ids[0])

    def metric(logits):
        return (logits[:, -1, a] - logits[:, -1, w]).sum()

    tl = attribution_patch(model, batch.clean_tokens, batch.corrupt_tokens, metric, EdgeAttributionConfig(granularity="edge"))
    chosen = {(tl_node_label(wn), tl_node_label(rn)) for wn, rn, _ in tl.top_edges(30)}
    theirs = tl_faithfulness(model, batch.clean_tokens, batch.corrupt_tokens, metric,
                             [e for e in tl.edge_scores if (tl_node_label(e[0]), tl_node_label(e[1])) in chosen])
    ours = edge_faithfulness(model, PAIRS[:1], sorted(chosen))
    assert ours.recovered == pytest.approx(theirs.recovered, abs=1e-4)
    assert ours.n_edges == len(chosen) < ours.total_edges


def test_edge_circuits_greedy_top_and_saved(arch_model, tmp_path):
    from mechedit.circuit import Circuit

    model = arch_model
    edges = edge_attribution_patching(model, PAIRS, progress=False, hook_check=False)
    greedy = edges.greedy_edges(12)
    assert len(greedy) == 12 and greedy[0][1] == "logits"
    open_readers = {"logits"}
    for writer, reader, _ in greedy:  # each edge joins a reader already connected to the logits
        assert reader in open_readers
        open_readers |= {r for r in edges.readers if r == writer or r.rsplit(".", 1)[0] == writer}
    top = edges.top_edges(5)
    assert [abs(s) for *_, s in top] == sorted((abs(s) for *_, s in top), reverse=True)
    circuit = edges.circuit(12)
    loaded = Circuit.load(circuit.save(tmp_path / "edges.json"))
    assert loaded.config["selection"]["edges"] == [list(e) for e in greedy]
    assert edge_faithfulness(model, PAIRS, loaded).n_edges == 12
    with pytest.raises(ValueError, match="not an edge"):
        edge_faithfulness(model, PAIRS, [("m1", "a0.h0.q")])
    with pytest.raises(ValueError, match="not a writer"):
        edge_faithfulness(model, PAIRS, [("mlp7", "logits")])
    with pytest.raises(ValueError, match="positive int"):
        edges.top_edges(0)


def test_edges_refuse_post_ln_models(tmp_path):
    bert = mechedit.load(random_checkpoint(tmp_path, "bert", n_layer=2, n_embd=64, n_head=4))
    pair = [PromptPair(clean="w1 <mask>", corrupt="w2 <mask>", answer="w3", wrong_answer="w4")]
    with pytest.raises(ValueError, match="pre-norm"):
        edge_attribution_patching(bert, pair, progress=False)


def test_eap_ig_circuit_carries_the_planted_facts(planted_world):
    """Measured on the shipped planted model (20 planted facts; share of the logit-difference gap
    kept, greedy circuits): EAP-IG (k=5) 0.22 / 0.54 / 0.60 / 0.79 / 0.90 with 10 / 20 / 30 / 50 /
    100 edges; plain EAP 0 / 0.15 / 0.49 / 0.73 / 0.85; random edges 0 (no edge from the embedding:
    the run is exactly the corrupt one). IG's lead is at small circuits; the test takes 20 edges.
    (The model before issue 7: IG 0.10 / 0.49 / 0.75 at 10 / 30 / 100, plain 0 / 0 / 0.65.)"""
    model, _, planted, _, _ = planted_world
    ig = edge_attribution_patching(model, planted, ig_steps=5, progress=False, hook_check=False)
    plain = edge_attribution_patching(model, planted, progress=False, hook_check=False)
    kept_ig = edge_faithfulness(model, planted, ig.greedy_edges(20)).recovered
    kept_plain = edge_faithfulness(model, planted, plain.greedy_edges(20)).recovered
    every = [(w, r) for i, w in enumerate(ig.writers) for j, r in enumerate(ig.readers) if ig.mask[i, j]]
    pick = torch.randperm(len(every), generator=torch.Generator().manual_seed(0))[:20]
    kept_random = edge_faithfulness(model, planted, [every[i] for i in pick]).recovered
    assert kept_ig >= 0.4 and kept_ig > kept_plain + 0.2 and kept_ig > kept_random + 0.2, (kept_ig, kept_plain, kept_random)


def test_qk_fix_uses_the_exactly_patched_attention_pattern(arch_model):
    """Each QK-fixed q / k score is (A' - A) . d metric / d A with A' the pattern of a run where
    only that one query or key is patched: check cells against such runs, one cell at a time."""
    from mechedit.gradients import activations_and_gradients, capture_activations

    model = arch_model
    batch = tokenize_pairs(model, PAIRS[:1])
    fixed = attribution_patching(model, batch, sites=("q", "k", "head"), qk_fix=True, progress=False, hook_check=False)
    plain = attribution_patching(model, batch, sites=("q", "k", "head"), progress=False, hook_check=False)
    torch.testing.assert_close(fixed["head"].values, plain["head"].values)  # only q / k change
    layer = int(model.cfg.n_layers) - 1
    pre = f"blocks.{layer}.attn.hook_"
    names = [pre + p for p in ("q", "k", "v", "pattern")]
    clean = capture_activations(model, batch.clean_tokens, names).activations
    a, w = int(batch.answer_ids[0]), int(batch.wrong_ids[0])

    def metric(logits):
        return logits[0, -1, a] - logits[0, -1, w]

    base = activations_and_gradients(model, batch.corrupt_tokens, [pre + "z", pre + "v"], metric)
    corrupt = capture_activations(model, batch.corrupt_tokens, [pre + "pattern"]).activations[pre + "pattern"]
    group = model.cfg.n_heads // base.activations[pre + "v"].shape[2]
    d_pattern = torch.einsum("bthe,bshe->bhts", base.gradients[pre + "z"], base.activations[pre + "v"].repeat_interleave(group, 2))
    cells = []
    for part in ("q", "k"):  # the two strongest cells of each part in the last layer
        values = fixed[part].values[layer]
        cells += [(part, *divmod(int(i), values.shape[1])) for i in values.abs().flatten().topk(2).indices]
    checked = 0
    for part, head, pos in cells:
        def patch(act, hook, part=part, head=head, pos=pos):
            act = act.clone()
            act[:, pos, head] = clean[pre + part][:, pos, head]
            return act

        kept = {}
        with torch.no_grad(), model.hooks(fwd_hooks=[(pre + part, patch), (pre + "pattern", lambda x, hook, kept=kept: kept.setdefault("p", x.clone()))]):
            model(batch.corrupt_tokens)
        heads = [head] if part == "q" else list(range(head * group, (head + 1) * group))
        want = float(((kept["p"] - corrupt) * d_pattern)[:, heads].sum())
        got = float(fixed[part].values[layer, head, pos])
        assert got == pytest.approx(want, rel=1e-3, abs=1e-6), (part, head, pos)
        checked += abs(want) > 1e-5
    assert checked == 4  # the cells really move the metric
    with pytest.raises(ValueError, match="qk_fix"):
        attribution_patching(model, batch, sites=("head",), qk_fix=True)


def test_qk_fix_follows_exact_query_patching_on_the_fact_world(planted_world):
    """Measured (Pearson with exact patching, per head and position, 20 planted facts): q plain
    AtP 0.104, QK fix 0.683, IG k=5 0.422; k 0.447 / 0.412 / 0.471 (the fact world's keys: the
    fix cannot help where the error is downstream of the pattern)."""
    model, _, planted, _, exact = planted_world
    plain = _correlations(exact, attribution_patching(model, planted, sites=("q",), progress=False))
    fixed = _correlations(exact, attribution_patching(model, planted, sites=("q",), qk_fix=True, progress=False))
    assert fixed["q"] >= 0.6 and fixed["q"] > plain["q"] + 0.3, (plain, fixed)


def test_memory_estimate_picks_a_batch_size_that_fits(arch_model):
    from mechedit.locate import attribution_memory

    model = arch_model
    one = attribution_memory(model, n_tokens=7, batch_size=1)
    assert attribution_memory(model, n_tokens=7, batch_size=8) > 4 * one > 0
    assert attribution_memory(model, n_tokens=7, batch_size=2, ig_steps=5) > attribution_memory(model, n_tokens=7, batch_size=2)
    budget = attribution_memory(model, n_tokens=7, batch_size=1, sites=("head",)) * 1.5 / 2**20
    fitted = attribution_patching(model, PAIRS, sites=("head",), max_memory_mb=budget, progress=False)
    assert fitted.config["batch_size"] == 1
    whole = attribution_patching(model, PAIRS, sites=("head",), progress=False)
    torch.testing.assert_close(fitted["head"].values, whole["head"].values, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="max_memory_mb"):
        attribution_patching(model, PAIRS, sites=("head",), max_memory_mb=budget / 10, progress=False)


def test_atp_equals_exact_patching_where_the_metric_is_linear(arch_model):
    """With the final norm held at identity, the logits are linear in the last layer's MLP output
    and neurons (nothing reads them but the unembedding), so AtP there is exact patching."""
    model = arch_model
    last = int(model.cfg.n_layers) - 1
    held = {}
    identity = [("ln_final.hook_in", lambda x, hook: held.__setitem__("x", x)),
                ("ln_final.hook_out", lambda x, hook: held["x"])]
    with model.hooks(fwd_hooks=identity):
        for site in ("mlp_out", "neuron"):
            exact = activation_patching(model, PAIRS, site=site, layers=[last], progress=False, hook_check=False)
            atp = attribution_patching(model, PAIRS, sites=(site,), progress=False, hook_check=False)
            want, got = exact.values[last : last + 1], atp[site].values[last : last + 1]
            assert want.abs().max() > 1e-6  # the patches move the metric (little: a random model)
            # a nonlinear path (a head before the last MLP) is off by ~0.4 %; float error ~1e-9
            torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)


def test_neuron_atp_ranks_the_fact_neurons_like_neuron_attribution():
    """Measured on 5 birthplace facts of the shipped model: 45-65 % (mean 58 %) of the top-20
    neurons by AtP (noising the subject) are neuron_attribution's top 20 (the demo's locator);
    chance is 20 of 3,072 neurons, 0.7 %. (The model before issue 7, which kept a fact in fewer
    layers: 55-90 %, mean 73 %.)"""
    from mechedit.locate import neuron_attribution
    from mechedit.zoo.prompts import fact_prompts
    from mechedit.zoo.world import fill

    model, world = mechedit.load("factworld"), zoo.load_world("factworld")
    rng = random.Random(0)
    overlaps = []
    for fact in rng.sample([f for f in world.facts if f.relation_id == "P19"], 5):
        others = [g for g in world.facts if g.relation_id == fact.relation_id and g.value != fact.value]
        pairs = []
        for template in world.relation[fact.relation_id].train_templates:
            other = rng.choice(others)
            pairs.append(PromptPair(clean=fill(template, fact.subject), corrupt=fill(template, other.subject),
                                    answer=fact.value, wrong_answer=other.value))
        located = neuron_attribution(model, fact_prompts(world, fact), progress=False).values.flatten()
        atp = attribution_patching(model, pairs, sites=("neuron",), direction="noising", metric="answer_logprob",
                                   per_position=False, progress=False, hook_check=False)["neuron"].values.flatten()
        top_atp, top_located = set((-atp).topk(20).indices.tolist()), set(located.topk(20).indices.tolist())
        overlaps.append(len(top_atp & top_located) / 20)
    assert sum(overlaps) / len(overlaps) >= 0.5 and min(overlaps) >= 0.4, overlaps
