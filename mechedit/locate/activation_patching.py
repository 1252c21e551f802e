"""Exact activation patching: the effect on a metric of copying one component from another run.

For a batch of clean/corrupt prompt pairs and a site (residual stream, attention or MLP output,
heads, their queries/keys/values/patterns, MLP neurons), each *cell* (layer, unit if the site
has units, and token position unless ``per_position=False``) is patched on its own:

- **denoising** (default, as TransformerLens's ``patching`` module): run the corrupt prompt with
  the cell's activation taken from the clean run;
- **noising**: run the clean prompt with the cell's activation taken from the corrupt run.

The score of a cell is the change it causes in a per-prompt metric of the logits at each prompt's
last real token, ``metric(patched) - metric(base)``, averaged over pairs (or per pair), where
*base* is the unpatched run being patched (corrupt for denoising, clean for noising). With the
default ``logit_diff`` metric (answer minus wrong answer, in nats) a denoising score is positive
where restoring the clean activation restores the clean answer; a noising score is negative
where removing it hurts. ``normalize=True`` divides by ``metric(other) - metric(base)``: 1 means
the cell alone moves the metric all the way to the other run's value. ``control`` subtracts the
same scores computed on control pairs (e.g. facts the model does not store where you look):
what remains is what is specific to the facts of interest.

How it is fast (``method="fast"``, the default on causal LMs): a patch at layer ``l`` and
position ``p`` leaves everything below layer ``l`` and every position before ``p`` as in the
base run, so patched rows resume from the base run's cached residuals and keys/values
(``mechedit.resume``), many cells per batch, reading logits at one position only. A cell whose
clean and corrupt activations are bit-identical for every pair (positions before the first token
the prompts differ in) cannot change anything and scores exactly 0 without a run.
``method="naive"`` runs one full forward per cell (as TransformerLens does); it is the reference
the tests compare against and the path for non-causal models.

``circuit_patching`` patches a whole set of components at once (or everything except them) and
reports the fraction of the clean-corrupt gap recovered: the faithfulness check of a circuit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechedit import components as comp
from mechedit.checks import HookCheck, hook_check_record, require_eval_mode
from mechedit.circuit import Circuit
from mechedit.edges import (
    EdgeGraph,
    attention_norm,
    edge_graph,
    head_projection,
    head_results,
    writer_hooks,
    writer_outputs,
)
from mechedit.gradients import capture_activations
from mechedit.metrics import PAIR_METRICS, PairMetric, pair_metric
from mechedit.progress import tqdm
from mechedit.prompts import PromptPair, TokenizedPairs
from mechedit.provenance import Provenance
from mechedit.resume import ReferenceRun, check_resumable, reference_run, resume
from mechedit.scores import Scores
from mechedit.tokens import pair_batch

__all__ = [
    "METRICS",
    "faithfulness",
    "ActivationPatchingConfig",
    "CircuitPatching",
    "PatchingMetric",
    "activation_patching",
    "circuit_patching",
    "EdgeFaithfulness",
    "edge_faithfulness",
]

Direction = Literal["denoising", "noising"]
#: ``metric(logits [R, vocab], answer_ids [R], wrong_ids [R]) -> [R]`` (``metrics.PairMetric``).
PatchingMetric = PairMetric
#: Built-in metrics by name (``metrics.PAIR_METRICS``).
METRICS = PAIR_METRICS

# Sites exact patching supports; embeddings are patched as resid_pre of layer 0.
PATCHABLE = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "q", "k", "v",
             "pattern", "neuron", "neuron_pre")


@dataclass(frozen=True)
class ActivationPatchingConfig:
    """Settings of ``activation_patching`` (see the module docstring for signs and units).

    Attributes:
        site: one of ``PATCHABLE`` (``head`` is the head's mixed values, ``attn.hook_z``).
        direction: ``"denoising"`` (corrupt run, clean activation in) or ``"noising"``.
        metric: a name in ``METRICS``, or ``"custom"`` when a callable was passed.
        per_position: score each token position separately (axis ``pos``); ``False`` patches
            the component at every position at once.
        normalize: divide effects by ``metric(other) - metric(base)`` (pair means, or per pair
            with ``per_pair``).
        per_pair: keep a leading ``pair`` axis instead of averaging over pairs.
        layers, units, positions: score only these (``None``: all); other cells are NaN.
        components: score only these cells, as ``(layer, unit, pos)`` triples (``-1`` where
            the site has no unit or the cells span every position); overrides the three above.
        method: ``"fast"`` (resume from cached runs), ``"naive"`` (one forward per cell) or
            ``"auto"`` (fast where the model allows it).
        batch_rows: patched rows (cells x pairs) per forward pass, the memory budget.
    """

    site: str = "resid_pre"
    direction: Direction = "denoising"
    metric: str = "logit_diff"
    per_position: bool = True
    normalize: bool = False
    per_pair: bool = False
    layers: tuple[int, ...] | None = None
    units: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    method: Literal["auto", "fast", "naive"] = "auto"
    batch_rows: int = 256
    components: tuple[tuple[int, int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.site not in PATCHABLE:
            raise ValueError(
                f"exact patching cannot patch site {self.site!r}; choose one of {', '.join(PATCHABLE)}"
            )
        if self.direction not in ("denoising", "noising"):
            raise ValueError(f"direction must be 'denoising' or 'noising', got {self.direction!r}")
        if self.method not in ("auto", "fast", "naive"):
            raise ValueError(f"method must be 'auto', 'fast' or 'naive', got {self.method!r}")
        if not isinstance(self.batch_rows, int) or self.batch_rows < 1:
            raise ValueError(f"batch_rows must be a positive int, got {self.batch_rows!r}")
        if self.units is not None and comp.SITES[self.site].index is None:
            raise ValueError(f"site {self.site!r} has no units; drop units=")
        for name in ("layers", "units", "positions"):
            value = getattr(self, name)
            if value is not None:
                if not len(value) or not all(comp.is_int(v) for v in value):
                    raise ValueError(f"{name} must be a non-empty tuple of ints, got {value!r}")
                object.__setattr__(self, name, tuple(value))
        if self.positions is not None and not self.per_position:
            raise ValueError("positions= selects cells of the pos axis; it needs per_position=True")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _resolve_metric(metric: str | PatchingMetric) -> tuple[str, PatchingMetric]:
    return pair_metric(metric)


def _metric_values(fn: PatchingMetric, logits: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:
    out = fn(logits, answer, wrong)
    if not isinstance(out, Tensor) or out.shape != (logits.shape[0],):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the metric must return one value per row, shape ({logits.shape[0]},), got {shape}: "
            "map logits [rows, vocab] at the read position to [rows] (do not average over rows)"
        )
    return out.float()


@dataclass(frozen=True)
class _Cells:
    """The cells to patch: layer, unit (-1: none) and position (-1: every position)."""

    layer: Int[Tensor, " C"]
    unit: Int[Tensor, " C"]
    pos: Int[Tensor, " C"]
    shape: tuple[int, ...]  # the scores grid (without the pair axis)
    axes: tuple[str, ...]
    flat: Int[Tensor, " C"]  # each cell's index into the flattened grid


def _cells(model: Any, cfg: ActivationPatchingConfig, n_pos: int) -> _Cells:
    spec = comp.SITES[cfg.site]
    if cfg.components is not None:
        return _listed_cells(model, cfg, n_pos)
    n_layers = int(model.cfg.n_layers)
    layers = range(n_layers) if cfg.layers is None else [comp.check_layer(model, x) for x in cfg.layers]
    axes: list[str] = ["layer"]
    shape = [n_layers]
    grids = [torch.tensor(list(layers))]
    if spec.index is not None:
        size = comp.index_size(model, cfg.site)
        units = range(size) if cfg.units is None else cfg.units
        for u in units:
            if not 0 <= u < size:
                raise ValueError(f"unit {u} out of range: {cfg.site} has {size} per layer")
        axes.append(spec.index)
        shape.append(size)
        grids.append(torch.tensor(list(units)))
    if cfg.per_position:
        for given in cfg.positions or ():
            if not -n_pos <= given < n_pos:
                raise ValueError(f"position {given} out of range for {n_pos} tokens")
        positions = range(n_pos) if cfg.positions is None else sorted({p % n_pos for p in cfg.positions})
        axes.append("pos")
        shape.append(n_pos)
        grids.append(torch.tensor(list(positions)))
    mesh = torch.cartesian_prod(*grids) if len(grids) > 1 else grids[0][:, None]
    mesh = mesh.reshape(-1, len(grids))
    layer = mesh[:, 0]
    unit = mesh[:, 1] if spec.index is not None else torch.full_like(layer, -1)
    pos = mesh[:, -1] if cfg.per_position else torch.full_like(layer, -1)
    flat = torch.zeros_like(layer)
    for k in range(len(grids)):
        flat = flat * shape[k] + mesh[:, k]
    return _Cells(layer, unit, pos, tuple(shape), tuple(axes), flat)


def _listed_cells(model: Any, cfg: ActivationPatchingConfig, n_pos: int) -> _Cells:
    """The grid of ``_cells`` restricted to the ``components`` the caller listed."""
    spec = comp.SITES[cfg.site]
    full = _cells(model, dataclasses.replace(cfg, components=None, layers=None, units=None, positions=None), n_pos)
    strides = torch.tensor([int(torch.tensor(full.shape[k + 1 :]).prod()) for k in range(len(full.shape))])
    picked = []
    for layer, unit, pos in cfg.components:
        key = [comp.check_layer(model, layer)]
        if spec.index is not None:
            size = comp.index_size(model, cfg.site)
            if not 0 <= unit < size:
                raise ValueError(f"unit {unit} out of range: {cfg.site} has {size} per layer")
            key.append(unit)
        if cfg.per_position:
            if not -n_pos <= pos < n_pos:
                raise ValueError(f"position {pos} out of range for {n_pos} tokens")
            key.append(pos % n_pos)
        picked.append(int((torch.tensor(key) * strides).sum()))
    index = torch.tensor(sorted(set(picked)))
    keep = torch.isin(full.flat, index)
    return _Cells(full.layer[keep], full.unit[keep], full.pos[keep], full.shape, full.axes, full.flat[keep])


# --------------------------------------------------------------------------------------------
# Writing a patch into a hook tensor
# --------------------------------------------------------------------------------------------


def _index(spec: comp.SiteSpec, first: Tensor, pos: Tensor | slice, unit: Tensor | None) -> tuple:
    """Index tuple selecting, for each row ``first[i]``, the cell's position(s) and unit."""
    idx: list[Any] = [slice(None)] * len(spec.dims)
    idx[0] = first
    idx[spec.pos_dim] = pos
    if spec.unit_dim is not None:
        idx[spec.unit_dim] = unit
    return tuple(idx)


def _hook_name(site: str, layer: int) -> str:
    return comp.hook_name(site, layer)


def _forwards_resid_mid(model: Any, site: str) -> bool:
    """Whether a resid_mid patch must also be carried into resid_post by hand (see caveats)."""
    return site == "resid_mid" and "resid_mid" in comp.edit_caveats(model)


def _patch_hooks(
    model: Any,
    site: str,
    layer: int,
    select: Callable[[], tuple[Tensor, Tensor | slice, Tensor | None, Tensor]],
) -> list[tuple[str, Callable[..., Tensor]]]:
    """Hooks writing the patch of one layer; ``select()`` gives (rows, pos, unit, values).

    On architectures whose ``hook_resid_mid`` feeds only the MLP (GPT-2, Llama), a resid_mid
    patch is also added to ``resid_post`` so that it reaches the residual stream, as patching
    the residual means.
    """
    spec = comp.SITES[site]
    state: dict[str, Tensor] = {}

    def write(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
        rows, pos, unit, values = select()
        if not len(rows):
            return act
        idx = _index(spec, rows, pos, unit)
        out = act.clone()
        out[idx] = values.to(out.dtype)
        if _forwards_resid_mid(model, site):
            delta = torch.zeros_like(act)
            delta[idx] = values.to(act.dtype) - act[idx]
            state["delta"] = delta
        return out

    hooks = [(_hook_name(site, layer), write)]
    if _forwards_resid_mid(model, site):

        def carry(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
            delta = state.pop("delta", None)
            return act if delta is None else act + delta

        hooks.append((f"blocks.{layer}.hook_resid_post", carry))
    return hooks


# --------------------------------------------------------------------------------------------
# The two methods
# --------------------------------------------------------------------------------------------


def _run_keeping(model: Any, tokens: Tensor, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and the activations at ``names`` of one no-grad forward (``names`` may be empty)."""
    if names:
        captured = capture_activations(model, tokens, list(names))
        return captured.logits, captured.activations
    with torch.no_grad():
        return model(tokens), {}


def _first_difference(src: Tensor, base: Tensor, spec: comp.SiteSpec, cells: _Cells, layer_of: dict[int, int]) -> Tensor:
    """Per cell, the first position where its source differs from the base (``n_pos``: none).

    ``src``/``base`` are ``[n_kept_layers, batch, ...]`` stacks of the site's activation.
    """
    n_pos = base.shape[1 + spec.pos_dim]
    first = torch.full((len(cells.layer),), n_pos, dtype=torch.long)
    differs = src != base  # [K, batch, ...]
    # reduce every axis except (layer stack, pos, unit) to "any"
    dims = [d for d in range(len(spec.dims)) if d not in (spec.pos_dim, spec.unit_dim)]
    reduced = differs.any(dim=tuple(1 + d for d in dims)) if dims else differs
    # reduced: [K, pos, unit] or [K, unit, pos] or [K, pos]
    keep = [d for d in range(len(spec.dims)) if d not in dims]
    if spec.unit_dim is not None and keep.index(spec.unit_dim) < keep.index(spec.pos_dim):
        reduced = reduced.transpose(1, 2)  # -> [K, pos, unit]
    if spec.unit_dim is None:
        reduced = reduced[:, :, None]
    k = torch.tensor([layer_of[int(x)] for x in cells.layer])
    unit = cells.unit.clamp(min=0)
    per_cell = reduced[k, :, unit]  # [C, pos]
    if bool((cells.pos >= 0).any()):
        fixed = cells.pos >= 0
        pos = cells.pos[fixed]
        hit = per_cell[fixed.nonzero()[:, 0], pos]
        first[fixed] = torch.where(hit, pos, torch.full_like(pos, n_pos))
    loose = cells.pos < 0
    if bool(loose.any()):
        any_pos = per_cell[loose]
        idx = torch.where(any_pos.any(1), any_pos.float().argmax(1), torch.full((int(loose.sum()),), n_pos))
        first[loose] = idx
    return first


def _fast(
    model: Any,
    base: ReferenceRun,
    src: dict[int, Tensor],
    base_act: dict[int, Tensor],
    cells: _Cells,
    cfg: ActivationPatchingConfig,
    metric: PatchingMetric,
    answer: Tensor,
    wrong: Tensor,
    progress: bool,
) -> Tensor:
    """``[C, batch]`` metric values of every patched cell, by resuming from the base run."""
    spec = comp.SITES[cfg.site]
    batch = base.tokens.shape[0]
    n_cells = len(cells.layer)
    device = base.tokens.device
    base_metric = _metric_values(metric, base.logits, answer, wrong)
    out = base_metric[None, :].repeat(n_cells, 1)
    layer_ids = sorted(src)
    layer_of = {x: i for i, x in enumerate(layer_ids)}
    first = _first_difference(
        torch.stack([src[x] for x in layer_ids]).cpu(),
        torch.stack([base_act[x] for x in layer_ids]).cpu(),
        spec, cells, layer_of,
    )
    n_pos = base.n_pos
    # rows = (cell, pair), grouped by start position, sorted by layer, chunked
    work = []
    for start in sorted(set(first.tolist()) - {n_pos}):
        ids = (first == start).nonzero()[:, 0]
        ids = ids[torch.argsort(cells.layer[ids], stable=True)]
        cell_rows = ids.repeat_interleave(batch)
        pair_rows = torch.arange(batch).repeat(len(ids))
        for lo in range(0, len(cell_rows), cfg.batch_rows):
            work.append((start, cell_rows[lo : lo + cfg.batch_rows], pair_rows[lo : lo + cfg.batch_rows]))
    for start, cell_rows, pair_rows in tqdm(work, desc=f"patching {cfg.site}", disable=not progress or len(work) < 2):
        layers = cells.layer[cell_rows]
        hooks = []
        for layer in sorted(set(layers.tolist())):
            lo = int((layers < layer).sum())
            hi = int((layers <= layer).sum())
            c, p = cell_rows[lo:hi], pair_rows[lo:hi]
            rows_t = torch.arange(lo, hi, device=device)
            unit_t = cells.unit[c].to(device) if spec.unit_dim is not None else None
            source = src[layer]
            if cfg.per_position:
                pos_abs = cells.pos[c].to(device)
                pos_rel: Tensor | slice = pos_abs - start
                values = source[_index(spec, p.to(device), pos_abs, unit_t)]
            else:
                pos_rel = slice(None)
                values = source[_index(spec, p.to(device), slice(start, None), unit_t)]
            hooks += _patch_hooks(model, cfg.site, layer, lambda r=rows_t, q=pos_rel, u=unit_t, v=values: (r, q, u, v))
        logits = resume(
            model, base, start_pos=start, rows=pair_rows.to(device), start_layers=layers.to(device),
            fwd_hooks=hooks,
        )
        values = _metric_values(metric, logits, answer[pair_rows.to(device)], wrong[pair_rows.to(device)])
        out[cell_rows, pair_rows] = values.to(out.device)
    return out


def _naive(
    model: Any,
    base_tokens: Tensor,
    last: Tensor,
    src: dict[int, Tensor],
    cells: _Cells,
    cfg: ActivationPatchingConfig,
    metric: PatchingMetric,
    answer: Tensor,
    wrong: Tensor,
    progress: bool,
) -> Tensor:
    """``[C, batch]`` metric values, one full forward per cell (all pairs at once)."""
    spec = comp.SITES[cfg.site]
    batch = base_tokens.shape[0]
    device = base_tokens.device
    rows = torch.arange(batch, device=device)
    out = torch.empty(len(cells.layer), batch)
    for c in tqdm(range(len(cells.layer)), desc=f"patching {cfg.site} (naive)", disable=not progress):
        layer = int(cells.layer[c])
        unit = torch.full((batch,), int(cells.unit[c]), device=device) if spec.unit_dim is not None else None
        if cfg.per_position:
            pos: Tensor | slice = torch.full((batch,), int(cells.pos[c]), device=device)
        else:
            pos = slice(None)
        values = src[layer][_index(spec, rows, pos, unit)]
        hooks = _patch_hooks(model, cfg.site, layer, lambda p=pos, u=unit, v=values: (rows, p, u, v))
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(base_tokens)
        out[c] = _metric_values(metric, logits[rows, last], answer, wrong).cpu()
    return out


def _effects(
    model: Any, batch: TokenizedPairs, cfg: ActivationPatchingConfig, metric: PatchingMetric, progress: bool
) -> tuple[Tensor, Tensor, Tensor, _Cells]:
    """Metric values: patched ``[C, batch]``, base ``[batch]``, other ``[batch]``; the cells."""
    denoise = cfg.direction == "denoising"
    base_tokens = batch.corrupt_tokens if denoise else batch.clean_tokens
    other_tokens = batch.clean_tokens if denoise else batch.corrupt_tokens
    last, answer, wrong = batch.last_positions, batch.answer_ids, batch.wrong_ids
    cells = _cells(model, cfg, base_tokens.shape[1])
    layers = sorted(set(cells.layer.tolist()))
    names = {x: _hook_name(cfg.site, x) for x in layers}
    method = cfg.method
    if method == "auto":
        method = "naive" if check_resumable(model) else "fast"
    rows = torch.arange(len(batch), device=base_tokens.device)
    if method == "fast":
        problem = check_resumable(model)
        if problem:
            raise ValueError(f"method='fast' cannot run here: {problem}; use method='naive'")
        other = reference_run(model, other_tokens, last_positions=last, keep=list(names.values()))
        base = reference_run(model, base_tokens, last_positions=last, keep=list(names.values()))
        src = {x: other.activations[n] for x, n in names.items()}
        base_act = {x: base.activations[n] for x, n in names.items()}
        patched = _fast(model, base, src, base_act, cells, cfg, metric, answer, wrong, progress)
        base_logits, other_logits = base.logits, other.logits
    else:
        other_logits, kept = _run_keeping(model, other_tokens, list(names.values()))
        base_logits, _ = _run_keeping(model, base_tokens, [])
        other_logits, base_logits = other_logits[rows, last], base_logits[rows, last]
        src = {x: kept[n] for x, n in names.items()}
        patched = _naive(model, base_tokens, last, src, cells, cfg, metric, answer, wrong, progress)
    base_m = _metric_values(metric, base_logits, answer, wrong).cpu()
    other_m = _metric_values(metric, other_logits, answer, wrong).cpu()
    return patched.cpu(), base_m, other_m, cells


def _grid(values: Tensor, cells: _Cells) -> Tensor:
    """Scatter per-cell values ``[C, *rest]`` into the NaN-filled grid ``[*rest, *shape]``."""
    rest = values.shape[1:]
    grid = torch.full((*rest, int(torch.tensor(cells.shape).prod())), float("nan"))
    grid[..., cells.flat] = values.movedim(0, -1)
    return grid.reshape(*rest, *cells.shape)


def _scores_values(
    patched: Tensor, base: Tensor, other: Tensor, cells: _Cells, cfg: ActivationPatchingConfig
) -> Tensor:
    effect = patched - base[None, :]  # [C, batch]
    if cfg.per_pair:
        if cfg.normalize:
            effect = effect / _gap(other - base)
        return _grid(effect, cells)  # [batch, *grid]
    mean = effect.mean(1)
    if cfg.normalize:
        mean = mean / _gap((other - base).mean())
    return _grid(mean, cells)


def _gap(gap: Tensor) -> Tensor:
    if bool((gap.abs() < 1e-6).any()):
        raise ValueError(
            "normalize=True but the clean and corrupt metrics are equal (for a pair, or on "
            "average): there is no gap to normalise by. Check the pairs, or use normalize=False."
        )
    return gap


def activation_patching(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    *,
    site: str = "resid_pre",
    metric: str | PatchingMetric = "logit_diff",
    direction: Direction = "denoising",
    per_position: bool = True,
    normalize: bool = False,
    per_pair: bool = False,
    layers: Sequence[int] | None = None,
    units: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    components: Sequence[comp.Component] | None = None,
    control: Sequence[PromptPair] | TokenizedPairs | None = None,
    method: Literal["auto", "fast", "naive"] = "auto",
    batch_rows: int = 256,
    hook_check: HookCheck | bool = True,
    progress: bool = True,
) -> Scores:
    """Exact patching of every cell of ``site``: ``Scores`` of ``metric(patched) - metric(base)``.

    Args:
        pairs: ``PromptPair`` list (or a ``TokenizedPairs`` batch); clean and corrupt prompts of
            a pair must have the same token length (checked, with both tokenisations shown).
        site: a ``PATCHABLE`` site; ``head`` patches ``attn.hook_z``, ``neuron`` ``mlp.hook_post``.
        metric: a ``METRICS`` name or ``fn(logits [R, vocab], answer_ids [R], wrong_ids [R]) ->
            [R]`` on the logits at each prompt's last real token.
        direction, per_position, normalize, per_pair, layers, units, positions, method,
            batch_rows: see ``ActivationPatchingConfig``.
        components: score only these ``Component``s of ``site`` (e.g. the top cells of an
            estimate, to check it); their ``pos`` must be set when ``per_position``. Other
            cells are NaN.
        control: control pairs; their scores (same settings) are subtracted. Their token length
            must match the pairs' when ``per_position``.
        hook_check: ``True`` runs ``checks.check_hooks(model)`` first (a few short forwards)
            and refuses to patch if the hooks do not mean what their names say; pass a
            ``HookCheck`` you already ran on this model to reuse it, or ``False`` to skip. The
            outcome goes into the scores' provenance (``extra["hook_check"]``).
        progress: show a progress bar over batches.

    Returns:
        ``Scores`` with axes ``(["pair"], "layer", [unit axis], ["pos"])`` (site ``site``), NaN
        in cells not scored. ``config`` records every setting, the base/other metric means and,
        with a control, its size, and ``changed_span``: ``[start, end)`` of the positions where
        the first pair's prompts differ (the heatmap outlines it); ``labels["pos"]`` are the
        first pair's clean tokens.

    Raises:
        ValueError: empty pairs, clean/corrupt of different lengths, an unknown site or metric, a
            site this architecture does not have, a metric not returning one value per row.
        RuntimeError: the model is in training mode.
    """
    require_eval_mode(model, what="activation_patching")
    metric_name, metric_fn = _resolve_metric(metric)
    cfg = ActivationPatchingConfig(
        site=site, direction=direction, metric=metric_name, per_position=per_position,
        normalize=normalize, per_pair=per_pair,
        layers=None if layers is None else tuple(layers),
        units=None if units is None else tuple(units),
        positions=None if positions is None else tuple(positions),
        method=method, batch_rows=batch_rows,
        components=None if components is None else _component_cells(site, components, per_position),
    )
    comp.require_site(model, site)
    batch = pair_batch(model, pairs, what="pairs")
    checked = hook_check_record(model, hook_check)
    patched, base_m, other_m, cells = _effects(model, batch, cfg, metric_fn, progress)
    values = _scores_values(patched, base_m, other_m, cells, cfg)
    config: dict[str, Any] = {
        **asdict(cfg),
        "n_pairs": len(batch),
        "base_metric": float(base_m.mean()),
        "other_metric": float(other_m.mean()),
    }
    if control is not None:
        if per_pair:
            raise ValueError("control= subtracts averaged scores; it cannot be combined with per_pair=True")
        cbatch = pair_batch(model, control, what="control")
        if per_position and cbatch.clean_tokens.shape[1] != batch.clean_tokens.shape[1]:
            raise ValueError(
                f"control pairs have {cbatch.clean_tokens.shape[1]} tokens but the pairs "
                f"{batch.clean_tokens.shape[1]}: positions would not line up. Use prompts of the "
                "same template, or per_position=False"
            )
        cp, cb, co, ccells = _effects(model, cbatch, cfg, metric_fn, progress)
        values = values - _scores_values(cp, cb, co, ccells, cfg)
        config.update(n_control=len(cbatch), control_base_metric=float(cb.mean()), control_other_metric=float(co.mean()))
    changed = (batch.clean_tokens[0] != batch.corrupt_tokens[0]).nonzero()[:, 0].tolist()
    config["changed_span"] = [changed[0], changed[-1] + 1] if changed else None
    axes = (("pair",) if per_pair else ()) + cells.axes
    labels = {}
    if per_position:
        tok = model.tokenizer
        ids = batch.clean_tokens[0].tolist()
        labels["pos"] = tuple(tok.decode([t]) for t in ids)
    texts = [] if isinstance(pairs, TokenizedPairs) else [t for p in pairs for t in (p.clean, p.corrupt)]
    return Scores(
        values,
        axes,
        cfg.site,
        "activation_patching",
        config=config,
        provenance=Provenance.of(model, data=texts or None, hook_check=checked),
        labels=labels,
    )


def _component_cells(site: str, components: Sequence[comp.Component], per_position: bool) -> tuple[tuple[int, int, int], ...]:
    cells = []
    for c in components:
        if not isinstance(c, comp.Component) or c.site != site:
            raise ValueError(f"components must be Components of site {site!r}, got {c!r}")
        if per_position and c.pos is None:
            raise ValueError(f"{c} has no pos; give positions or use per_position=False")
        cells.append((c.layer, -1 if c.index is None else c.index, -1 if c.pos is None else c.pos))
    if not cells:
        raise ValueError("components is empty: list at least one Component, or leave it None")
    return tuple(cells)


# --------------------------------------------------------------------------------------------
# Circuits: patch many components at once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CircuitPatching:
    """Result of ``circuit_patching``: per-pair metrics and the fraction of the gap recovered.

    ``fraction = (mean(patched) - mean(base)) / (mean(other) - mean(base))``: with
    ``invert=False`` and denoising, the share of the clean behaviour the circuit alone restores;
    with ``invert=True`` (everything *except* the circuit patched) and noising, the share the
    circuit keeps when the rest is corrupted is ``1 - fraction``.
    """

    patched: Float[Tensor, " batch"]
    base: Float[Tensor, " batch"]
    other: Float[Tensor, " batch"]
    fraction: float
    config: dict[str, Any] = field(default_factory=dict)


def _complement(model: Any, circuit: Circuit, n_pos: int) -> list[comp.Component]:
    chosen = set(circuit.components)
    out = []
    for site in sorted({c.site for c in chosen}):
        pinned = sorted({c.pos for c in chosen if c.site == site and c.pos is not None})
        for c in comp.all_components(model, site):
            cands = [c] if not pinned else [c.at(p) for p in range(n_pos)]
            out += [x for x in cands if x not in chosen]
    return out


def circuit_patching(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    circuit: Circuit,
    *,
    invert: bool = False,
    direction: Direction = "denoising",
    metric: str | PatchingMetric = "logit_diff",
    ablation: Literal["other", "mean"] = "other",
) -> CircuitPatching:
    """Patch every component of ``circuit`` at once (or, ``invert=True``, every other one).

    Components are read at their own position (``pos``) or at every position. The complement of
    a circuit is taken within its sites: all components of those sites (at every position, or
    at every position one by one where the circuit pins positions) not in the circuit.
    ``ablation="other"`` copies each pair's own other-run activation; ``"mean"`` copies the mean
    of the other run's activations over the pairs (per position), i.e. mean ablation.
    One forward pass per batch; the model is left unhooked.
    """
    if ablation not in ("other", "mean"):
        raise ValueError(f"ablation must be 'other' or 'mean', got {ablation!r}")
    require_eval_mode(model, what="circuit_patching")
    if not isinstance(circuit, Circuit):
        raise ValueError(f"circuit must be a Circuit, got {type(circuit).__name__}")
    metric_name, metric_fn = _resolve_metric(metric)
    batch = pair_batch(model, pairs, what="pairs")
    denoise = direction == "denoising"
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    base_tokens = batch.corrupt_tokens if denoise else batch.clean_tokens
    other_tokens = batch.clean_tokens if denoise else batch.corrupt_tokens
    n_pos = base_tokens.shape[1]
    components = _complement(model, circuit, n_pos) if invert else list(circuit.components)
    for c in components:
        if c.site not in PATCHABLE:
            raise ValueError(f"{c}: circuit patching supports the sites {', '.join(PATCHABLE)}")
    comp.validate_all(model, components)
    names = sorted({c.hook_name for c in components})
    rows = torch.arange(len(batch), device=base_tokens.device)
    last = batch.last_positions
    other_logits, kept = _run_keeping(model, other_tokens, names)
    base_logits, _ = _run_keeping(model, base_tokens, [])
    other_logits, base_logits = other_logits[rows, last], base_logits[rows, last]
    if ablation == "mean":
        kept = {n: a.mean(0, keepdim=True).expand_as(a) for n, a in kept.items()}
    # one mask per hook: True where the activation is taken from the other run
    masks: dict[str, Tensor] = {}
    for c in components:
        spec = comp.SITES[c.site]
        mask = masks.setdefault(c.hook_name, torch.zeros(kept[c.hook_name].shape[1:], dtype=torch.bool, device=rows.device))
        idx: list[Any] = [slice(None)] * (len(spec.dims) - 1)
        if c.pos is not None:
            idx[spec.pos_dim - 1] = c.pos
        if spec.unit_dim is not None:
            idx[spec.unit_dim - 1] = c.index
        mask[tuple(idx)] = True

    # GPT-2/Llama: a resid_mid hook feeds only the MLP; carry its change into resid_post
    carried: dict[int, Tensor] = {}
    carry_layers = {c.layer for c in components if _forwards_resid_mid(model, c.site)}

    def writer(name: str, layer: int | None) -> Callable[..., Tensor]:
        def fn(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
            new = torch.where(masks[name], kept[name], act)
            if layer is not None:
                carried[layer] = new - act
            return new

        return fn

    def carry(layer: int) -> Callable[..., Tensor]:
        def fn(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
            return act + carried.pop(layer)

        return fn

    hooks = []
    for n in names:
        mid_layer = next((c.layer for c in components if c.hook_name == n and c.layer in carry_layers and c.site == "resid_mid"), None)
        hooks.append((n, writer(n, mid_layer)))
    hooks += [(f"blocks.{layer}.hook_resid_post", carry(layer)) for layer in sorted(carry_layers)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        patched_logits = model(base_tokens)[rows, last]
    answer, wrong = batch.answer_ids, batch.wrong_ids
    patched = _metric_values(metric_fn, patched_logits, answer, wrong).cpu()
    base = _metric_values(metric_fn, base_logits, answer, wrong).cpu()
    other = _metric_values(metric_fn, other_logits, answer, wrong).cpu()
    gap = float(other.mean() - base.mean())
    fraction = float("nan") if abs(gap) < 1e-6 else float(patched.mean() - base.mean()) / gap
    return CircuitPatching(
        patched=patched, base=base, other=other, fraction=fraction,
        config={"invert": invert, "direction": direction, "metric": metric_name, "ablation": ablation,
                "n_components": len(components), "n_pairs": len(batch)},
    )


def faithfulness(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    circuit: Circuit,
    *,
    ablation: Literal["corrupt", "mean"] = "corrupt",
    metric: str | PatchingMetric = "logit_diff",
) -> float:
    """Share of the clean-corrupt metric gap a circuit keeps when everything else is ablated.

    The clean prompts run with every component outside ``circuit`` (within its sites; see
    ``circuit_patching``) replaced by its corrupt activation (``ablation="corrupt"``) or by the
    mean corrupt activation over the pairs (``"mean"``):
    ``(metric(ablated) - metric(corrupt)) / (metric(clean) - metric(corrupt))``, 1 = the circuit
    alone carries the behaviour. Scores of circuits swing with the ablation, so report it.
    """
    result = circuit_patching(
        model, pairs, circuit, invert=True, direction="noising", metric=metric,
        ablation="other" if ablation == "corrupt" else "mean",
    )
    return 1.0 - result.fraction


# ---------------------------------------------------------------------------------------------
# Edge circuits: patch the inputs of each reader, edge by edge (``mechedit.edges``)


@dataclass(frozen=True)
class EdgeFaithfulness:
    """Result of ``edge_faithfulness``: mean metrics and the share of the gap the edges keep.

    ``recovered = (circuit_metric - corrupt_metric) / (clean_metric - corrupt_metric)``.
    """

    recovered: float
    circuit_metric: float
    clean_metric: float
    corrupt_metric: float
    n_edges: int
    total_edges: int
    ablation: str


def _kept_edges(graph: EdgeGraph, edges: Any) -> Tensor:
    """``Bool[writer, reader]`` of the given edges: ``(writer, reader[, score])`` or a ``Circuit``."""
    if isinstance(edges, Circuit):
        selection = edges.config.get("selection", {})
        if "edges" not in selection:
            raise ValueError(
                "this circuit lists components, not edges; pass the edges, or a circuit made by "
                "EdgeAttribution.circuit (its config holds them)"
            )
        edges = selection["edges"]
    keep = torch.zeros(len(graph.writers), len(graph.readers), dtype=torch.bool)
    mask = graph.mask
    for edge in edges:
        if not isinstance(edge, list | tuple) or len(edge) not in (2, 3):
            raise ValueError(f"an edge is (writer, reader) or (writer, reader, score), got {edge!r}")
        i, j = graph.writer_index(edge[0]), graph.reader_index(edge[1])
        if not mask[i, j]:
            raise ValueError(f"{edge[0]} does not feed {edge[1]}: not an edge of this model")
        keep[i, j] = True
    return keep


def _edge_ablation_hooks(model: Any, graph: EdgeGraph, replaced: Tensor, ablated: Tensor) -> list:
    """Forward hooks giving each reader the stream with its ablated writers swapped.

    ``replaced``: ``[batch, pos, writer, d_model]`` writer outputs to swap in; ``ablated``:
    ``Bool[writer, reader]``. Writers' own outputs in this run are recorded as they happen, so a
    reader's input is ``stream - sum over its ablated writers (current - replaced)``.
    """
    current = torch.zeros_like(replaced)
    stream: dict[int, Tensor] = {}
    weights = ablated.to(replaced.dtype)
    n_heads, n_kv = graph.n_heads, graph.n_kv_heads

    def correction(readers: slice | list[int]) -> Tensor | None:
        cols = weights[:, readers]
        if not bool(cols.any()):
            return None
        upto = int(torch.nonzero(cols.any(1)).max()) + 1
        return torch.einsum("bpwd,wr->bprd", (current - replaced)[:, :, :upto], cols[:upto])

    def record(index: int | slice, heads_of: int | None = None):
        def hook(act: Tensor, hook: Any = None) -> None:  # noqa: ARG001
            current[:, :, index] = head_results(model, heads_of, act) if heads_of is not None else act
        return hook

    def keep_stream(layer: int):
        def hook(act: Tensor, hook: Any = None) -> None:  # noqa: ARG001
            stream[layer] = act
        return hook

    def attention_input(layer: int, part: str, first: int, count: int):
        def hook(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
            fix = correction(slice(first, first + count))
            if fix is None:
                return act
            x = stream[layer].unsqueeze(2) - fix  # [batch, pos, head, d_model]
            w, b = head_projection(model, layer, part)
            out = torch.einsum("bphd,hed->bphe", attention_norm(model, layer)(x), w.to(x.dtype))
            return (out if b is None else out + b.to(out.dtype)).to(act.dtype)
        return hook

    def subtract(readers: int):
        def hook(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
            fix = correction([readers])
            return act if fix is None else act - fix[:, :, 0].to(act.dtype)
        return hook

    hooks = [("hook_embed", record(0))]
    for layer in range(graph.n_layers):
        first = graph.layer_readers(layer).start
        head0 = graph.writer_index(f"a{layer}.h0")
        hooks += [
            (f"blocks.{layer}.ln1.hook_in", keep_stream(layer)),
            (f"blocks.{layer}.attn.hook_q", attention_input(layer, "q", first, n_heads)),
            (f"blocks.{layer}.attn.hook_k", attention_input(layer, "k", first + n_heads, n_kv)),
            (f"blocks.{layer}.attn.hook_v", attention_input(layer, "v", first + n_heads + n_kv, n_kv)),
            (f"blocks.{layer}.attn.hook_z", record(slice(head0, head0 + n_heads), layer)),
            (f"blocks.{layer}.ln2.hook_in", subtract(graph.reader_index(f"m{layer}"))),
            (f"blocks.{layer}.hook_mlp_out", record(graph.writer_index(f"m{layer}"))),
        ]
    hooks.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", subtract(graph.reader_index("logits"))))
    return hooks


def _writer_outputs(model: Any, tokens: Tensor, graph: EdgeGraph) -> tuple[Tensor, Tensor]:
    """Every writer's output ``[batch, pos, writer, d_model]`` and the logits of a run."""
    run = capture_activations(model, tokens, writer_hooks(graph.n_layers))
    return writer_outputs(model, run.activations, graph.n_layers), run.logits


def edge_faithfulness(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    edges: Sequence[Sequence[Any]] | Circuit,
    *,
    ablation: Literal["corrupt", "mean"] = "corrupt",
    metric: str | PatchingMetric = "logit_diff",
) -> EdgeFaithfulness:
    """Share of the clean-corrupt gap an edge circuit keeps when every other edge is ablated.

    The clean prompts run with each reader (a head's q/k/v input, an MLP's input, the logits)
    seeing, for every writer that feeds it *outside* ``edges``, that writer's corrupt output
    (``ablation="corrupt"``) or its mean corrupt output over the pairs (``"mean"``) instead of
    its output in this run; writers inside ``edges`` reach their reader as they are. Exact (one
    patched forward per batch), so all edges give the clean metric and none the corrupt one (with
    ``"corrupt"``). ``edges``: ``(writer, reader[, score])`` labels as ``EdgeAttribution`` gives
    them, or a circuit from ``EdgeAttribution.circuit``.

    Raises:
        ValueError: an unknown label or a pair that is not an edge; a post-LN model; the clean and
            corrupt metrics are equal (nothing to recover); bad pairs as ``activation_patching``.
    """
    require_eval_mode(model, what="edge_faithfulness")
    if ablation not in ("corrupt", "mean"):
        raise ValueError(f"ablation must be 'corrupt' or 'mean', got {ablation!r}")
    _, fn = pair_metric(metric)
    graph = edge_graph(model)
    keep = _kept_edges(graph, edges)
    batch = pair_batch(model, pairs)
    rows = torch.arange(len(batch))

    def read(logits: Tensor) -> Tensor:
        return fn(logits[rows, batch.last_positions], batch.answer_ids, batch.wrong_ids).float()

    with torch.no_grad():
        replaced, corrupt_logits = _writer_outputs(model, batch.corrupt_tokens, graph)
        if ablation == "mean":
            replaced = replaced.mean(0, keepdim=True).expand_as(replaced).contiguous()
        clean = read(model(batch.clean_tokens)).mean()
        corrupt = read(corrupt_logits).mean()
        hooks = _edge_ablation_hooks(model, graph, replaced, graph.mask & ~keep)
        with model.hooks(fwd_hooks=hooks):
            kept = read(model(batch.clean_tokens)).mean()
    gap = float(clean - corrupt)
    if gap == 0.0:
        raise ValueError("the clean and corrupt runs give the same metric: there is no gap to recover")
    return EdgeFaithfulness(
        recovered=float(kept - corrupt) / gap, circuit_metric=float(kept), clean_metric=float(clean),
        corrupt_metric=float(corrupt), n_edges=int(keep.sum()), total_edges=int(graph.mask.sum()),
        ablation=ablation,
    )
