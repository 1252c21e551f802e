"""PCGU ranking: the weight partitions whose gradients disagree most between the sides of a bias.

Partitioned contrastive gradient unlearning (Yu et al., Findings of ACL 2023) locates a bias in
the weight partitions where the gradient of the **advantaged** side of minimal sentence pairs
points away from the gradient of the **disadvantaged** side:

    g+ = d/dθ sum_i score(advantaged_i),   g- = d/dθ sum_i score(disadvantaged_i)
    cos_p = <g+_p, g-_p> / (|g+_p| |g-_p|)        for every partition p of every tensor

and selects the ``k`` partitions with the **lowest** cosine across the whole model.

Each side is scored as in ``mechedit.pair_scores`` (re-exported here): a causal LM's summed (or
mean) sequence log-probability; a masked LM's logit (or log-prob) of the side's span tokens at the
masked differing span.

Partitions (``partition_table``): every trainable tensor (plain HF names, tied tensors once, from
``components.partition_sizes``) is cut into units by meaning, not storage layout:

* 2-D linear weights: by **output unit** (``aggregation="input"``, the paper's default: all the
  weights feeding one unit) or by **input unit** (``aggregation="output"``); GPT-2's ``Conv1D``
  stores ``[in, out]``, so its output units are columns (``mechedit.hf.LAYOUTS`` says which);
* embedding tables: one partition per row (token or position) under both aggregations;
* 1-D tensors (biases, LayerNorm): one partition each, the whole vector.

Everything is vectorised: per tensor, the dot products and squared norms of all its partitions are
einops reductions of the two gradients (one pass each), the cosines of all tensors are concatenated,
and one stable sort selects the global ``k``. A partition whose gradient is zero on either side
(an embedding row of a token no pair contains, a tensor the score does not reach) has no cosine: it
is NaN in the scores and never selected, unless ``include_zero=True``, which scores it 0 as the
reference code does (and then ranks it among the first).

Returns ``PCGUSelection``: ``Scores`` over a ``partition`` axis (values: the cosine, in [-1, 1]),
a ``Circuit`` of the selected partitions, and boolean masks of the selected entries per tensor
(what the update in ``mechedit.edit.pcgu`` writes to).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from einops import reduce
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from mechedit.checks import require_eval_mode
from mechedit.circuit import Circuit
from mechedit.components import Component, _owners, partition_sizes
from mechedit.data_pairs import ContrastivePair
from mechedit.hf import LAYOUTS, architecture, hf_model, hf_parameters
from mechedit.models import model_device
from mechedit.pair_scores import (
    MASKED_ARCHITECTURES,
    PairBatch,
    pair_gradients,
    scoring_mode,
    side_scores,
    tokenize_pair_sides,
)
from mechedit.provenance import Provenance
from mechedit.scores import PartitionTable, Scores

Aggregation = Literal["input", "output"]


@dataclass(frozen=True)
class PCGUConfig:
    """Settings of the PCGU ranking (and of each step of the update).

    Attributes:
        k: how many partitions to select: an int ``>= 1`` (a count) or a float in ``(0, 1]``
            (a fraction of all partitions, rounded, at least 1). The paper: 10,000 for BERT-base.
        aggregation: ``"input"`` (partition = one output unit and all its input weights; the
            paper's default) or ``"output"`` (one input unit and all its output weights).
        mode: ``"auto"`` (masked for ``MASKED_ARCHITECTURES``, else causal), ``"causal"`` or
            ``"masked"``.
        causal_reduction: a causal side's score is the ``"sum"`` or ``"mean"`` of its tokens'
            log-probabilities (nats).
        masked_score: a masked side's score is the ``"logit"`` (the paper) or ``"logprob"`` of its
            span tokens at the masks, summed over the span.
        include_zero: also rank partitions with a zero gradient on either side (cosine 0, as the
            reference implementation); by default they are excluded (NaN).
        batch_size: pairs per forward/backward pass (gradients are summed over all pairs).
        params: restrict the partitions to these HF parameter names (``None``: every tensor).
    """

    k: int | float = 0.01
    aggregation: Aggregation = "input"
    mode: Literal["auto", "causal", "masked"] = "auto"
    causal_reduction: Literal["sum", "mean"] = "sum"
    masked_score: Literal["logit", "logprob"] = "logit"
    include_zero: bool = False
    batch_size: int = 16
    params: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        k = self.k
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"k must be an int count or a float fraction, got {k!r}")
        if isinstance(k, int) and k <= 0:
            raise ValueError(f"k must be >= 1 partitions (or a fraction in (0, 1]), got {k}")
        if isinstance(k, float) and not 0.0 < k <= 1.0:
            raise ValueError(
                f"a fractional k must be in (0, 1] (a share of all partitions), got {k}; "
                "pass an int for a count"
            )
        choices = {
            "aggregation": ("input", "output"),
            "mode": ("auto", "causal", "masked"),
            "causal_reduction": ("sum", "mean"),
            "masked_score": ("logit", "logprob"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.params is not None:
            if isinstance(self.params, str):
                raise ValueError(f"params must be a list of names, not one string: [{self.params!r}]")
            object.__setattr__(self, "params", tuple(self.params))


# --- the two sides' gradients ---------------------------------------------------------------------


def side_gradients(
    model: Any, batch: PairBatch, names: Sequence[str], side: str, cfg: PCGUConfig
) -> dict[str, Tensor]:
    """d (sum over pairs of ``side``'s score) / d parameter, per HF name, with ``cfg``'s side
    scoring, summed over ``cfg.batch_size`` chunks (``mechedit.pair_scores.pair_gradients``)."""
    return pair_gradients(
        model, batch, names, side,
        batch_size=cfg.batch_size, causal_reduction=cfg.causal_reduction, masked_score=cfg.masked_score,
    )


# --- partitions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionSpec:
    """How one tensor is cut: ``axis`` indexes its partitions (``None``: the whole tensor is one)."""

    name: str
    shape: tuple[int, ...]
    axis: int | None

    @property
    def n_units(self) -> int:
        return 1 if self.axis is None else self.shape[self.axis]


def partition_specs(model: Any, aggregation: Aggregation = "input", params: Sequence[str] | None = None) -> list[PartitionSpec]:
    """The partitioning of every trainable tensor (HF order, tied tensors once) for ``aggregation``.

    Output-unit axes come from ``components.partition_sizes`` (``mechedit.hf.LAYOUTS``: columns of
    GPT-2 ``Conv1D`` weights, rows of ``nn.Linear`` weights and of embeddings). ``"output"``
    aggregation takes the other axis of 2-D weights except embedding tables (``nn.Embedding``),
    which stay by row. 1-D tensors are one partition each.
    """
    if aggregation not in ("input", "output"):
        raise ValueError(f"aggregation must be 'input' or 'output', got {aggregation!r}")
    live = hf_parameters(model)
    sizes = partition_sizes(model)
    embeddings = _embedding_names(model)
    arch = LAYOUTS.get(architecture(model))
    owners = _owners(model) if arch is None else {}
    names = list(sizes)
    if params is not None:
        unknown = [n for n in params if n not in sizes]
        if unknown:
            raise ValueError(
                f"params {unknown} are not trainable tensors of this model (tied names count "
                "once, under the first HF name); see mechedit.components.partition_sizes(model)"
            )
        names = [n for n in names if n in set(params)]
    specs = []
    for name in names:
        shape = tuple(live[name].shape)
        if len(shape) < 2:
            specs.append(PartitionSpec(name, shape, None))
            continue
        out_axis = arch.output_axis(name, len(shape)) if arch is not None else int(
            isinstance(owners.get(name), Conv1D)  # Conv1D stores [in, out]
        )
        axis = out_axis if aggregation == "input" or name in embeddings else 1 - out_axis
        specs.append(PartitionSpec(name, shape, axis))
    return specs


def _embedding_names(model: Any) -> set[str]:
    hf = hf_model(model)
    out = set()
    for module_name, module in hf.named_modules():
        if isinstance(module, torch.nn.Embedding):
            plain = ".".join(p for p in module_name.split(".") if p != "_original_component")
            out.add(f"{plain}.weight")
    return out


def partition_table(specs: Sequence[PartitionSpec]) -> PartitionTable:
    """The ``PartitionTable`` of a ``partition`` axis over ``specs`` (a whole tensor is one unit)."""
    return PartitionTable.from_sizes({s.name: s.n_units for s in specs})


def layer_of(model: Any, name: str) -> int | None:
    """The block index of HF parameter ``name`` from ``mechedit.hf.LAYOUTS`` (``None`` outside blocks)."""
    arch = LAYOUTS.get(architecture(model))
    if arch is None:
        return None
    # Every block tensor's name starts with the block prefix of the layout's templates.
    prefix = re.escape(arch.mlp_out.weight.split("{layer}")[0])
    match = re.match(prefix + r"(\d+)\.", name)
    return int(match.group(1)) if match else None


def _reduce_pattern(ndim: int, axis: int | None) -> str:
    dims = [f"d{i}" for i in range(ndim)]
    return f"{' '.join(dims)} -> {'' if axis is None else dims[axis]}".rstrip()


def partition_cosines(
    grads_adv: Mapping[str, Tensor], grads_dis: Mapping[str, Tensor], specs: Sequence[PartitionSpec]
) -> tuple[Tensor, Tensor]:
    """Cosine of g+ and g- per partition, and whether either gradient is zero there.

    Returns ``(cosine, zero)``, both ``[n_partitions]`` in ``specs`` order (the partition-table
    order), on the gradients' device; ``cosine`` is NaN where ``zero``. Per tensor, one einops
    reduction each for <g+, g->, |g+|^2 and |g-|^2 over everything but the partition axis.
    """
    dots, sq_a, sq_d = [], [], []
    for spec in specs:
        ga, gd = grads_adv[spec.name], grads_dis[spec.name]
        pattern = _reduce_pattern(ga.ndim, spec.axis)
        dots.append(reduce(ga * gd, pattern, "sum").reshape(-1))
        sq_a.append(reduce(ga * ga, pattern, "sum").reshape(-1))
        sq_d.append(reduce(gd * gd, pattern, "sum").reshape(-1))
    dot, na, nd = (torch.cat(x) for x in (dots, sq_a, sq_d))
    zero = (na == 0) | (nd == 0)
    cosine = dot / (na.sqrt() * nd.sqrt())
    return cosine.masked_fill(zero, float("nan")), zero


def resolve_k(k: int | float, n_partitions: int) -> int:
    """A count from ``k`` (int count or fraction); ``ValueError`` for ``k <= 0`` or above the count."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k must be an int count or a float fraction, got {k!r}")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"a fractional k must be in (0, 1], got {k}")
        return max(1, round(k * n_partitions))
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n_partitions:
        raise ValueError(
            f"k = {k} is above the number of partitions ({n_partitions}); pass k <= {n_partitions} "
            "or a fraction in (0, 1]"
        )
    return int(k)


def select_lowest(cosine: Tensor, zero: Tensor, k: int, *, include_zero: bool = False) -> Tensor:
    """Flat indices of the ``k`` lowest cosines, lowest first (ties in table order).

    Zero-gradient partitions (``zero``) are left out unless ``include_zero`` (then they count as
    cosine 0). Fewer than ``k`` eligible partitions: all of them, with a warning.
    """
    key = torch.where(zero, torch.zeros_like(cosine), cosine) if include_zero else cosine
    eligible = torch.ones_like(zero) if include_zero else ~zero
    order = torch.sort(key.masked_fill(~eligible, float("inf")), stable=True).indices
    n_eligible = int(eligible.sum())
    if n_eligible < k:
        warnings.warn(
            f"only {n_eligible} partitions have a non-zero gradient on both sides; selecting "
            f"those instead of k = {k}", stacklevel=3,
        )
    return order[: min(k, n_eligible)]


def selection_masks(specs: Sequence[PartitionSpec], selected: Tensor, device: torch.device | None = None) -> dict[str, Tensor]:
    """HF name -> boolean mask (the tensor's shape) of the entries in the ``selected`` partitions.

    Only tensors with at least one selected entry appear.
    """
    table_sizes = torch.tensor([s.n_units for s in specs])
    chosen = torch.zeros(int(table_sizes.sum()), dtype=torch.bool)
    chosen[selected.cpu()] = True
    masks = {}
    for spec, units in zip(specs, torch.split(chosen, table_sizes.tolist())):
        if not bool(units.any()):
            continue
        if spec.axis is None:
            mask = torch.ones(spec.shape, dtype=torch.bool)
        else:
            view = [1] * len(spec.shape)
            view[spec.axis] = -1
            mask = units.reshape(view).expand(spec.shape).clone()
        masks[spec.name] = mask if device is None else mask.to(device)
    return masks


# --- the locator --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PCGUSelection:
    """What ``pcgu`` returns.

    Attributes:
        scores: ``Scores`` with one ``partition`` axis (the ``PartitionTable`` of ``specs``; a
            whole-tensor partition is unit 0 of its tensor), site ``"partition"``, values the
            cosine of g+ and g- (in [-1, 1]; NaN for zero-gradient partitions unless
            ``include_zero``). PCGU selects the **lowest** values.
        circuit: the selected partitions as ``partition`` components, lowest cosine first (a
            whole-tensor partition lists every unit of the tensor). Under
            ``aggregation="output"`` a 2-D weight's ``unit`` is an **input** unit (the circuit's
            config says so), which ``mechedit.hf.circuit_parameters`` would read as an output
            unit: use ``masks`` for the entries.
        selected: flat indices into the partition axis, lowest cosine first.
        masks: HF name -> boolean mask of the selected entries (on the model's device).
        specs: how each tensor was partitioned.
        skipped: pairs skipped per reason.
        n_pairs: pairs used.
        layers: HF name -> block index (``None`` outside the blocks: embeddings, final norm).
    """

    scores: Scores
    circuit: Circuit
    selected: Tensor
    masks: dict[str, Tensor]
    specs: tuple[PartitionSpec, ...]
    skipped: Mapping[str, int]
    n_pairs: int
    layers: Mapping[str, int | None] = field(default_factory=dict)

    def tensor_table(self):
        """Where the selected partitions sit: a pandas DataFrame with one row per tensor.

        Columns: ``param`` (HF name), ``layer`` (block index; ``<NA>`` outside the blocks),
        ``tensor`` (the name inside its block, e.g. ``mlp.c_fc.weight``; the whole name outside),
        ``partitions`` (the tensor's partition count), ``selected`` (how many of them are
        selected) and ``fraction`` (selected / partitions). ``mechedit.viz.partition_heatmap``
        draws it.
        """
        import pandas as pd

        sizes = torch.tensor([s.n_units for s in self.specs])
        owner = torch.repeat_interleave(torch.arange(len(self.specs)), sizes)
        counts = torch.bincount(owner[self.selected], minlength=len(self.specs)).tolist()
        rows = []
        for spec, n_selected in zip(self.specs, counts):
            layer = self.layers.get(spec.name)
            inner = spec.name if layer is None else spec.name.split(f".{layer}.", 1)[-1]
            rows.append({
                "param": spec.name, "layer": layer, "tensor": inner, "partitions": spec.n_units,
                "selected": n_selected, "fraction": n_selected / spec.n_units,
            })
        return pd.DataFrame(rows).astype({"layer": "Int64"})


def rank_partitions(
    grads_adv: Mapping[str, Tensor], grads_dis: Mapping[str, Tensor], specs: Sequence[PartitionSpec], cfg: PCGUConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """``(cosine, zero, selected)`` for one pair of summed gradients: the whole selection step."""
    cosine, zero = partition_cosines(grads_adv, grads_dis, specs)
    k = resolve_k(cfg.k, len(cosine))
    return cosine, zero, select_lowest(cosine, zero, k, include_zero=cfg.include_zero)


def pcgu(model: Any, pairs: Sequence[ContrastivePair], *, config: PCGUConfig | None = None, **overrides: Any) -> PCGUSelection:
    """Rank every weight partition by cos(g+, g-) over ``pairs`` and select the ``k`` lowest.

    ``config`` (or keyword overrides of ``PCGUConfig`` fields) sets ``k``, the aggregation, the
    side scoring and the batch size. Gradients are summed over all ``pairs`` (in chunks of
    ``batch_size``); the update (``mechedit.edit.pcgu_update``) reselects per batch instead.

    Raises:
        ValueError: no usable pair, ``k <= 0`` or above the partition count, a bad setting.
        RuntimeError: the model is in training mode.
    """
    cfg = config or PCGUConfig()
    if overrides:
        cfg = PCGUConfig(**{**asdict(cfg), **overrides})
    require_eval_mode(model, what="pcgu", needs_grad=True)
    batch = tokenize_pair_sides(model, pairs, cfg.mode)
    specs = partition_specs(model, cfg.aggregation, cfg.params)
    names = [s.name for s in specs]
    resolve_k(cfg.k, sum(s.n_units for s in specs))  # fail before the backward passes
    g_adv = side_gradients(model, batch, names, "advantaged", cfg)
    g_dis = side_gradients(model, batch, names, "disadvantaged", cfg)
    cosine, zero, selected = rank_partitions(g_adv, g_dis, specs, cfg)
    values = torch.where(zero, torch.zeros_like(cosine), cosine) if cfg.include_zero else cosine
    table = partition_table(specs)
    config_json = {
        **asdict(cfg),
        "mode": batch.mode,
        "k_resolved": int(len(selected)),
        "n_pairs": len(batch),
        "skipped": dict(batch.skipped),
        "n_zero_gradient": int(zero.sum()),
        "whole_tensor_partitions": [s.name for s in specs if s.axis is None],
        "unit_axis": "output" if cfg.aggregation == "input" else "input (2-D weights), row (embeddings)",
    }
    provenance = Provenance.of(model, data=[f"{p.advantaged} || {p.disadvantaged}" for p in batch.pairs])
    scores = Scores(
        values.detach().cpu(), ("partition",), "partition", "pcgu",
        config=config_json, provenance=provenance, partitions=table,
    )
    circuit = Circuit(
        tuple(_components(model, specs, table, selected.cpu())),
        method="pcgu",
        config={"scores": config_json, "selection": {"rule": "lowest_cosine", "k": int(len(selected))}},
        provenance=provenance,
        description=f"PCGU: {len(selected)} partitions with the lowest cos(g+, g-) over {len(batch)} pairs",
    )
    return PCGUSelection(
        scores, circuit, selected.cpu(), selection_masks(specs, selected, model_device(model)),
        tuple(specs), dict(batch.skipped), len(batch), {s.name: layer_of(model, s.name) for s in specs},
    )


def _components(model: Any, specs: Sequence[PartitionSpec], table: PartitionTable, selected: Tensor) -> list[Component]:
    by_name = {s.name: s for s in specs}
    layers: dict[str, int | None] = {}
    out = []
    for index in selected.tolist():
        name, unit = table.locate(index)
        if name not in layers:
            layers[name] = layer_of(model, name)
        spec = by_name[name]
        units = range(math.prod(spec.shape)) if spec.axis is None and len(spec.shape) == 1 else [unit]
        if spec.axis is None and len(spec.shape) != 1:
            units = [0]  # a 0-d tensor: its single entry
        out.extend(Component("partition", layers[name], param=name, unit=u) for u in units)
    return out


__all__ = [
    "MASKED_ARCHITECTURES",
    "PCGUConfig",
    "PCGUSelection",
    "PairBatch",
    "PartitionSpec",
    "layer_of",
    "partition_cosines",
    "partition_specs",
    "partition_table",
    "pcgu",
    "rank_partitions",
    "resolve_k",
    "scoring_mode",
    "select_lowest",
    "selection_masks",
    "side_gradients",
    "side_scores",
    "tokenize_pair_sides",
]
