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
# # Exact activation patching on the fact world
#
# Where does `factworld-planted` keep a fact? This model had one MLP layer (recorded in its
# metadata) trained, alone, to store the birthplace, job, employer, sport, instrument and language
# of twenty "planted" people. Patching finds it: run the model on a prompt about *another* person
# (the corrupt run), copy one component's activation from the prompt about the planted person (the
# clean run), and see how much of the planted answer comes back (denoising). Runs in about a
# minute on 2 CPU cores.

# %%
import random

import mechedit
from mechedit import zoo
from mechedit.checks import check_hooks
from mechedit.locate import activation_patching
from mechedit.viz import heatmap, notebook_setup
from mechedit.zoo.prompts import fact_pairs
from mechedit.zoo.world import fill

notebook_setup()  # figures and progress bars that survive saving and nbconvert

model = mechedit.load("factworld-planted")
world = zoo.load_world("factworld-planted")
planted_layer = zoo.metadata("factworld-planted")["planted_layer"]
print(model.cfg.n_layers, "layers; the facts were planted in layer", planted_layer)

# %% [markdown]
# Pairs: each planted fact in the template "the <relation> of {subject} is", clean with its own
# subject, corrupt with another planted person whose value differs. Every such prompt has the
# same number of tokens, so positions line up across pairs. The **control** pairs are the same
# templates about people the model learnt in ordinary training.

# %%
rng = random.Random(0)


planted = fact_pairs(world, world.planted_facts, pool=world.planted_facts, rng=rng)
control = fact_pairs(world, rng.sample(world.facts, 40), rng=rng)
print(planted[0])

# %% [markdown]
# The hooks are checked once (residual sums, block chaining, bridge logits against plain
# Hugging Face); every call below reuses the check and records it in the scores' provenance.

# %%
hooks_ok = check_hooks(model).require()
options = dict(hook_check=hooks_ok, progress=False)

# %% [markdown]
# ## The residual stream, layer × position
# The corrupt subject's tokens are outlined. Restoring the clean residual at either of them in the
# first layers brings back about half the answer (0.48-0.50: the model reads both name tokens);
# from layer 2 on the information moves to the final position (0.49, then 0.86, then 1.00).

# %%
resid = activation_patching(model, planted, site="resid_pre", normalize=True, **options)
heatmap(resid, title="resid_pre patching (normalised: 1 = clean answer restored)")

# %% [markdown]
# ## MLP outputs: raw, and contrasted with control facts
# The raw `mlp_out` effect is largest in layer 0 for *every* subject: the first MLP acts like an
# extension of the embeddings and carries who the subject is, planted or not. Subtracting the same
# scores on control facts removes what is common to all subjects; what remains is specific to
# the planted facts.

# %%
raw = activation_patching(model, planted, site="mlp_out", **options)
contrast = activation_patching(model, planted, site="mlp_out", control=control, **options)
heatmap(contrast, title="mlp_out patching, planted minus control facts")

# %%
per_layer_raw = activation_patching(model, planted, site="mlp_out", per_position=False, **options)
per_layer = activation_patching(model, planted, site="mlp_out", per_position=False, control=control, **options)
for layer in range(model.cfg.n_layers):
    print(f"layer {layer}: raw {per_layer_raw.values[layer]:+.2f}   contrast {per_layer.values[layer]:+.2f}")
found = int(per_layer.values.argmax())
print("largest contrast at layer", found, "| planted layer", planted_layer)
assert found == planted_layer

# %% [markdown]
# ## Attention heads
# Each head's output (`hook_z`) patched at every position at once: layer × head.

# %%
heads = activation_patching(model, planted, site="head", per_position=False, **options)
heatmap(heads, title="head patching (all positions)")

# %% [markdown]
# ## Causal tracing (ROME)
# No corrupt prompt needed: the subject's token embeddings get Gaussian noise (3σ), and each clean
# hidden state is restored in turn. The indirect effect is P(restored) − P(corrupt) of the
# planted answer. States at the subject's tokens carry the fact early; restoring MLP outputs
# (here a window of one layer, scaled from ROME's 10 of 48) shows the planted layer, again most
# clearly in the contrast with control facts.

# %%
from mechedit.locate import causal_tracing
from mechedit.prompts import FactPrompt


def fact_prompts(facts):
    return [FactPrompt(prompt=fill(world.relation[f.relation_id].train_templates[1], f.subject),
                       subject=f.subject, target=f.value) for f in facts]


traced = causal_tracing(model, fact_prompts(world.planted_facts), n_noise=5, hook_check=hooks_ok, progress=False)
heatmap(traced["state"], title="causal tracing: restoring one hidden state (subject outlined)")

# %%
controlled = causal_tracing(model, fact_prompts(world.planted_facts), kinds=("mlp",), n_noise=5,
                            control=fact_prompts(rng.sample(world.facts, 20)), hook_check=hooks_ok, progress=False)
heatmap(controlled["mlp"], title="causal tracing, MLP restored: planted minus control facts")

# %%
by_layer = controlled["mlp"].values.nan_to_num(0).amax(dim=1)
print("MLP contrast, max over positions:", [round(v, 3) for v in by_layer.tolist()])
assert int(by_layer.argmax()) == planted_layer

# %% [markdown]
# ## What to read
# Patching finds the planted layer only against a control. The raw per-layer MLP effect
# (logit difference, nats) ranks layer 0 first (+19.0) and the planted layer 2 second (+15.1): the
# first MLP carries who the subject is for everyone, so a raw ranking would point an edit at the
# wrong layer. Minus the same patching on 40 ordinary facts, layer 2 stands alone (+6.8, the next
# +0.2). Causal tracing agrees only in the contrast as well (restored probability 0.09 at layer 2
# against 0.04 at most elsewhere). What patching does not tell you is which *neurons* of layer 2,
# nor whether removing them forgets the fact without collateral damage: that is for a locator
# with neuron resolution and an edit evaluated on neighbours (notebooks 00, 03 and 05).
