"""Causal tracing equals ROME's procedure run one restoration per forward, is seeded, finds the
planted layer on the fact world, and refuses bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch

import mechedit
from mechedit.locate import CausalTracingConfig, causal_tracing, subject_embedding_std
from mechedit.prompts import FactPrompt
from mechedit.scores import Scores
from mechedit.tokens import subject_token_positions, tokenize_facts
from mechedit.viz import heatmap
from mechedit.zoo.random_model import random_checkpoint

FACTS = [
    FactPrompt(prompt="w1 w2 w3 w4 w5 w6", subject="w2 w3", target="w9"),
    FactPrompt(prompt="w7 w8 w10 w11 w12 w13", subject="w10", target="w14"),
]
SHORT = FactPrompt(prompt="w20 w21 w22 w23", subject="w21 w22", target="w5")


def sharpened_checkpoint(folder, arch):
    """A random checkpoint with every weight matrix x5: at the default init (std 0.02) the last
    token barely reads the others, so corrupting the subject moves P(target) by only ~1e-4."""
    from transformers import AutoModelForCausalLM

    random_checkpoint(folder, arch, n_layer=3, n_embd=64, n_head=4)
    hf = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(5.0)
    hf.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    out = {arch: mechedit.load(sharpened_checkpoint(root / arch, arch)) for arch in ("gpt2", "llama")}
    out["bert"] = mechedit.load(random_checkpoint(root / "bert", "bert", n_layer=2, n_embd=64, n_head=4))
    return out


# --------------------------------------------------------------------------------------------
# ROME's procedure, one restoration per forward (the reference the batched method must equal)
# --------------------------------------------------------------------------------------------


def rome_trace(model, fact, *, kind, n_noise, scale, sigma, window, seed):
    """``[n_layers, n_pos]`` mean over noise of P(restored) - P(corrupt), and (P clean, P corrupt).

    As ROME's ``trace_with_patch``: a batch of ``n_noise`` corrupted copies of the prompt (noise
    on the subject's token embeddings), one full forward per (layer, token) restoration, with the
    clean run's value written at that token at every restored hook.
    """
    batch = tokenize_facts(model, [fact])
    tokens, target = batch.tokens.repeat(n_noise, 1), int(batch.target_ids[0])
    span = subject_token_positions(model, fact)
    n_layers, n_pos = model.cfg.n_layers, tokens.shape[1]
    z = torch.randn((n_noise, len(span), model.cfg.d_model), generator=torch.Generator().manual_seed(seed))

    def add_noise(act, hook):
        act = act.clone()
        act[:, span.start : span.stop] += scale * sigma * z
        return act

    def prob(logits):
        return logits[:, -1].float().softmax(-1)[:, target]

    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(batch.tokens)
        corrupt = prob(model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", add_noise)]))
        out = torch.zeros(n_layers, n_pos)
        for layer in range(n_layers):
            if kind == "state":
                names = [f"blocks.{layer}.hook_resid_post"]
            else:
                hook = "hook_mlp_out" if kind == "mlp" else "hook_attn_out"
                lo, hi = max(0, layer - window // 2), min(n_layers, layer - (-window // 2))
                names = [f"blocks.{j}.{hook}" for j in range(lo, hi)]
            for t in range(n_pos):

                def restore(act, hook, t=t):
                    act = act.clone()
                    act[:, t] = cache[hook.name][0, t]
                    return act

                hooks = [("hook_embed", add_noise)] + [(n, restore) for n in names]
                restored = prob(model.run_with_hooks(tokens, fwd_hooks=hooks))
                out[layer, t] = (restored - corrupt).mean()
    return out, (float(prob(clean_logits)[0]), float(corrupt.mean()))


def hand_sigma(model, facts):
    """std of the subject tokens' token-embedding rows (GPT-2/Llama: hook_embed = W_E[token])."""
    weight = model.original_model.get_input_embeddings().weight
    rows = []
    for f in facts:
        tokens = tokenize_facts(model, [f]).tokens[0]
        rows += [weight[tokens[p]] for p in subject_token_positions(model, f)]
    return float(torch.stack(rows).detach().std())


@pytest.mark.parametrize(("arch", "window"), [("gpt2", 3), ("llama", 2)])
def test_equals_rome_one_restoration_per_forward(models, arch, window):
    model = models[arch]
    result = causal_tracing(model, FACTS, n_noise=3, window=window, seed=7, per_fact=True, progress=False)
    sigma = hand_sigma(model, FACTS)
    assert result.noise_std == pytest.approx(sigma, rel=1e-5)
    assert result.config.window == window
    worst, largest = 0.0, 0.0
    for f, fact in enumerate(FACTS):
        for kind in ("state", "mlp", "attn"):
            expected, (clean, corrupt) = rome_trace(
                model, fact, kind=kind, n_noise=3, scale=3.0, sigma=sigma, window=window, seed=7
            )
            got = result[kind].values[f]
            worst = max(worst, float((got - expected).abs().max()))
            largest = max(largest, float(expected.abs().max()))
        assert float(result.clean_prob[f]) == pytest.approx(clean, abs=1e-6)
        assert float(result.corrupt_prob[f]) == pytest.approx(corrupt, abs=1e-6)
    assert worst <= 1e-5
    assert largest > 5e-3  # the effects compared are not all ~0
    # before the subject nothing differs, so restoring there is exactly 0
    assert (result.state.values[1, :, :3] == 0).all()
    assert result.state.config["subject_spans"] == [[2, 4], [3, 4]]  # BOS first


def test_scores_average_facts_and_mark_the_subject(models, tmp_path):
    model = models["gpt2"]
    per_fact = causal_tracing(model, FACTS, n_noise=2, per_fact=True, progress=False)
    mean = causal_tracing(model, FACTS, n_noise=2, progress=False)
    assert mean.state.axes == ("layer", "pos") and per_fact.state.axes == ("fact", "layer", "pos")
    torch.testing.assert_close(mean.mlp.values, per_fact.mlp.values.mean(0), atol=1e-7, rtol=0)
    assert mean.state.site == "resid_post" and mean.mlp.site == "mlp_out" and mean.attn.site == "attn_out"
    assert mean.state.labels["pos"] == ("<bos>", "w1", "w2", "w3", "w4", "w5", "w6")
    assert mean.mlp.config["window"] == 1  # default: 10/48 of 3 layers, at least 1
    # restoring the last block's output at the last token restores the clean run exactly
    torch.testing.assert_close(per_fact.state.values[:, -1, -1], per_fact.total_effect, atol=1e-6, rtol=0)
    # the scores save, load and draw like any other
    loaded = Scores.load(mean.attn.save(tmp_path / "attn"))
    assert torch.equal(loaded.values, mean.attn.values) and loaded.config["subject_spans"] == [[2, 4], [3, 4]]
    assert list(heatmap(loaded).data[0].y) == ["0", "1", "2"]


def test_a_fact_scores_the_same_alone_as_batched_with_others_of_other_lengths(models):
    model = models["llama"]
    both = causal_tracing(model, [FACTS[0], SHORT], n_noise=2, kinds=("state", "attn"), window=2, per_fact=True,
                          noise_std=0.05, progress=False)
    alone = causal_tracing(model, [SHORT], n_noise=2, kinds=("state", "attn"), window=2, per_fact=True,
                           noise_std=0.05, progress=False)
    assert both.mlp is None
    n = alone.state.values.shape[-1]
    for kind in ("state", "attn"):
        torch.testing.assert_close(both[kind].values[1, :, :n], alone[kind].values[0], atol=1e-6, rtol=0)
        assert both[kind].values[1, :, n:].isnan().all()  # past the short fact's end


def test_deterministic_for_a_seed_and_the_seed_matters(models):
    model = models["gpt2"]
    run = lambda seed: causal_tracing(model, FACTS, kinds="state", n_noise=3, seed=seed, progress=False)  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.state.values, b.state.values)
    assert torch.equal(a.corrupt_prob, b.corrupt_prob)
    assert float((a.state.values - c.state.values).abs().max()) > 1e-4


def test_chunking_and_reference_groups_do_not_change_the_numbers(models):
    model = models["gpt2"]
    big = causal_tracing(model, FACTS, n_noise=3, window=2, progress=False)
    small = causal_tracing(model, FACTS, n_noise=3, window=2, batch_rows=5, progress=False)
    for kind in ("state", "mlp", "attn"):
        torch.testing.assert_close(big[kind].values, small[kind].values, atol=1e-6, rtol=0)


def test_control_is_subtracted_with_the_facts_sigma(models):
    model = models["gpt2"]
    control = [FactPrompt(prompt="w30 w31 w32 w33 w34 w35", subject="w31 w32", target="w40")]
    contrast = causal_tracing(model, FACTS, kinds="mlp", n_noise=2, control=control, progress=False)
    main = causal_tracing(model, FACTS, kinds="mlp", n_noise=2, progress=False)
    ctl = causal_tracing(model, control, kinds="mlp", n_noise=2, noise_std=main.noise_std, progress=False)
    torch.testing.assert_close(contrast.mlp.values, main.mlp.values - ctl.mlp.values, atol=1e-6, rtol=0)
    assert contrast.mlp.config["n_control"] == 1


def test_explicit_sigma_and_scale_set_the_noise(models):
    model = models["gpt2"]
    assert subject_embedding_std(model, FACTS) == pytest.approx(hand_sigma(model, FACTS), rel=1e-5)
    a = causal_tracing(model, FACTS, kinds="state", n_noise=2, noise_std=0.2, noise_scale=1.5, progress=False)
    b = causal_tracing(model, FACTS, kinds="state", n_noise=2, noise_std=0.1, noise_scale=3.0, progress=False)
    assert a.noise_std == 0.2 and a.state.config["noise_level"] == pytest.approx(0.3)
    torch.testing.assert_close(a.state.values, b.state.values, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(models):
    model = models["gpt2"]
    with pytest.raises(ValueError, match="facts is empty"):
        causal_tracing(model, [])
    with pytest.raises(ValueError, match="has no subject"):
        causal_tracing(model, [FactPrompt(prompt="w1 w2 w3", target="w4")])
    with pytest.raises(ValueError, match="does not occur in prompt"):
        causal_tracing(model, [FactPrompt(prompt="w1 w2 w3", subject="w7", target="w4")])
    with pytest.raises(ValueError, match="list of FactPrompt"):
        causal_tracing(model, FACTS[0])
    with pytest.raises(ValueError, match="n_noise must be an int >= 1"):
        causal_tracing(model, FACTS, n_noise=0)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        causal_tracing(model, FACTS, window=0)
    with pytest.raises(ValueError, match="kinds must be"):
        CausalTracingConfig(kinds=("state", "heads"))
    with pytest.raises(ValueError, match="noise_std must be a finite number > 0"):
        causal_tracing(model, FACTS, noise_std=-1.0)
    with pytest.raises(ValueError, match="different token lengths"):
        causal_tracing(model, [FACTS[0], SHORT])
    with pytest.raises(ValueError, match="per_fact=True"):
        causal_tracing(model, FACTS, control=FACTS, per_fact=True)
    with pytest.raises(ValueError, match="causal language model"):
        causal_tracing(models["bert"], FACTS)
    model.train()
    try:
        with pytest.raises(RuntimeError, match="evaluation mode"):
            causal_tracing(model, FACTS)
    finally:
        model.eval()


# --------------------------------------------------------------------------------------------
# Ground truth: the planted MLP layer of factworld-planted
# --------------------------------------------------------------------------------------------


def _per_layer(values, facts_tok, spans):
    """Per-layer MLP effect of per-fact scores ``[fact, layer, pos]``, averaged over facts:
    max over positions, at the last subject token, at the final token."""
    last = facts_tok.last_positions
    rows = torch.arange(values.shape[0])
    return {
        "max_pos": values.nan_to_num(float("-inf")).amax(-1).mean(0),
        "subject_last": values[rows, :, torch.tensor([b - 1 for _, b in spans])].mean(0),
        "final": values[rows, :, last].mean(0),
    }


def test_planted_layer_among_the_top_two_of_the_mlp_contrast():
    from mechedit import zoo
    from mechedit.zoo.prompts import fact_prompts

    model = mechedit.load("factworld-planted")
    world = zoo.load_world("factworld-planted")
    layer = zoo.metadata("factworld-planted")["planted_layer"]
    rng = random.Random(0)
    planted_facts = world.planted_facts
    controls = [rng.choice([g for g in world.facts if g.relation_id == f.relation_id]) for f in planted_facts]
    # three training templates of every fact (templates differ in length: per_fact=True)
    planted = [p for f in planted_facts for p in fact_prompts(world, f)[:3]]
    control = [p for f in controls for p in fact_prompts(world, f)[:3]]
    sigma = subject_embedding_std(model, planted + control)
    report = {}
    for name, facts in (("planted", planted), ("control", control)):
        trace = causal_tracing(model, facts, kinds="mlp", noise_std=sigma, per_fact=True, progress=False)
        spans = trace.mlp.config["subject_spans"]
        report[name] = _per_layer(trace.mlp.values, tokenize_facts(model, facts), spans)
        report[name]["te"] = float(trace.total_effect.mean())
    contrast = {k: report["planted"][k] - report["control"][k] for k in ("max_pos", "subject_last", "final")}
    lines = [f"window {trace.config.window}, sigma {sigma:.4f}, planted layer {layer}"]
    for name in ("planted", "control"):
        lines.append(f"{name}: TE {report[name]['te']:.4f}")
        lines += [f"  {name} {k}: {[round(float(x), 4) for x in report[name][k]]}" for k in contrast]
    lines += [f"  contrast {k}: {[round(float(x), 4) for x in v]}" for k, v in contrast.items()]
    print("\n".join(lines))
    top_two = torch.topk(contrast["max_pos"], 2).indices.tolist()
    assert layer in top_two, "\n".join(lines)
    assert not math.isnan(float(contrast["final"].sum()))


def test_hook_check_lands_in_provenance_of_every_patching_locator(tmp_path):
    import mechedit
    from mechedit.locate import attribution_patching, causal_tracing
    from mechedit.prompts import FactPrompt, PromptPair
    from mechedit.zoo.random_model import random_checkpoint

    model = mechedit.load(random_checkpoint(tmp_path, "gpt2", n_layer=1, n_embd=32, n_head=2))
    facts = [FactPrompt(prompt="w1 w2 w3", subject="w2", target="w4")]
    trace = causal_tracing(model, facts, kinds=("state",), n_noise=1, progress=False)
    assert trace["state"].provenance.extra["hook_check"]["passed"] is True
    pairs = [PromptPair(clean="w1 w2 w3", corrupt="w1 w5 w3", answer="w4", wrong_answer="w6")]
    atp = attribution_patching(model, pairs, sites=("head",), progress=False)
    assert atp["head"].provenance.extra["hook_check"]["passed"] is True
    assert attribution_patching(model, pairs, sites=("head",), hook_check=False, progress=False)["head"].provenance.extra["hook_check"] == {"run": False}
