"""What an MLP neuron writes, read through the unembedding: the tokens it promotes.

A neuron ``(layer, j)`` adds ``act * W_out[layer][j]`` to the residual stream. Its direct effect on
the logits, ignoring everything after it, is ``W_out[layer][j] * g @ W_U`` where ``g`` is the final
norm's weight (LayerNorm's centring and both norms' scaling depend on the whole residual, so only
the elementwise weight is folded in). The tokens with the largest values are the ones the neuron
*promotes* when it fires positively (Geva et al. 2022's "value vectors"). On BERT the masked-LM
head's dense + GELU transform before its norm is skipped, so there it is a rougher reading.

Rows are computed per layer in chunks of neurons, so a 32-layer, 11,008-neuron, 32,000-token
model needs one ``[chunk, vocab]`` block at a time, never the whole ``[layers, d_mlp, vocab]``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechedit.components import Component
from mechedit.tokens import get_tokenizer


def _final_norm_weight(model: Any) -> Tensor | None:
    norm = getattr(model, "ln_final", None)
    weight = getattr(norm, "w", None) if norm is not None else None
    return weight if isinstance(weight, Tensor) else None


@torch.no_grad()
def neuron_logit_effects(model: Any, layer: int, neurons: Tensor | list[int]) -> Float[Tensor, "k vocab"]:
    """``[len(neurons), d_vocab]``: the direct logit effect of one unit of each neuron's activation.

    ``model``: a loaded bridge (``mechedit.load``). Positive entries are tokens the neuron
    promotes when its activation is positive.
    """
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has {n_layers} layers")
    w_out = model.blocks[layer].mlp.W_out  # [d_mlp, d_model]
    index = torch.as_tensor(neurons, dtype=torch.long, device=w_out.device)
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < w_out.shape[0]):
        raise ValueError(f"neuron index out of range: layer {layer} has {w_out.shape[0]} neurons")
    rows = w_out[index].float()
    gain = _final_norm_weight(model)
    if gain is not None:
        rows = rows * gain.float()
    return rows @ model.W_U.float()


@torch.no_grad()
def promoted_tokens(
    model: Any, neurons: Iterable[Component], *, k: int = 5, chunk: int = 1024
) -> dict[Component, tuple[str, ...]]:
    """Each neuron's ``k`` most promoted tokens (largest direct logit effect first).

    ``neurons``: ``Component("neuron", layer, neuron=j)`` items (e.g. a circuit's components or
    ``scores.top_k(...)``); other sites are rejected. Computed ``chunk`` neurons at a time.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    by_layer: dict[int, list[Component]] = defaultdict(list)
    for c in neurons:
        if c.site != "neuron" or c.neuron is None:
            raise ValueError(f"promoted tokens are defined for MLP neurons, got {c!r}")
        by_layer[int(c.layer)].append(c)
    tokenizer = get_tokenizer(model)
    out: dict[Component, tuple[str, ...]] = {}
    for layer, items in sorted(by_layer.items()):
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            effects = neuron_logit_effects(model, layer, [int(c.neuron) for c in part])
            top = effects.topk(min(k, effects.shape[-1]), dim=-1).indices.tolist()
            for c, ids in zip(part, top, strict=True):
                out[c] = tuple(tokenizer.convert_ids_to_tokens(ids))
    return out
