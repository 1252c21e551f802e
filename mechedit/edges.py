"""The residual-stream edge graph: which components write to it, which read it, and how.

In a pre-norm decoder the residual stream is a running sum, so every component's input is a sum
of earlier components' outputs. **Writers** put a vector into the stream: the token embedding
(``embed``), each attention head's output -- its mixed values times its slice of W_O --
(``a{l}.h{h}``) and each MLP's output (``m{l}``). **Readers** take their input from it: each
head's query, key and value input (``a{l}.h{h}.q`` / ``.k`` / ``.v``; under grouped-query
attention ``k`` / ``v`` count key/value heads), each MLP's input (``m{l}``) and the unembedding
(``logits``). An **edge** ``w -> r`` exists when ``w`` comes before ``r``: a reader in layer ``l``
reads every earlier layer's writers, and the MLP also reads its own layer's heads unless attention
and MLP run side by side (GPT-NeoX). This is TransformerLens's edge granularity.

A head's q/k/v input is never materialised by the model: the block normalises the stream once
and every head projects the same normalised vector. Methods that need one reader's own input
(edge attribution, edge ablation) rebuild it from this module's pieces: the head's rows of the
projection (``head_projection``) and the block's norm module (``attention_norm``) applied to a
per-head copy of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechedit import components as comp
from mechedit.components import Component

__all__ = [
    "EdgeGraph",
    "attention_norm",
    "edge_component",
    "edge_graph",
    "head_projection",
    "head_results",
    "tl_node_label",
    "writer_hooks",
    "writer_outputs",
]


@dataclass(frozen=True)
class EdgeGraph:
    """Writers, readers and the ``Bool[writer, reader]`` edge mask of one model (module docstring).

    Writer order: ``embed``, then per layer its heads and its MLP. Reader order: per layer the
    query heads, key heads, value heads and the MLP; last ``logits``. ``reads[j]`` is how many
    leading writers reader ``j`` reads (the mask is ``writer index < reads[reader]``).
    """

    writers: tuple[str, ...]
    readers: tuple[str, ...]
    reads: tuple[int, ...]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool

    @property
    def mask(self) -> Tensor:
        return torch.arange(len(self.writers))[:, None] < torch.tensor(self.reads)[None, :]

    def layer_readers(self, layer: int) -> slice:
        """The reader indices of ``layer``: its q, k, v heads and its MLP."""
        width = self.n_heads + 2 * self.n_kv_heads + 1
        return slice(layer * width, (layer + 1) * width)

    def writer_index(self, label: str) -> int:
        return self._index(self.writers, label, "writer")

    def reader_index(self, label: str) -> int:
        return self._index(self.readers, label, "reader")

    @staticmethod
    def _index(labels: tuple[str, ...], label: str, what: str) -> int:
        try:
            return labels.index(label)
        except ValueError:
            raise ValueError(
                f"{label!r} is not a {what} of this model; {what}s look like {', '.join(labels[:3])}, ..."
            ) from None


def edge_graph(model: Any) -> EdgeGraph:
    """The edge graph of a bridge model; a clear error if its residual stream is not a plain sum."""
    arch = comp.architecture_sites(model)
    form = None if arch is None else arch.residual_form(model.original_model.config)
    if form not in ("sequential", "parallel"):
        raise ValueError(
            "edges need a pre-norm model whose residual stream is a plain sum of writes (GPT-2, "
            f"GPT-NeoX, Llama); this model's residual form is {form or 'unknown'!r} (post-LN "
            "models such as BERT normalise each write). Use node sites instead."
        )
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    parallel = form == "parallel"
    writers, readers, reads = ["embed"], [], []
    for layer in range(n_layers):
        before = len(writers)
        for kind, count in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
            readers += [f"a{layer}.h{h}.{kind}" for h in range(count)]
            reads += [before] * count
        writers += [f"a{layer}.h{h}" for h in range(n_heads)]
        readers.append(f"m{layer}")
        reads.append(before if parallel else len(writers))
        writers.append(f"m{layer}")
    readers.append("logits")
    reads.append(len(writers))
    return EdgeGraph(tuple(writers), tuple(readers), tuple(reads), n_layers, n_heads, n_kv, parallel)


def edge_component(label: str) -> Component | None:
    """A writer or reader label as the ``Component`` it belongs to (``logits``: ``None``).

    ``embed`` -> embed; ``a3.h2`` and ``a3.h2.q`` -> head (3, 2); ``m3`` -> mlp_out of layer 3.
    A key/value reader under grouped-query attention names a key/value head; it maps to the
    query head of the same index, so use the edge list (not the components) for such models.
    """
    if label == "logits":
        return None
    if label == "embed":
        return Component("embed", 0)
    if label.startswith("m"):
        return Component("mlp_out", int(label[1:]))
    layer, head = label[1:].split(".")[:2]
    return Component("head", int(layer), head=int(head[1:]))


def tl_node_label(node: Any) -> str:
    """The label of a TransformerLens ``attribution_patching.Node`` (its position dropped).

    To read TransformerLens's edge scores against ours: ``(tl_node_label(w), tl_node_label(r))``.
    """
    if node.kind == "embed":
        return "embed"
    if node.kind in ("attn_head_out", "q_input", "k_input", "v_input"):
        suffix = "" if node.kind == "attn_head_out" else f".{node.kind[0]}"
        return f"a{node.layer}.h{node.head}{suffix}"
    if node.kind in ("mlp_out", "mlp_in"):
        return f"m{node.layer}"
    if node.kind == "logits":
        return "logits"
    raise ValueError(f"unknown TransformerLens node kind {node.kind!r}")


def _as_out_in(module: torch.nn.Module) -> Tensor:
    """A projection's weight as ``[out, in]`` (GPT-2's ``Conv1D`` stores ``[in, out]``)."""
    weight = module.weight
    return weight.T if type(module).__name__ == "Conv1D" else weight


def _projection(model: Any, layer: int, part: str) -> torch.nn.Module:
    bridge = getattr(model.blocks[layer].attn, part)
    return getattr(bridge, "original_component", bridge)


def attention_norm(model: Any, layer: int) -> torch.nn.Module:
    """The HF norm module in front of ``layer``'s attention (LayerNorm or RMSNorm), no hooks."""
    bridge = model.blocks[layer].ln1
    return getattr(bridge, "original_component", bridge)


def head_projection(model: Any, layer: int, part: str) -> tuple[Tensor, Tensor | None]:
    """``W [heads, d_head, d_model]`` and bias ``[heads, d_head]`` (or ``None``) of q, k or v.

    ``hook_q[..., h, :] == ln1_out @ W[h].T + b[h]`` (``hook_q`` is before rotary embeddings).
    """
    module = _projection(model, layer, part)
    weight = _as_out_in(module)
    d_head = int(model.cfg.d_head)
    w = weight.reshape(-1, d_head, weight.shape[-1])
    bias = getattr(module, "bias", None)
    return w, None if bias is None else bias.reshape(-1, d_head)


def head_results(model: Any, layer: int, z: Tensor) -> Tensor:
    """Each head's write to the residual stream, ``[batch, pos, head, d_model]``, from ``hook_z``.

    ``z`` is ``[batch, pos, head, d_head]``; W_O's bias belongs to no head and is left out.
    """
    w_o = _as_out_in(_projection(model, layer, "o"))  # [d_model, heads * d_head]
    w_o = w_o.reshape(w_o.shape[0], z.shape[2], z.shape[3])
    return torch.einsum("bphe,dhe->bphd", z, w_o.to(z.dtype))


def writer_hooks(n_layers: int) -> list[str]:
    """The hooks every writer's output is read from: the embedding, each ``hook_z``, each MLP out."""
    return ["hook_embed"] + [f"blocks.{i}.{h}" for i in range(n_layers) for h in ("attn.hook_z", "hook_mlp_out")]


def writer_outputs(model: Any, acts: dict[str, Tensor], n_layers: int) -> Tensor:
    """Every writer's output ``[batch, pos, writer, d_model]`` in graph order, from ``writer_hooks``.

    Linear in ``acts`` (W_O's bias is left out), so differences of two runs' activations give the
    writers' differences.
    """
    parts = [acts["hook_embed"].unsqueeze(2)]
    for layer in range(n_layers):
        parts.append(head_results(model, layer, acts[f"blocks.{layer}.attn.hook_z"]))
        parts.append(acts[f"blocks.{layer}.hook_mlp_out"].unsqueeze(2))
    return torch.cat(parts, dim=2)
