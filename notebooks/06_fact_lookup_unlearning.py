# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Where to unlearn: fact lookup against output tracing (Mechanistic Unlearning)
#
# Guo et al. (2024) find that *where* an unlearning edit is made decides whether it lasts: edits of
# the **fact-lookup** MLPs (early-mid MLPs that write a subject's attributes onto its last token)
# forgot facts across formats and resisted relearning, while edits placed by output-tracing
# localisations (causal tracing, attribution patching) leaked. Here, on the fact world, we
# (1) locate the fact-lookup MLPs and extraction heads of 64 people's birth cities, (2) build
# output-tracing circuits of the same size, (3) forget 16 people's birth cities through each
# localisation with one objective and a small learning-rate sweep, and (4) attack every edit
# (relearning, probes, a latent perturbation, direction ablation) and compare.

# %%
import random

import torch

import mechedit
from mechedit import zoo
from mechedit.budget import circuit_size, grow_to_budget
from mechedit.edit import FinetuneConfig, LogOneMinusP, RetainCE
from mechedit.evaluate import ComparisonConfig, compare_localizations, fact_edit_suites
from mechedit.evaluate.robustness import RobustnessConfig
from mechedit.locate import attribution_patching, causal_tracing, fact_lookup
from mechedit.viz import comparison_bars, heatmap, probe_curves
from mechedit.zoo.prompts import fact_pairs, fact_prompts

# Many small forward/backward passes: on 2 shared cores one thread per op is faster than two.
torch.set_num_threads(1)
model = mechedit.load("factworld")
world = zoo.load_world("factworld")
born = [f for f in world.facts if f.relation_id == "P19"]
rng = random.Random(0)
located = rng.sample(born, 64)  # whose recall we localise
forget_facts = located[:16]  # whose birth city we forget
retain_facts = [f for f in born if f not in located][:48]
print(len(born), "people; forgetting e.g.", [(f.subject, f.value) for f in forget_facts[:3]])

# %% [markdown]
# ## 1. Fact lookup
#
# `fact_lookup` runs three measurements on clean/corrupt pairs (the subject swapped for another
# person): linear **probes** of the birth city on the residual stream, at the subject's last token
# and at the final token, by depth, on people held out from the probe's training; **attention
# knockout** of the final token's reading of the subject, head by head (extraction heads, and the
# earliest layer that has one); and **path patching** of each earlier MLP's output at the subject
# tokens into that layer's residual stream (the fact-lookup MLPs: effect >= 0.02 of the
# clean-minus-corrupt logit difference). `min_mlps=1` keeps the best candidate even below the
# threshold (flagged), so that the comparison below has something to edit.

# %%
facts = [fact_prompts(world, f)[0] for f in located]
lookup = fact_lookup(model, facts, min_mlps=1, progress=False)
print("earliest extraction layer:", lookup.extraction_layer, f"({lookup.extraction_layer_source})")
print("extraction heads:", list(lookup.heads))
print("fact-lookup MLPs:", list(lookup.mlps), "below threshold:", lookup.mlps.config.get("below_threshold"))
probe_curves({"subject's last token": lookup.probes_subject, "final token": lookup.probes_last})

# %%
heatmap(lookup.head_effects, title="Attention knockout: share of the logit difference lost per head")

# %% [markdown]
# ## 2. Output-tracing localisations at the same budget
#
# Causal tracing (restore one MLP's output at one position into a run with noised subject
# embeddings) and attribution patching (the gradient estimate of patching each MLP's output) score
# every layer; `grow_to_budget` takes their top layers by |score| until the circuit holds as many
# parameters as the fact-lookup circuit.

# %%
forget_prompts = [fact_prompts(world, f)[0] for f in forget_facts]
trace = causal_tracing(model, forget_prompts, kinds=("mlp",), n_noise=4, progress=False)
attribution = attribution_patching(model, fact_pairs(world, forget_facts), sites=("mlp_out",),
                                   per_position=False, progress=False)
budget = circuit_size(model, lookup.mlps)
localizations = {
    "fact lookup": lookup.mlps,
    "causal tracing": grow_to_budget(trace.mlp, model, n_params=budget),
    "attribution patching": grow_to_budget(attribution["mlp_out"], model, n_params=budget),
    "all MLPs": "all_mlps",
    "all weights": "all",
}
for name, circuit in localizations.items():
    print(f"{name:22s}", circuit if isinstance(circuit, str) else [str(c) for c in circuit])

# %% [markdown]
# ## 3. Forget through each localisation, then attack
#
# One objective for all: `log(1 - p)` on the 16 people's birth cities in the training templates,
# with a retain cross-entropy on 48 other people's, 30 steps, stopped once no training prompt
# gives the old city; the learning rate is the one of the sweep that forgets most while the
# retain set stays >= 90 % (the same rule for every localisation). The robustness evaluation then
# splits the forgotten people in two: attacks train on one half and are scored on the other.

# %%
case = fact_edit_suites(world, forget_facts, exclude=retain_facts, fluency_texts=world.text_heldout[:100])
retain = fact_edit_suites(world, retain_facts, neighbours_per_fact=0, case="retain")
config = ComparisonConfig(
    finetune=FinetuneConfig((LogOneMinusP(), RetainCE(weight=4.0)), steps=30, batch_size=32,
                            forget_target=0.0, eval_every=3),
    lrs=(1e-3, 3e-3),
    robustness=RobustnessConfig(),
)
comparison = compare_localizations(model, localizations, case=case, retain=retain, config=config,
                                   workspace=mechedit.load("factworld"), progress=False)
comparison.headline().round(3)

# %%
comparison_bars(
    comparison,
    {
        "forgotten: training templates": "forget/efficacy/choice_accuracy_true",
        "held-out templates": "forget/paraphrase/choice_accuracy_true",
        "after relearning (held-out half)": "relearn_full/efficacy/choice_accuracy_true",
        "after LoRA relearning": "relearn_lora/efficacy/choice_accuracy_true",
        "latent perturbation": "latent_universal/efficacy/choice_accuracy_true",
        "retained facts": "retain/efficacy/choice_accuracy_true",
    },
    title="Accuracy over the birth cities, after forgetting through each localisation",
)

# %% [markdown]
# The learning-rate sweep behind the selection:

# %%
comparison.sweep_frame().round(3)

# %% [markdown]
# ## What to read
#
# (Filled in from the measured run.)
