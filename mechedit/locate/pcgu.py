"""PCGU ranking: the weight partitions whose gradients disagree most between the sides of a bias.

Partitioned contrastive gradient unlearning (Yu et al., Findings of ACL 2023) locates a bias in
the weight partitions where the gradient of the **advantaged** side of minimal sentence pairs
points away from the gradient of the **disadvantaged** side:

    g+ = d/dθ sum_i score(advantaged_i),   g- = d/dθ sum_i score(disadvantaged_i)
    cos_p = <g+_p, g-_p> / (|g+_p| |g-_p|)        for every partition p of every tensor

and selects the ``k`` partitions with the **lowest** cosine across the whole model.

Scoring one side (``side_scores``):

* **causal LM**: the log-probability of the whole sequence, ``sum`` (default) or ``mean`` over
  its tokens (BOS is context, not scored);
* **masked LM**: the differing span is replaced by the tokenizer's own mask token (one mask per
  span token; both sides must tokenize to the same length there) and the side's score is its
  tokens' ``logit`` at those masks (the paper), or their ``logprob``, summed over the span.

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
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from einops import reduce
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from mechedit.checks import require_eval_mode
from mechedit.circuit import Circuit
from mechedit.components import Component, _owners, partition_sizes
from mechedit.data_pairs import ContrastivePair, differing_span, pair_problem, warn_skipped
from mechedit.gradients import parameter_gradients
from mechedit.hf import LAYOUTS, architecture, hf_model, hf_parameters
from mechedit.models import model_device
from mechedit.provenance import Provenance
from mechedit.scores import PartitionTable, Scores
from mechedit.tokens import get_tokenizer, tokenize_prompts

# Architectures scored as masked LMs (the differing span masked); every other one as causal.
MASKED_ARCHITECTURES = frozenset({"BertForMaskedLM"})

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


# --- the two sides of a pair, tokenised --------------------------------------------------------------


@dataclass(frozen=True)
class PairBatch:
    """Tokenised contrastive pairs, ready to score either side.

    Causal mode: ``inputs[side]`` are that side's tokens ``[n, pos]`` (BOS first, right-padded)
    and ``attention[side]`` their real-token masks. Masked mode: both sides share one input (the
    advantaged sentence with its span masked); ``targets[side]`` ``[n, pos]`` holds the side's
    token ids at the span positions (``span`` ``[n, pos]`` True there), 0 elsewhere.
    ``pairs`` are the pairs kept; ``skipped`` counts the others per reason.
    """

    mode: str
    pairs: tuple[ContrastivePair, ...]
    inputs: Mapping[str, Tensor]
    attention: Mapping[str, Tensor]
    span: Tensor | None
    targets: Mapping[str, Tensor] | None
    skipped: Mapping[str, int]

    def __len__(self) -> int:
        return len(self.pairs)

    def rows(self, sl: slice) -> PairBatch:
        """The pairs ``sl`` of this batch (padding columns kept)."""
        pick = lambda d: None if d is None else {k: v[sl] for k, v in d.items()}  # noqa: E731
        return PairBatch(
            self.mode, self.pairs[sl], pick(self.inputs), pick(self.attention),
            None if self.span is None else self.span[sl], pick(self.targets), self.skipped,
        )


def scoring_mode(model: Any, mode: str = "auto") -> str:
    """``"masked"`` or ``"causal"``: ``mode`` itself, or for ``"auto"`` from the architecture."""
    if mode in ("causal", "masked"):
        return mode
    if mode != "auto":
        raise ValueError(f"mode must be 'auto', 'causal' or 'masked', got {mode!r}")
    return "masked" if architecture(model) in MASKED_ARCHITECTURES else "causal"


def tokenize_pair_sides(model: Any, pairs: Sequence[ContrastivePair], mode: str = "auto") -> PairBatch:
    """Tokenise both sides of ``pairs`` for ``mode``; unusable pairs are skipped and counted.

    Skipped (one ``SkippedPairsWarning`` with the counts): identical sides, a difference outside a
    declared span, sides whose tokens are identical, and in masked mode sides whose differing
    spans tokenize to different lengths. Raises ``ValueError`` when no pair is left or the
    tokenizer has no mask token in masked mode.
    """
    if isinstance(pairs, ContrastivePair):
        raise ValueError("pass a list of ContrastivePair, not one pair: [pair]")
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty: give at least one ContrastivePair")
    mode = scoring_mode(model, mode)
    skipped: dict[str, int] = {}
    kept: list[ContrastivePair] = []
    for pair in pairs:
        problem = pair_problem(pair)
        if problem is not None:
            skipped[problem] = skipped.get(problem, 0) + 1
        else:
            kept.append(pair)
    if not kept:
        warn_skipped(skipped, total=len(pairs))
        raise ValueError(f"no usable pair among {len(pairs)}: {skipped}")
    device = model_device(model)
    adv = tokenize_prompts(model, [p.advantaged for p in kept], device="cpu")
    dis = tokenize_prompts(model, [p.disadvantaged for p in kept], device="cpu")
    rows_a = [t[m].tolist() for t, m in zip(adv.tokens, adv.attention_mask)]
    rows_d = [t[m].tolist() for t, m in zip(dis.tokens, dis.attention_mask)]
    spans = [differing_span(a, d) for a, d in zip(rows_a, rows_d)]
    use = []
    for i, (start, end_a, end_d) in enumerate(spans):
        if rows_a[i] == rows_d[i]:
            reason = "identical tokens"
        elif mode == "masked" and end_a - start != end_d - start:
            reason = "span tokenizes to different lengths (masked mode)"
        else:
            use.append(i)
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    warn_skipped(skipped, total=len(pairs))
    if not use:
        raise ValueError(f"no usable pair among {len(pairs)}: {skipped}")
    kept_pairs = tuple(kept[i] for i in use)
    if mode == "causal":
        return PairBatch(
            mode, kept_pairs,
            {"advantaged": adv.tokens[use].to(device), "disadvantaged": dis.tokens[use].to(device)},
            {"advantaged": adv.attention_mask[use].to(device), "disadvantaged": dis.attention_mask[use].to(device)},
            None, None, dict(skipped),
        )
    mask_id = get_tokenizer(model).mask_token_id
    if mask_id is None:
        raise ValueError("masked mode needs a tokenizer with a mask token (tokenizer.mask_token is None)")
    inputs = adv.tokens[use].clone()
    span = torch.zeros_like(inputs, dtype=torch.bool)
    targets = {"advantaged": torch.zeros_like(inputs), "disadvantaged": torch.zeros_like(inputs)}
    for row, i in enumerate(use):
        start, end, _ = spans[i]
        span[row, start:end] = True
        targets["advantaged"][row, start:end] = torch.tensor(rows_a[i][start:end])
        targets["disadvantaged"][row, start:end] = torch.tensor(rows_d[i][start:end])
    inputs[span] = mask_id
    attention = adv.attention_mask[use].to(device)
    return PairBatch(
        mode, kept_pairs, {"advantaged": inputs.to(device), "disadvantaged": inputs.to(device)},
        {"advantaged": attention, "disadvantaged": attention}, span.to(device),
        {k: v.to(device) for k, v in targets.items()}, dict(skipped),
    )


def side_scores(
    logits: Tensor, batch: PairBatch, side: str, *, causal_reduction: str = "sum", masked_score: str = "logit"
) -> Tensor:
    """Each pair's score of ``side`` (``"advantaged"`` / ``"disadvantaged"``), ``[n]``, differentiable.

    ``logits`` ``[n, pos, vocab]`` from the forward of ``batch.inputs[side]``. Causal: summed
    (or mean) log-probability of the side's tokens after BOS, in nats. Masked: summed logit (or
    log-probability) of the side's span tokens at the masks.
    """
    if side not in ("advantaged", "disadvantaged"):
        raise ValueError(f"side must be 'advantaged' or 'disadvantaged', got {side!r}")
    logits = logits.float()
    if batch.mode == "causal":
        tokens, real = batch.inputs[side], batch.attention[side]
        logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        scored = real[:, 1:].to(logp.dtype)
        total = (logp * scored).sum(-1)
        return total / scored.sum(-1) if causal_reduction == "mean" else total
    values = logits.log_softmax(-1) if masked_score == "logprob" else logits
    picked = values.gather(-1, batch.targets[side][..., None])[..., 0]
    return (picked * batch.span.to(picked.dtype)).sum(-1)


def side_gradients(
    model: Any, batch: PairBatch, names: Sequence[str], side: str, cfg: PCGUConfig
) -> dict[str, Tensor]:
    """d (sum over pairs of ``side``'s score) / d parameter, per HF name, summed over ``cfg.batch_size`` chunks."""
    total: dict[str, Tensor] = {}
    for start in range(0, len(batch), cfg.batch_size):
        chunk = batch.rows(slice(start, start + cfg.batch_size))

        def metric(logits: Tensor, chunk: PairBatch = chunk) -> Tensor:
            return side_scores(
                logits, chunk, side, causal_reduction=cfg.causal_reduction, masked_score=cfg.masked_score
            ).sum()

        # Padding only needs masking where every position attends to every other (masked LMs).
        attention = chunk.attention[side] if batch.mode == "masked" else None
        grads = parameter_gradients(model, chunk.inputs[side], names, metric, attention_mask=attention)
        for name, g in grads.gradients.items():
            total[name] = g if name not in total else total[name].add_(g)
    return total


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
    """

    scores: Scores
    circuit: Circuit
    selected: Tensor
    masks: dict[str, Tensor]
    specs: tuple[PartitionSpec, ...]
    skipped: Mapping[str, int]
    n_pairs: int


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
        tuple(specs), dict(batch.skipped), len(batch),
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
