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
# # mechedit quickstart: locate a fact and forget it
#
# The whole pipeline on the fact world, mechedit's own small model whose every fact is known:
# **load → locate → select → edit → evaluate → visualise**. Runs offline on a CPU in well under a
# minute.

# %%
import mechedit
from mechedit import zoo
from mechedit.zoo.prompts import fact_prompts
from mechedit.edit import ablate, zero_neurons
from mechedit.evaluate import evaluate_fact_edit
from mechedit.locate import neuron_attribution
from mechedit.viz import before_after, heatmap, notebook_setup

notebook_setup()  # figures and progress bars that survive saving and nbconvert

# %% [markdown]
# ## Load
# `mechedit.load` returns a TransformerLens `TransformerBridge` on raw Hugging Face weights.
# `zoo.load_world` rebuilds the world the model was trained on: its ground truth.

# %%
model = mechedit.load("factworld")
world = zoo.load_world("factworld")
print(model.cfg.n_layers, "layers,", model.cfg.d_mlp, "neurons per MLP")

# %% [markdown]
# Pick a fact, and build its prompts: the training templates, the held-out paraphrases, and
# neighbours (other people with the same sport) to keep.

# %%
fact = next(f for f in world.facts if f.relation_id == "P641")
forget = fact_prompts(world, fact)
paraphrases = fact_prompts(world, fact, heldout=True)
neighbours = world.neighbours(fact)
retain = [p for f in neighbours[:12] for p in fact_prompts(world, f)]
held_out_neighbours = [p for f in neighbours[12:] for p in fact_prompts(world, f)]
print(fact)
print(forget[0].prompt, "->", forget[0].target)

# %% [markdown]
# ## Locate
# Gradient × activation scores every MLP neuron by the predicted drop in the fact's
# log-probability when it is zeroed, minus the same for the neighbours.

# %%
scores = neuron_attribution(model, forget, retain, progress=False)
heatmap(scores, title="neuron attribution (layer × neuron)")

# %% [markdown]
# ## Select
# A circuit is a set of components; it saves as a versioned JSON file.

# %%
circuit = scores.top_k(24)
circuit.save("runs/quickstart/circuit.json")
print(circuit.by_site()["neuron"][:5])

# %% [markdown]
# ## Edit and evaluate
# `ablate` is a reversible activation edit: the model is exactly as before once it exits.
# The report measures every suite before and with the edit.

# %%
report = evaluate_fact_edit(
    model,
    edit=ablate(model, circuit, mode="zero"),
    edited=forget,
    paraphrases=paraphrases,
    neighbours=held_out_neighbours,
    fluency_texts=list(world.text_heldout),
)
table = report.to_frame()
table

# %%
before_after(table[table["metric"] == "accuracy"], title="accuracy before and after zeroing the circuit")

# %% [markdown]
# ## Make it permanent
# The same edit in the weights: revertible bit-for-bit, savable as the changed tensors only,
# and exportable as a plain Hugging Face checkpoint.

# %%
from pathlib import Path  # noqa: E402

from mechedit.edit.export import export_hf  # noqa: E402

edit = zero_neurons(model, circuit)
export_hf(model, "runs/quickstart/hf_checkpoint", edit=edit, overwrite=True)
edit.save("runs/quickstart/edit", overwrite=True)
print(sorted(p.name for p in Path("runs/quickstart/hf_checkpoint").iterdir()))
