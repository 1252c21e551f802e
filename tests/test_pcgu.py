"""PCGU: vectorised partition cosines against a direct loop, selection, the update as an edit, bad input."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

import mechedit
from mechedit.data_pairs import ContrastivePair, SkippedPairsWarning
from mechedit.edit import WeightEdit
from mechedit.edit.pcgu import PCGUUpdateConfig, pcgu_update
from mechedit.edit.weights import bitwise_equal
from mechedit.hf import circuit_parameters, hf_parameters
from mechedit.locate.pcgu import (
    PCGUConfig,
    partition_cosines,
    partition_specs,
    pcgu,
    select_lowest,
    side_gradients,
    side_scores,
    tokenize_pair_sides,
)
from mechedit.zoo.random_model import random_checkpoint

PAIRS = [
    ContrastivePair("w1 w2 w3 w4 w5", "w1 w2 w6 w4 w5", span=("w3", "w6")),
    ContrastivePair("w7 w8 w9 w10", "w7 w11 w9 w10"),
    ContrastivePair("w12 w13 w14", "w12 w13 w15"),
    ContrastivePair("w3 w16 w17 w18 w19 w20", "w6 w16 w17 w18 w19 w20"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for arch in ("gpt2", "llama", "bert"):
        folder = tmp_path_factory.mktemp(f"pcgu_{arch}")
        random_checkpoint(folder, arch, n_layer=2, n_embd=32, n_head=4)
        out[arch] = mechedit.load(folder)
    return out


def _loop_cosines(g_adv, g_dis, specs):
    """The reference: one partition at a time, in float64."""
    out = []
    for spec in specs:
        a, d = g_adv[spec.name].double(), g_dis[spec.name].double()
        for unit in range(spec.n_units):
            pa = a.reshape(-1) if spec.axis is None else a.select(spec.axis, unit).reshape(-1)
            pd = d.reshape(-1) if spec.axis is None else d.select(spec.axis, unit).reshape(-1)
            na, nd = pa.norm(), pd.norm()
            out.append(float("nan") if na == 0 or nd == 0 else float(pa @ pd / (na * nd)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("aggregation", ["input", "output"])
def test_vectorised_cosines_equal_a_per_partition_loop(models, arch, aggregation):
    model = models[arch]
    cfg = PCGUConfig(k=25, aggregation=aggregation)
    batch = tokenize_pair_sides(model, PAIRS)
    specs = partition_specs(model, aggregation)
    names = [s.name for s in specs]
    g_adv = side_gradients(model, batch, names, "advantaged", cfg)
    g_dis = side_gradients(model, batch, names, "disadvantaged", cfg)
    cosine, zero = partition_cosines(g_adv, g_dis, specs)
    reference = _loop_cosines(g_adv, g_dis, specs)
    assert torch.equal(torch.isnan(cosine), torch.isnan(reference))
    assert torch.equal(zero, torch.isnan(reference))
    ok = ~zero
    assert ok.sum() > 100 and zero.sum() > 0  # embedding rows of unused tokens have no gradient
    assert (cosine[ok].double() - reference[ok]).abs().max() <= 1e-6
    # the global selection equals sorting the loop's cosines (NaN excluded), lowest first
    chosen = select_lowest(cosine, zero, 25)
    ref_order = sorted((v, i) for i, v in enumerate(reference.tolist()) if v == v)[:25]
    assert torch.allclose(cosine[chosen].double(), torch.tensor([v for v, _ in ref_order], dtype=torch.float64), atol=1e-6)
    assert cosine[chosen].max() <= cosine[ok].sort().values[24] + 1e-7


def test_partitions_follow_meaning_not_storage(models):
    """GPT-2 Conv1D [in, out]: output units are columns; Llama/BERT Linear [out, in]: rows."""
    gpt2 = {s.name: s for s in partition_specs(models["gpt2"], "input")}
    assert gpt2["transformer.h.0.mlp.c_fc.weight"].axis == 1
    assert gpt2["transformer.h.0.mlp.c_proj.weight"].axis == 1
    assert gpt2["transformer.wte.weight"].axis == 0 and gpt2["transformer.h.0.ln_1.weight"].axis is None
    assert "lm_head.weight" not in gpt2  # tied to wte: partitioned once
    out = {s.name: s for s in partition_specs(models["gpt2"], "output")}
    assert out["transformer.h.0.mlp.c_fc.weight"].axis == 0 and out["transformer.wte.weight"].axis == 0
    llama = {s.name: s for s in partition_specs(models["llama"], "input")}
    assert llama["model.layers.0.mlp.down_proj.weight"].axis == 0
    assert {s.name: s for s in partition_specs(models["llama"], "output")}["model.layers.0.mlp.down_proj.weight"].axis == 1


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_selection_masks_equal_the_circuit_parameters(models, arch):
    """Input aggregation: the circuit names exactly the entries the masks cover."""
    model = models[arch]
    sel = pcgu(model, PAIRS, k=40)
    assert len(sel.selected) == 40
    assert sel.scores.values[sel.selected].max() <= torch.nan_to_num(sel.scores.values, nan=2.0).sort().values[39]
    expected = circuit_parameters(model, sel.circuit)
    assert set(expected) == set(sel.masks)
    for name, mask in sel.masks.items():
        assert torch.equal(mask.cpu(), expected[name].cpu()), name


def test_zero_gradient_partitions_are_excluded_by_default(models, tmp_path):
    random_checkpoint(tmp_path, "gpt2", n_layer=2, n_embd=32, n_head=4)
    model = mechedit.load(tmp_path)
    dead = "transformer.h.1.mlp.c_proj.weight"
    with torch.no_grad():
        hf_parameters(model)[dead].zero_()  # layer 1's MLP input then gets no gradient
    n_all = sum(s.n_units for s in partition_specs(model))
    sel = pcgu(model, PAIRS, k=n_all // 2)
    values = sel.scores.values
    table = sel.scores.partitions
    starts = {p: (o, s) for p, o, s in table.rows}
    o, s = starts["transformer.h.1.mlp.c_fc.weight"]
    assert torch.isnan(values[o : o + s]).all()
    assert not any(c.param in ("transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias") for c in sel.circuit)
    assert not torch.isnan(values[sel.selected]).any()
    # the reference behaviour: zero-gradient partitions score 0 and compete (they then rank low)
    with_zero = pcgu(model, PAIRS, k=n_all // 2, include_zero=True)
    assert not torch.isnan(with_zero.scores.values).any()
    assert any(c.param == "transformer.h.1.mlp.c_fc.weight" for c in with_zero.circuit)


def test_side_scores_match_direct_computation(models):
    model = models["gpt2"]
    batch = tokenize_pair_sides(model, PAIRS)
    with torch.no_grad():
        logits = model(batch.inputs["advantaged"])
        got = side_scores(logits, batch, "advantaged")
        mean = side_scores(logits, batch, "advantaged", causal_reduction="mean")
    tokens = model.to_tokens(PAIRS[0].advantaged)
    with torch.no_grad():
        lp = model(tokens).log_softmax(-1)[0, :-1].gather(-1, tokens[0, 1:, None]).sum()
    assert abs(float(got[0]) - float(lp)) < 1e-5
    assert abs(float(mean[0]) - float(lp) / (tokens.shape[1] - 1)) < 1e-5
    bert = models["bert"]
    mb = tokenize_pair_sides(bert, PAIRS)
    assert mb.mode == "masked" and int(mb.span.sum()) == len(PAIRS)
    masked = mb.inputs["advantaged"][0].clone()
    assert (masked == bert.tokenizer.mask_token_id).sum() == 1
    with torch.no_grad():
        lb = bert(mb.inputs["advantaged"], attention_mask=mb.attention["advantaged"])
        s_adv = side_scores(lb, mb, "advantaged")
    pos = int(mb.span[0].nonzero())
    assert abs(float(s_adv[0]) - float(lb[0, pos, bert.tokenizer.convert_tokens_to_ids("w3")])) < 1e-5


def test_update_changes_only_selected_partitions_and_reverts_exactly(models):
    model = models["gpt2"]
    before = {n: p.detach().clone() for n, p in hf_parameters(model).items()}
    cfg = PCGUUpdateConfig(ranking=PCGUConfig(k=30), lr=0.5, epochs=1, batch_size=len(PAIRS))
    sel = pcgu(model, PAIRS, k=30)  # one batch of all pairs: the update's only selection
    result = pcgu_update(model, PAIRS, dev_metric=lambda m: 0.0, config=cfg)
    edit = result.edit
    assert isinstance(edit, WeightEdit) and not edit.is_applied and result.runs["pcgu"].steps == 1
    for name, p in hf_parameters(model).items():
        assert bitwise_equal(p.detach(), before[name])  # the call leaves the model unchanged
    edit.apply(model)
    changed_any = False
    for name, p in hf_parameters(model).items():
        mask = sel.masks.get(name)
        if mask is None:
            assert bitwise_equal(p.detach(), before[name]), name
            continue
        outside = ~mask.cpu()
        assert bitwise_equal(p.detach().cpu()[outside], before[name].cpu()[outside]), name
        changed_any |= bool((p.detach().cpu()[mask.cpu()] != before[name].cpu()[mask.cpu()]).any())
    assert changed_any
    edit.revert(model)
    for name, p in hf_parameters(model).items():
        assert bitwise_equal(p.detach(), before[name]), name


def test_update_lowers_the_advantaged_side_and_picks_the_checkpoint_closest_to_target(models):
    model = models["gpt2"]
    values = iter([0.9, 0.6, 0.48, 0.3] * 2)  # PCGU, then the fine-tuning baseline
    cfg = PCGUUpdateConfig(ranking=PCGUConfig(k=60), lr=0.2, epochs=4, batch_size=len(PAIRS))
    result = pcgu_update(model, PAIRS, dev_metric=lambda m: next(values), config=cfg, baselines=("finetune",))
    run = result.runs["pcgu"]
    assert run.checkpoint == 3 and run.dev_bias == 0.48
    batch = tokenize_pair_sides(model, PAIRS)
    with torch.no_grad():
        base = side_scores(model(batch.inputs["advantaged"]), batch, "advantaged").sum()
        with result.edit.applied(model):
            after = side_scores(model(batch.inputs["advantaged"]), batch, "advantaged").sum()
    assert after < base
    assert "finetune" in result.runs and result.runs["finetune"].edit.names != result.edit.names


def test_baselines_take_their_own_learning_rate(models):
    model = models["gpt2"]
    live = hf_parameters(model)
    deltas = {}
    for baseline_lr in (None, 0.01):  # one step on one batch: the edit is -lr * g+ everywhere
        cfg = PCGUUpdateConfig(ranking=PCGUConfig(k=30), lr=0.1, baseline_lr=baseline_lr, epochs=1, batch_size=len(PAIRS))
        run = pcgu_update(model, PAIRS, dev_metric=lambda m: 0.5, config=cfg, baselines=("finetune",)).runs["finetune"]
        name = "transformer.h.0.mlp.c_fc.weight"
        deltas[baseline_lr] = run.edit.new_tensors[name].cpu() - live[name].detach().cpu()
    assert deltas[None].abs().max() > 0
    assert torch.allclose(deltas[0.01] * 10, deltas[None], rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError, match="baseline_lr"):
        PCGUUpdateConfig(baseline_lr=0.0)


def test_tensor_table_counts_the_selected_partitions_per_tensor_and_layer(models):
    sel = pcgu(models["gpt2"], PAIRS, k=40)
    table = sel.tensor_table()
    assert int(table["selected"].sum()) == len(sel.selected) == 40
    assert len(table) == len(sel.specs) and (table["fraction"] <= 1).all()
    row = table.set_index("param").loc["transformer.h.1.mlp.c_fc.weight"]
    assert row["layer"] == 1 and row["tensor"] == "mlp.c_fc.weight" and row["partitions"] == 4 * 32
    assert row["selected"] == int(sel.masks.get("transformer.h.1.mlp.c_fc.weight", torch.zeros(1, 1)).any(0).sum())
    outside = table.set_index("param").loc["transformer.wte.weight"]
    assert outside["layer"] is pd.NA and outside["tensor"] == "transformer.wte.weight"


def test_pair_scoring_and_bias_metrics_import_no_locator():
    # The design's layering: evaluate and the core import the core, never a locator. (The
    # evaluate package as a whole does: its controls compare locators; so read the sources.)
    root = Path(__file__).resolve().parents[1] / "mechedit"
    for module in ("pair_scores.py", "evaluate/bias.py"):
        tree = ast.parse((root / module).read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert "mechedit.pair_scores" in imported or module == "pair_scores.py"
        assert not [m for m in imported if m.startswith(("mechedit.locate", "mechedit.edit"))], (module, imported)


def test_bad_pairs_are_skipped_with_counted_warnings(models):
    bad = [
        ContrastivePair("w1 w2 w3", "w1 w2 w3"),  # identical
        ContrastivePair("w1 w2 w3 w4", "w5 w2 w6 w4", span=("w3", "w6")),  # differs outside the span
        ContrastivePair("w1 w2 w3", "w1 w4 w5 w3"),  # span of 1 vs 2 tokens: masked mode only
    ]
    with pytest.warns(SkippedPairsWarning, match=r"skipped 3 of 7 pairs: .*1 differs outside the declared span.*1 identical sides.*1 span tokenizes to different lengths"):
        sel = pcgu(models["bert"], PAIRS + bad, k=5)
    assert sel.n_pairs == 4 and sum(sel.skipped.values()) == 3
    with pytest.warns(SkippedPairsWarning, match="skipped 2 of 7"):
        causal = pcgu(models["gpt2"], PAIRS + bad, k=5)
    assert causal.n_pairs == 5  # different lengths are fine for a causal LM
    with pytest.raises(ValueError, match="no usable pair"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pcgu(models["gpt2"], bad[:2], k=5)


def test_bad_k_and_settings_raise_clear_errors(models):
    model = models["gpt2"]
    n_all = sum(s.n_units for s in partition_specs(model))
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be >= 1"):
            pcgu(model, PAIRS, k=k)
    with pytest.raises(ValueError, match=f"above the number of partitions \\({n_all}\\)"):
        pcgu(model, PAIRS, k=n_all + 1)
    with pytest.raises(ValueError, match=r"fractional k must be in \(0, 1\]"):
        pcgu(model, PAIRS, k=1.5)
    with pytest.raises(ValueError, match="aggregation"):
        PCGUConfig(aggregation="rows")
    with pytest.raises(ValueError, match="not one pair"):
        pcgu(model, PAIRS[0], k=3)
    assert len(pcgu(model, PAIRS, k=0.01).selected) == round(0.01 * n_all)


# --- the fact world: the planted occupation bias, unlearned ----------------------------------------

# The settings of bench/README.md's tables (every tuning attempt is listed there). Fewer epochs
# than the table's 3 give the same edit for the masked model: batches are drawn epoch by epoch
# from one seeded stream, and its dev bias never came closer to 50 % after the chosen step (2).
# The causal model (retrained in issue 7) is checkpointed at step 36, the last of 3 epochs; a
# 4th epoch leaves its dev bias on the same plateau (0.516), so the same step is kept.
FACT_WORLD_SETTINGS = {
    "factworld": {"lr": 2e-3, "k": 0.05, "epochs": 3},
    "factworld-mlm": {"lr": 1e-3, "k": 0.2, "epochs": 1},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["factworld", "factworld-mlm"])
def test_pcgu_moves_the_planted_bias_to_50_percent_and_keeps_utility(name):
    # ~100 small forward/backward passes: on a shared 2-core machine, two threads per op spend
    # more time waiting on each other than computing
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _unlearn_and_check(name)
    finally:
        torch.set_num_threads(threads)


def _unlearn_and_check(name):
    from mechedit import zoo
    from mechedit.data_pairs import world_bias_splits
    from mechedit.evaluate.bias import fact_world_utility, pair_preference

    model = mechedit.load(name)
    world = zoo.load_world(name)
    splits = world_bias_splits(world)
    before_bias = pair_preference(model, splits["test"]).rate
    before = fact_world_utility(model, world)
    settings = FACT_WORLD_SETTINGS[name]
    cfg = PCGUUpdateConfig(
        ranking=PCGUConfig(k=settings["k"]), lr=settings["lr"], epochs=settings["epochs"], batch_size=16
    )
    result = pcgu_update(model, splits["train"], splits["dev"], config=cfg)
    with result.edit.applied(model):
        after_bias = pair_preference(model, splits["test"]).rate
        after = fact_world_utility(model, world)
    assert before_bias >= 0.85  # planted: the favoured pronoun wins on held-out templates
    assert abs(after_bias - 0.5) <= 0.05, (before_bias, after_bias, result.runs["pcgu"].history)
    assert before["facts"] - after["facts"] <= 0.02, (before, after)
    assert after["perplexity"] <= 1.05 * before["perplexity"], (before, after)
