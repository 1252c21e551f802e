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
# # Attribution patching: the gradient estimate, checked against exact patching
#
# Exact patching runs the model once per patched cell; attribution patching (AtP) estimates every
# cell at once from one forward and one backward pass, `(a_clean - a_corrupt) · ∂metric/∂a` at the
# corrupt run. How good is the estimate on the fact world, and what do integrated gradients
# (averaging the gradient along the path from corrupt to clean) add? Runs in about a minute on
# 2 CPU cores.

# %%
import random

import plotly.graph_objects as go
import torch

import mechedit
from mechedit import zoo
from mechedit.checks import check_hooks
from mechedit.evaluate import verify_attribution
from mechedit.locate import activation_patching, attribution_patching
from mechedit.prompts import PromptPair
from mechedit.viz import heatmap
from mechedit.zoo.world import fill

model = mechedit.load("factworld-planted")
world = zoo.load_world("factworld-planted")
planted_layer = zoo.metadata("factworld-planted")["planted_layer"]
rng = random.Random(0)


def pairs_for(facts, pool):
    pairs = []
    for fact in facts:
        partner = rng.choice([g for g in pool if g.relation_id == fact.relation_id
                              and g.subject != fact.subject and g.value != fact.value])
        template = world.relation[fact.relation_id].train_templates[1]  # "the <relation> of {} is"
        pairs.append(PromptPair(clean=fill(template, fact.subject), corrupt=fill(template, partner.subject),
                                answer=fact.value, wrong_answer=partner.value))
    return pairs


planted = pairs_for(world.planted_facts, world.planted_facts)
control = pairs_for(rng.sample(world.facts, 20), world.facts)
hooks_ok = check_hooks(model).require()

# %% [markdown]
# ## Exact patching, plain AtP and integrated gradients
# Heads at every position (layer × head × position) and the residual stream (layer × position).

# %%
sites = ("head", "resid_pre")
exact = {s: activation_patching(model, planted, site=s, hook_check=hooks_ok, progress=False) for s in sites}
atp = attribution_patching(model, planted, sites=sites, hook_check=hooks_ok, progress=False)
ig = attribution_patching(model, planted, sites=sites, ig_steps=5, hook_check=hooks_ok, progress=False)


def pearson(a, b):
    return torch.corrcoef(torch.stack([a.values.flatten(), b.values.flatten()]))[0, 1].item()


for s in sites:
    print(f"{s:10s} Pearson with exact patching: AtP {pearson(exact[s], atp[s]):.3f}   IG (k=5) {pearson(exact[s], ig[s]):.3f}")

# %% [markdown]
# Plain AtP underestimates the largest effects: copying the clean subject's residual flips the
# answer from a confident wrong city to a confident right one, and a first-order expansion around
# the corrupt run cannot follow the saturating logit difference. Integrated gradients read the
# gradient along the way and track exact patching closely.

# %%
fig = go.Figure()
for name, estimate in (("AtP", atp), ("IG, k=5", ig)):
    fig.add_scatter(x=exact["head"].values.flatten().numpy(), y=estimate["head"].values.flatten().numpy(),
                    mode="markers", name=name, opacity=0.6)
fig.update_layout(title="head × position: estimate vs exact patching", xaxis_title="exact effect (nats)",
                  yaxis_title="estimated effect (nats)", height=450)
fig

# %%
heatmap(ig["resid_pre"], title="resid_pre, integrated gradients (k=5)")

# %% [markdown]
# ## Checking an estimate on your own task
# `verify_attribution` patches exactly the estimate's top cells and a random sample of the rest,
# and reports how far to trust it.

# %%
for name, estimate in (("AtP", atp), ("IG", ig)):
    check = verify_attribution(model, planted, estimate["head"], top_k=15, n_random=15, seed=0)
    print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in check.to_dict().items()})

# %% [markdown]
# ## The planted layer, by contrast with control facts
# As with exact patching (notebook 01), the per-layer `mlp_out` estimate minus the same estimate
# on control facts puts the planted layer first.

# %%
contrast = attribution_patching(model, planted, sites=("mlp_out",), per_position=False, control=control, hook_check=hooks_ok, progress=False)
print([round(v, 2) for v in contrast["mlp_out"].values.tolist()], "planted layer:", planted_layer)
assert int(contrast["mlp_out"].values.argmax()) == planted_layer
