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
# # Neuron explorer: where do three methods put one fact, and what does a neuron do?
#
# Three neuron-level locators score every MLP neuron of the fact world's model for one fact:
#
# - **neuron attribution** (gradient × activation at every position): the predicted drop in the
#   target's log-probability when the neuron is zeroed, minus the same for neighbours (other
#   people with the same value); nats;
# - **neuron attribution, subject positions**: the same, summed over the subject's tokens only,
#   which ranks the neurons that *look the subject up*;
# - **knowledge neurons** (integrated gradients of the target's probability at the predicting
#   position, Dai et al. 2022); probability units, no neighbour contrast.
#
# We ask whether they agree, whether they find the layer where `factworld-planted`'s facts were
# planted, and look at one neuron in detail. The last cell is an interactive explorer. Runs offline
# on a CPU in well under a minute.

# %%
import torch

import mechedit
from mechedit import zoo
from mechedit.evaluate import layer_profile, localization_agreement, planted_recovery
from mechedit.unembedding import promoted_tokens
from mechedit.viz import (
    agreement_heatmaps,
    fact_prompt_set,
    heatmap,
    locate_neurons,
    neuron_detail,
    neuron_explorer,
    notebook_setup,
    recovery_bars,
)
from mechedit.viz.explorer import PromptSet

notebook_setup()  # figures and progress bars that survive saving and nbconvert
torch.set_num_threads(1)  # a tiny model's many small passes: one thread is fastest on a shared CPU

# %% [markdown]
# ## One fact, its paraphrases and its neighbours
# A `PromptSet` holds the fact in each training template (`fact`, what the locators score for),
# in the held-out templates (`paraphrase`) and six other people with the same sport
# (`neighbour`, the facts to keep).

# %%
model = mechedit.load("factworld")
world = zoo.load_world("factworld")
person = world.people[0].name
prompts = fact_prompt_set(world, person, "sport", n_neighbours=6)
print(prompts.title)
for group in ("fact", "paraphrase", "neighbour"):
    print(f"{group:>10}: {len(prompts.of(group))} prompts, e.g. {prompts.of(group)[0].prompt!r}")

# %% [markdown]
# ## Locate with three methods
# Each returns `Scores` over layer × neuron. The heatmap marks each method's top 24 neurons by
# |score|; hover a mark to see the tokens the neuron's output weights promote.

# %%
METHODS = ("neuron_attribution", "neuron_attribution_subject", "knowledge_neurons")
scores = {method: locate_neurons(model, prompts, method) for method in METHODS}
for method, s in scores.items():
    top = s.top_k(5, by="abs")
    print(f"{method:>27}:", ", ".join(f"{c} ({s.values[c.layer, c.neuron].item():+.3g})" for c in top))

# %%
top = scores["knowledge_neurons"].top_k(24, by="abs")
notes = {c: ", ".join(t) for c, t in promoted_tokens(model, top, k=5).items()}
heatmap(scores["knowledge_neurons"], mark=top, notes=notes, title=f"knowledge neurons: {prompts.title}")

# %% [markdown]
# ## Do they agree?
# At **component level** (every neuron a cell): top-24 Jaccard (shared share of the top sets) and
# Spearman's rank correlation of |score| over all 3,072 neurons. At **layer level**: each method's
# |score| summed per layer, compared on the top 2 layers.

# %%
cells = localization_agreement(scores, k=24)
layers = localization_agreement(scores, k=2, level="layer")
jaccard, rho = cells.frames()
print(jaccard.round(2), "\n")
print(rho.round(2), "\n")
print("top-2 layers:", layers.top)
agreement_heatmaps(cells, title=f"Do three neuron locators agree on {prompts.title}?")

# %% [markdown]
# What the numbers say, here:
#
# - **Attribution and knowledge neurons rank neurons alike but pick different top sets.** Their
#   top-24 sets barely overlap (Jaccard ≈ 0.07) while their rankings over all neurons correlate
#   (Spearman ≈ 0.5); at layer level both put the mass in layers 0 and 3. They measure different
#   things (a first-order estimate of zeroing everywhere, contrasted with the neighbours, versus
#   integrated gradients at the predicting position only), so partial agreement is what one
#   should expect.
# - **The subject-position variant disagrees with both on the top sets** (Jaccard ≈ 0.04-0.09):
#   it asks which neurons *read the subject*, not which write the answer, and finds layer-0
#   neurons. A disagreement here is a different question, not a failure of one method.
# - Attribution's top neurons carry both signs (L3 neuron 283 at +0.0014 nats, L5 neuron 64 at
#   −0.0008): a negative score means zeroing the neuron is predicted to hurt the neighbours more
#   than the fact, which the neighbour contrast subtracts. Select with `top_k(k)` (largest
#   positive) for an edit, not by |score|.
# - Every method's largest scores are small next to the fact's log-probability (≈ 0.001 nats per
#   neuron for attribution): the fact is spread over many neurons, so no single neuron "is" it.

# %% [markdown]
# ## Do they find a planted layer?
# `factworld-planted` learnt its planted people's facts in one MLP layer only (its other weights
# frozen). Locating five planted facts together (neighbours as the facts to keep), does each
# method rank that layer first? Two ways to turn neuron scores into a layer profile: the **sum**
# of |score| per layer (how much of the effect sits there) and the **max** (the single strongest
# neuron per layer).

# %%
planted_model = mechedit.load("factworld-planted")
planted_world = zoo.load_world("factworld-planted")
planted_layer = zoo.metadata("factworld-planted")["planted_layer"]
planted = PromptSet.join(
    [fact_prompt_set(planted_world, f.subject, f.relation_id, n_neighbours=3) for f in planted_world.planted_facts[::4]],
    title="five planted facts",
)
planted_scores = {method: locate_neurons(planted_model, planted, method, steps=4) for method in METHODS}
by_sum = planted_recovery(planted_scores, layer=planted_layer, op="abs_sum")
by_max = planted_recovery(planted_scores, layer=planted_layer, op="abs_max")
print("planted layer:", planted_layer)
print("summed |score|:\n", by_sum[["method", "rank", "top_layer", "share"]].round(3).to_string(index=False))
print("max |score|:\n", by_max[["method", "rank", "top_layer", "share"]].round(3).to_string(index=False))
for method, s in planted_scores.items():
    print(f"{method:>27} layer profile (sum):", [round(v, 2) for v in layer_profile(s).tolist()])

# %%
recovery_bars(by_max, layer=planted_layer, title=f"Strongest neuron per layer: is the planted layer (L{planted_layer}) first?")

# %% [markdown]
# - By the **sum**, no method puts the planted layer first: layer 0 (attribution and the subject
#   variant) or layer 3 (knowledge neurons) carries the most |score|. A layer ranking by total
#   mass would send an edit to the wrong layer.
# - By the **strongest neuron** none does either: layer 0 has the single strongest neuron for every
#   method, and the planted layer comes 2nd to 4th. (On the planted model before issue 7's
#   retraining, attribution and knowledge neurons did find it this way.)
# - The planted layer is found at **layer level**: exact patching of each MLP's whole output
#   (the zoo's ground-truth grid, `zoo.metadata(...)["ground_truth_patching"]`, planted facts minus
#   control facts) puts layer 2 first at the final token, by far. The planted facts are spread over
#   many of its neurons, each small next to layer 0's identity neurons.
# - So "where is the fact?" depends on the granularity and the aggregation as much as on the
#   method; a planted ground truth is what tells them apart.

# %%
patched = zoo.metadata("factworld-planted")["ground_truth_patching"]
contrast = torch.tensor(patched["contrast"])
print("exact mlp_out patching, planted - control, per layer (max over positions):",
      [round(v, 3) for v in contrast.max(-1).values.tolist()])

# %%
assert not by_sum["recovered"].any() and not by_max["recovered"].any()
assert int(contrast.max(-1).values.argmax()) == planted_layer

# %% [markdown]
# ## One neuron in detail
# The knowledge-neuron method's top neuron: the tokens it promotes, its activation on every
# prompt of the set (bars at the predicting position, diamonds at the subject's last token), and
# its attribution per prompt. The attributions of the `fact` prompts average to exactly the score
# the locator gave it.

# %%
best = scores["knowledge_neurons"].top_k(1).components[0]
detail = neuron_detail(model, prompts, best, method="knowledge_neurons")
print(best, "promotes:", ", ".join(detail.promoted))
print(f"score {detail.score:.4f} = locator's {scores['knowledge_neurons'].values[best.layer, best.neuron].item():.4f}")
detail.frame.round(3)

# %%
detail.figure()

# %% [markdown]
# Here the neuron promotes the fact's value (among other attribute words) and fires strongly at
# the predicting position on every wording of this person's sport, held-out paraphrases
# included, but not at the subject's tokens. On the neighbours it fires on two of six and stays
# at zero on the other four, which the model still completes with the same sport: it is part of
# how the model recalls *this person's* sport, not a general "baseball" neuron. Its attribution
# on the neighbours (the `neighbour` bars) is the collateral damage an edit of this neuron risks;
# here it is a fraction of its attribution on the fact.

# %% [markdown]
# ## The explorer
# Choose a person and relation (or type a free prompt and its target), a method and a site, and
# press **locate**: the heatmap is recomputed with the top neurons marked. Enter a layer and
# neuron (or click a cell, where plotly's `FigureWidget` is installed: `pip install anywidget`)
# and press **show neuron** for its detail.
#
# **The explorer needs a live kernel** (JupyterLab, VS Code): in an exported HTML page or on
# GitHub this cell shows only its text form; every figure above is static and shows anywhere.
# The same computation is available without widgets: `fact_prompt_set`, `locate_neurons`,
# `neuron_detail`.

# %% tags=["live-widget"]
explorer = neuron_explorer(model, world, person=person, relation="sport", n_neighbours=6)
explorer.locate()
explorer.show_neuron()
explorer
