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
# # Unlearning a planted bias with PCGU
#
# The fact world has a planted occupation-gender bias: for every occupation one pronoun ("he" or
# "she") follows it in training text far more often than the other. PCGU (partitioned contrastive
# gradient unlearning, Yu et al., Findings of ACL 2023) locates the bias in the **weight
# partitions** (one output unit of one weight matrix, one embedding row, one bias vector) where the
# gradient of the advantaged side of minimal pairs points away from the gradient of the
# disadvantaged side, and updates only those, until the model prefers neither side (50 %).
#
# We use the masked fact world, `factworld-mlm` (a small BERT), which reaches 50 % within two
# update steps. Measured: 19 s for the whole notebook on 2 CPU cores shared with other jobs
# (load average about 3), of which the update itself took 3 s.

# %%
import torch

import mechedit
from mechedit import zoo
from mechedit.data_pairs import world_bias_splits
from mechedit.edit import PCGUUpdateConfig, pcgu_update
from mechedit.evaluate import pair_preference
from mechedit.evaluate.bias import bias_edit_table
from mechedit.locate import PCGUConfig, pcgu
from mechedit.locate.pcgu import partition_specs
from mechedit.viz import bias_bars, bias_history, notebook_setup, partition_heatmap

notebook_setup()  # figures and progress bars that survive saving and nbconvert

# Many small forward/backward passes: on 2 shared cores, two threads per op wait on each other
# more than they compute (one thread ran this notebook several times faster).
torch.set_num_threads(1)
model = mechedit.load("factworld-mlm")
world = zoo.load_world("factworld-mlm")

# %% [markdown]
# ## Pairs
#
# A `ContrastivePair` is two sentences that differ in one span: the **advantaged** side (the
# planted pronoun) and the **disadvantaged** side (the other one). `world_bias_splits` makes them
# from the world's bias templates: `train` (three training templates x 60 occupations), `dev`
# (the other three training templates; it picks the checkpoint) and `test` (two held-out
# templates the model never saw).

# %%
splits = world_bias_splits(world)
print({name: len(pairs) for name, pairs in splits.items()})
for pair in splits["test"][:3]:
    print(f"{pair.group:>12}: {pair.advantaged!r}  vs  {pair.disadvantaged!r}")

# %% [markdown]
# The bias is the share of pairs where the model prefers the advantaged side. On a masked LM the
# pronoun is masked and the two pronouns' logits at the mask are compared (PCGU's protocol); 50 %
# is no preference.

# %%
before = pair_preference(model, splits["test"])
print(f"test bias before: {before.percent:.1f} % of {before.n_pairs} held-out pairs prefer the planted pronoun")

# %% [markdown]
# ## Partitions and the ranking
#
# Every trainable tensor is cut into partitions: a 2-D weight by output unit (all the weights
# feeding one unit, the paper's "input aggregation"), an embedding by token row, a bias or
# LayerNorm vector as one partition. `pcgu` sums each side's gradient over the pairs, takes the
# cosine of the two per partition and selects the `k` lowest (here 20 % of all partitions).

# %%
specs = partition_specs(model)
print(f"{sum(s.n_units for s in specs):,} partitions over {len(specs)} tensors")
selection = pcgu(model, splits["train"], k=0.2)
cosines = selection.scores.values
print(f"{len(selection.selected):,} selected; cosine of the selected: "
      f"{float(cosines[selection.selected].min()):.3f} .. {float(cosines[selection.selected].max()):.3f}; "
      f"{int(cosines.isnan().sum()):,} partitions have no gradient on one side (never selected)")

# %% [markdown]
# Where do the selected partitions sit? One cell per layer and tensor: the share of that tensor's
# partitions selected (hover for the counts; the embeddings and the MLM head are outside the
# blocks).

# %%
table = selection.tensor_table()
partition_heatmap(table, title="PCGU on factworld-mlm: share of each tensor's partitions selected")

# %%
table.sort_values("selected", ascending=False).head(8)

# %% [markdown]
# ## The update
#
# Each step takes a batch of 16 training pairs, **reselects** the partitions on that batch and
# takes a plain gradient step on the advantaged side's score in them only
# (`θ_p ← θ_p − lr · g⁺_p`); every other weight keeps its exact bits. After every step the dev
# bias is measured and the checkpoint **closest to 50 %** is kept (the lowest would overshoot into
# the opposite bias). The whole run is one `WeightEdit`: applied and reverted bit-exactly, savable.
# One epoch (12 steps), the settings of `bench/README.md`'s table.

# %%
config = PCGUUpdateConfig(ranking=PCGUConfig(k=0.2), lr=1e-3, epochs=1, batch_size=16)
result = pcgu_update(model, splits["train"], splits["dev"], config=config)
run = result.runs["pcgu"]
print(f"chosen: step {run.checkpoint:g} of {run.steps}, dev bias {100 * run.dev_bias:.1f} %; "
      f"{len(run.edit.names)} tensors edited; {run.seconds:.0f} s")
bias_history({"pcgu": run.history}, checkpoints={"pcgu": run.checkpoint})

# %% [markdown]
# ## Bias before and after, and what it cost
#
# Test bias on the held-out templates, fact accuracy on held-out fact templates and the masked
# model's pseudo-perplexity on held-out text, with the edit applied (and reverted after).

# %%
after_table = bias_edit_table(model, world, result, splits["test"])
after_table

# %%
bias_bars(after_table, title="factworld-mlm: held-out pairs preferring the planted pronoun")

# %% [markdown]
# What to read (measured): the planted pronoun wins 100 % of the held-out pairs before, 48.3 %
# after step 2, inside the 50 ± 5 % band, with fact accuracy (0.9976) and pseudo-perplexity
# (4.136) unchanged to three decimals. The dev bias stays at 48.3 % for two more steps, then falls
# to 1.1 % at step 5 and 0 % from step 6: this model overshoots fast at this learning rate, which
# is why the checkpoint rule aims at 50 %, not at the lowest bias. Unrestricted fine-tuning and
# task-vector negation on the same pairs (`pcgu_update(..., baselines=("finetune", "task_vector"))`)
# and the causal `factworld` are compared in `bench/README.md`.
