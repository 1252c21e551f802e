"""Attribution patching (AtP): every component's patching effect from gradients, all at once.

Exact patching runs the model once per patched cell. AtP replaces each run by a first-order
Taylor expansion around the unpatched (*base*) run: for a component with activation ``a``,

    score = (a_other - a_base) . d metric / d a |_base

summed over the component's features (``d_model`` for residual/attention/MLP outputs, ``d_head``
for a head's mixed values, one number for a neuron) and, unless ``per_position``, over
positions; averaged over pairs. The metric is the per-pair value at each prompt's last real
token (default: answer minus wrong-answer logit, nats), summed over the batch for the backward,
so each row's gradient is its own pair's. Conventions, as in exact patching:

- **denoising** (default; TransformerLens's ``attribution_patch``): base = corrupt run, other =
  clean, so a positive score predicts that copying the clean activation in raises the metric;
- **noising**: base = clean run, other = corrupt.

Cost: one forward of the other run (no gradients) and one forward + backward of the base run
per batch of pairs, for every site at once; activation gradients only (no parameter gradients).

**Integrated gradients** (``ig_steps = k > 1``; EAP-IG, Hanna et al. 2024) replace the gradient
at the base run by the mean of gradients at ``k`` points ``alpha = 0, 1/k, ..., (k-1)/k`` of the
path from base to other (a left Riemann sum, so ``k = 1`` is plain AtP):

- ``ig_mode="inputs"``: the path interpolates the token embeddings (``hook_embed``); every site's
  gradient is read on the same ``k`` runs (batched: ``k`` copies of the pairs per pass);
- ``ig_mode="activations"``: the path interpolates each hook's own activation (all its positions
  and units together), one batched pass per hook. By the fundamental theorem of calculus, the
  scores of all cells of one hook then sum to the exact effect of patching the whole hook as
  ``k`` grows (completeness), which the tests check.

**GradDrop** (``grad_drop=True``; AtP*, Kramár et al. 2024) guards against a component's direct
and indirect effects cancelling in the gradient: for each layer ``l`` the backward pass is rerun
with the gradient through layer ``l``'s writes to the residual stream (its ``attn_out`` and
``mlp_out``) blocked, and the score is ``sum_l |score_l| / (L - 1)``, an *unsigned* magnitude
(per pair, then averaged over pairs). It costs ``L`` extra forward + backward passes and is
plain AtP otherwise (``ig_steps`` must be 1).

**QK fix** (``qk_fix=True``; AtP*): a query or key moves the metric only through the attention
pattern, where the softmax saturates and a linear estimate can miss a large effect. The fix
computes the pattern a patched query or key *really* gives and linearises only after it:
``score = sum_s (A'[t, s] - A[t, s]) * d metric / d A[t, s]`` for the query at position ``t``
(summed over the query positions ``t`` whose row changes, for the key at ``s``), with
``d metric / d A[t, s] = d metric / d z[t] . v[s]``. The patched rows come from the model's own
attention (rotary embeddings included): one no-grad run with every query taken from the other
run and the heads' outputs held at the base run's (so nothing downstream moves), whose row ``t``
is exactly "only ``q[t]`` patched"; one such run for keys, where patching key ``s`` changes one
logit per row, renormalised in closed form. Cost: three extra forwards (no backward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from einops import reduce
from torch import Tensor

from mechedit import components as comp
from mechedit.checks import HookCheck, hook_check_record, require_eval_mode
from mechedit.circuit import Circuit
from mechedit.edges import (
    attention_norm,
    edge_component,
    edge_graph,
    head_projection,
    writer_hooks,
    writer_outputs,
)
from mechedit.gradients import activations_and_gradients, capture_activations
from mechedit.metrics import PAIR_METRICS, PairMetric, pair_metric
from mechedit.progress import tqdm
from mechedit.prompts import PromptPair, TokenizedPairs
from mechedit.provenance import Provenance
from mechedit.scores import Scores
from mechedit.tokens import pair_batch

__all__ = [
    "Attribution",
    "AttributionPatchingConfig",
    "EdgeAttribution",
    "attribution_memory",
    "attribution_patching",
    "edge_attribution_patching",
]

Direction = Literal["denoising", "noising"]
#: ``metric(logits [R, vocab], answer_ids [R], wrong_ids [R]) -> [R]`` (``metrics.PairMetric``).
AttributionMetric = PairMetric
METRICS = PAIR_METRICS

SITES = ("embed", "pos_embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
         "head", "q", "k", "v", "neuron", "neuron_pre")
DEFAULT_SITES = ("embed", "resid_pre", "attn_out", "mlp_out", "head", "neuron")


@dataclass(frozen=True)
class AttributionPatchingConfig:
    """Settings of ``attribution_patching`` (signs and units in the module docstring).

    Attributes:
        sites: sites to score (``SITES``); each scores every layer.
        direction: ``"denoising"`` (gradient at the corrupt run, toward clean) or ``"noising"``.
        metric: a ``METRICS`` name, or ``"custom"`` for a callable.
        per_position: keep a ``pos`` axis (else the sum over positions: the estimate of
            patching the component at every position at once).
        ig_steps: points of the integrated-gradients path (1: plain AtP).
        ig_mode: ``"inputs"`` (interpolate token embeddings) or ``"activations"`` (each hook's
            own activation).
        batch_size: pairs per pass (an IG pass holds ``ig_steps`` copies of them).
        grad_drop: AtP*'s GradDrop (unsigned scores; see the module docstring).
        qk_fix: AtP*'s QK fix for the ``q`` and ``k`` sites (module docstring).
    """

    sites: tuple[str, ...] = DEFAULT_SITES
    direction: Direction = "denoising"
    metric: str = "logit_diff"
    per_position: bool = True
    ig_steps: int = 1
    ig_mode: Literal["inputs", "activations"] = "inputs"
    batch_size: int = 32
    grad_drop: bool = False
    qk_fix: bool = False

    def __post_init__(self) -> None:
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        if not sites:
            raise ValueError("sites is empty: name at least one site")
        for site in sites:
            if site not in SITES:
                raise ValueError(f"attribution patching cannot score site {site!r}; choose from {', '.join(SITES)}")
        object.__setattr__(self, "sites", tuple(dict.fromkeys(sites)))
        if self.direction not in ("denoising", "noising"):
            raise ValueError(f"direction must be 'denoising' or 'noising', got {self.direction!r}")
        if not comp.is_int(self.ig_steps) or self.ig_steps < 1:
            raise ValueError(f"ig_steps must be an int >= 1 (1 is plain AtP), got {self.ig_steps!r}")
        if self.ig_mode not in ("inputs", "activations"):
            raise ValueError(f"ig_mode must be 'inputs' or 'activations', got {self.ig_mode!r}")
        if not comp.is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.grad_drop and self.ig_steps != 1:
            raise ValueError("grad_drop applies to plain AtP: use ig_steps=1 with grad_drop=True")
        if self.qk_fix:
            if self.ig_steps != 1 or self.grad_drop:
                raise ValueError("qk_fix applies to plain AtP: use ig_steps=1 and grad_drop=False with it")
            if not {"q", "k"} & set(sites):
                raise ValueError("qk_fix changes only the scores of the 'q' and 'k' sites: add one to sites")


@dataclass(frozen=True)
class Attribution:
    """AtP scores per site (``result["head"]`` is a ``Scores``) and the metric at both runs.

    ``base_metric`` / ``other_metric``: mean metric of the unpatched base and other runs (their
    difference is the gap a full patch closes).
    """

    scores: dict[str, Scores]
    base_metric: float
    other_metric: float
    config: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, site: str) -> Scores:
        if site not in self.scores:
            raise KeyError(f"no scores for site {site!r}; scored: {', '.join(self.scores)}")
        return self.scores[site]


def _site_width(model: Any, site: str) -> int:
    """Numbers per token of one hook of ``site`` (all its units)."""
    cfg = model.cfg
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    return {
        "head": cfg.n_heads * cfg.d_head, "q": cfg.n_heads * cfg.d_head, "k": n_kv * cfg.d_head,
        "v": n_kv * cfg.d_head, "neuron": cfg.d_mlp, "neuron_pre": cfg.d_mlp,
    }.get(site, cfg.d_model)


#: Peak RSS over the tensors counted below, measured on GPT-2-small shape (CPU, float32): the
#: allocator's slack and autograd's transients. The estimate is meant to within ~30 %.
_OVERHEAD = 1.7


def attribution_memory(
    model: Any,
    *,
    n_tokens: int,
    batch_size: int = 32,
    sites: Sequence[str] = DEFAULT_SITES,
    ig_steps: int = 1,
) -> int:
    """Estimated peak bytes of one ``attribution_patching`` pass of ``batch_size`` pairs.

    Counts, per token of the ``batch_size * ig_steps`` rows of the gradient pass: what the forward
    keeps for the backward (about ``10 d_model + 3 d_mlp + 3 n_heads n_tokens`` numbers per layer,
    logits and their gradient ``2 d_vocab``), and the captured activations of the scored sites
    (other run, base run and gradient); times a measured overhead factor. Cheap: no forward.
    Use it to pick ``batch_size`` (``attribution_patching(..., max_memory_mb=...)`` does).
    """
    cfg = model.cfg
    size = next(model.parameters()).element_size()
    rows, tokens = batch_size * ig_steps, int(n_tokens)
    per_layer = 10 * cfg.d_model + 3 * cfg.d_mlp + 3 * cfg.n_heads * tokens
    forward = rows * tokens * (cfg.n_layers * per_layer + 2 * cfg.d_vocab)
    layers = {site: cfg.n_layers if comp.SITES[site].per_layer else 1 for site in sites}
    captured = sum(layers[s] * _site_width(model, s) for s in sites) * tokens * (batch_size + 2 * rows)
    return int(_OVERHEAD * size * (forward + captured))


def _hooks_of(model: Any, site: str) -> list[tuple[int, str]]:
    spec = comp.SITES[site]
    layers = range(int(model.cfg.n_layers)) if spec.per_layer else [0]
    return [(layer, comp.hook_name(site, layer)) for layer in layers]


def _cell_sums(site: str, product: Tensor, per_position: bool) -> Tensor:
    """Sum a hook-shaped ``[batch, ...]`` product to ``[batch, (unit), (pos)]``."""
    spec = comp.SITES[site]
    keep = ["batch"] + ([spec.index] if spec.unit_dim is not None else []) + (["pos"] if per_position else [])
    names = [d if d in keep else f"{d}_summed" for d in spec.dims]
    return reduce(product, f"{' '.join(names)} -> {' '.join(keep)}", "sum")


def _metric_total(
    fn: AttributionMetric, last: Tensor, answer: Tensor, wrong: Tensor, rows_seen: list[Tensor] | None = None
) -> Callable[[Tensor], Tensor]:
    """The summed per-row metric of full logits (rows may be ``k`` stacked copies of the pairs).

    ``rows_seen``, if given, receives each call's detached per-row values ``[rows]``, so the
    base run's metric comes from the gradient pass instead of another forward.
    """

    def total(logits: Tensor) -> Tensor:
        copies = logits.shape[0] // len(last)
        rows = torch.arange(logits.shape[0], device=logits.device)
        read = logits[rows, last.repeat(copies)]
        values = fn(read, answer.repeat(copies), wrong.repeat(copies))
        if not isinstance(values, Tensor) or values.shape != (logits.shape[0],):
            raise ValueError(
                "the metric must return one value per row: map logits [rows, vocab] at the read "
                "position to [rows] (do not average over rows)"
            )
        if rows_seen is not None:
            rows_seen.append(values.detach())
        return values.sum()

    return total


def _interpolate(other: Tensor, alphas: Tensor) -> Callable[..., Tensor]:
    """Hook moving ``k`` stacked copies of the base activation toward ``other`` by ``alphas``."""

    def hook(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
        k = len(alphas)
        target = other.repeat(k, *([1] * (other.ndim - 1)))
        shape = (-1,) + (1,) * (act.ndim - 1)
        return act + alphas.repeat_interleave(other.shape[0]).view(shape).to(act.dtype) * (target - act)

    return hook


def _batch_scores(
    model: Any,
    base_tokens: Tensor,
    other_tokens: Tensor,
    last: Tensor,
    answer: Tensor,
    wrong: Tensor,
    cfg: AttributionPatchingConfig,
    fn: AttributionMetric,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Per-pair scores ``{site: [batch, layer, (unit), (pos)]}`` and both runs' metrics."""
    names = {site: _hooks_of(model, site) for site in cfg.sites}
    all_names = list(dict.fromkeys(n for hooks in names.values() for _, n in hooks))
    if cfg.qk_fix:  # the fix reads every layer's queries, keys and the gradient at hook_z
        all_names += [n for n in _qk_hooks(model) if n not in all_names]
    other = capture_activations(model, other_tokens, [*all_names, "hook_embed"])
    rows = torch.arange(len(last), device=last.device)
    other_metric = fn(other.logits[rows, last], answer, wrong).detach().float()
    base_rows: list[Tensor] = []  # the first len(last) rows of each pass are alpha = 0: the base run
    total = _metric_total(fn, last, answer, wrong, base_rows)
    k = cfg.ig_steps
    alphas = torch.arange(k, dtype=torch.float32, device=base_tokens.device) / k
    stacked = base_tokens.repeat(k, 1)
    grads: dict[str, Tensor] = {}
    base_acts: dict[str, Tensor] = {}
    if cfg.ig_mode == "inputs" or k == 1:
        hooks = [("hook_embed", _interpolate(other.activations["hook_embed"], alphas))] if k > 1 else []
        with model.hooks(fwd_hooks=hooks):
            captured = activations_and_gradients(model, stacked, all_names, total)
        for n in all_names:
            grads[n] = captured.gradients[n].view(k, -1, *captured.gradients[n].shape[1:]).mean(0)
            base_acts[n] = captured.activations[n][: len(last)]
    else:
        for n in all_names:
            with model.hooks(fwd_hooks=[(n, _interpolate(other.activations[n], alphas))]):
                captured = activations_and_gradients(model, stacked, [n], total)
            grads[n] = captured.gradients[n].view(k, -1, *captured.gradients[n].shape[1:]).mean(0)
            base_acts[n] = captured.activations[n][: len(last)]  # alpha = 0: the base activation
    base_metric = base_rows[0][: len(last)].float()
    if cfg.grad_drop:
        return _grad_drop(model, base_tokens, names, all_names, other.activations, base_acts, total, cfg), base_metric, other_metric
    out = {}
    for site, hooks in names.items():
        if cfg.qk_fix and site in ("q", "k"):
            continue
        per_layer = [
            _cell_sums(site, (other.activations[n] - base_acts[n]) * grads[n], cfg.per_position)
            for _, n in hooks
        ]
        out[site] = torch.stack(per_layer, dim=1).float()
    if cfg.qk_fix:
        out.update(_qk_fixed(model, base_tokens, other.activations, base_acts, grads, cfg))
    return out, base_metric, other_metric


def _qk_hooks(model: Any) -> list[str]:
    return [f"blocks.{layer}.attn.hook_{h}" for layer in range(int(model.cfg.n_layers)) for h in ("q", "k", "z")]


def _patterns(model: Any, tokens: Tensor, swap: str | None, other: dict[str, Tensor], base: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every layer's attention pattern and scores ``[batch, head, query, key]`` (and ``hook_v``).

    With ``swap`` (``"q"`` or ``"k"``) every layer's queries (keys) come from the other run while
    each layer's ``hook_z`` is held at the base run's, so the stream, and with it every later
    layer's keys and queries, stays the base run's.
    """
    n_layers = int(model.cfg.n_layers)
    names = [f"blocks.{layer}.attn.hook_{h}" for layer in range(n_layers) for h in ("pattern", "attn_scores", "v")]
    hooks = []
    if swap is not None:
        for layer in range(n_layers):
            for part, source in ((swap, other), ("z", base)):
                name = f"blocks.{layer}.attn.hook_{part}"
                hooks.append((name, lambda act, hook, value=source[name]: value.to(act.dtype)))
    with model.hooks(fwd_hooks=hooks):
        return capture_activations(model, tokens, names).activations


def _qk_fixed(
    model: Any, base_tokens: Tensor, other: dict[str, Tensor], base: dict[str, Tensor],
    grads: dict[str, Tensor], cfg: AttributionPatchingConfig,
) -> dict[str, Tensor]:
    """QK-fixed ``q`` / ``k`` scores ``[batch, layer, head, (pos)]`` (module docstring)."""
    plain = _patterns(model, base_tokens, None, other, base)
    swapped = {part: _patterns(model, base_tokens, part, other, base) for part in ("q", "k") if part in cfg.sites}
    out: dict[str, list[Tensor]] = {part: [] for part in swapped}
    for layer in range(int(model.cfg.n_layers)):
        pre = f"blocks.{layer}.attn.hook_"
        pattern = plain[pre + "pattern"].double()  # [batch, head, query, key]
        v = plain[pre + "v"]
        group = pattern.shape[1] // v.shape[2]  # query heads per key/value head
        d_pattern = torch.einsum(
            "bthe,bshe->bhts", grads[pre + "z"].double(), v.double().repeat_interleave(group, dim=2)
        )
        if "q" in swapped:  # row t of the swapped run is "only q[t] patched"
            change = ((swapped["q"][pre + "pattern"].double() - pattern) * d_pattern).sum(-1)  # [b, head, query]
            out["q"].append(change if cfg.per_position else change.sum(-1))
        if "k" in swapped:  # one logit per row moves: renormalise in closed form, in log space
            shift = (swapped["k"][pre + "attn_scores"].double() - plain[pre + "attn_scores"].double())
            shift = shift.masked_fill(pattern == 0, 0.0)
            log_p = pattern.log()
            log_norm = torch.logaddexp(torch.log1p(-pattern.clamp(max=1.0)), log_p + shift)
            patched = (log_p + shift - log_norm).exp()  # the moved entry's new probability
            weighted = pattern * d_pattern
            others = weighted.sum(-1, keepdim=True) - weighted  # the rest of the row, rescaled
            change = (patched - pattern) * d_pattern + torch.expm1(-log_norm) * others
            change = change.sum(2)  # over query rows: [b, head, key]
            change = change.view(change.shape[0], -1, group, change.shape[-1]).sum(2)  # per key/value head
            out["k"].append(change if cfg.per_position else change.sum(-1))
    return {part: torch.stack(values, dim=1).float() for part, values in out.items()}


def _grad_drop(
    model: Any,
    base_tokens: Tensor,
    names: dict[str, list[tuple[int, str]]],
    all_names: list[str],
    other: dict[str, Tensor],
    base: dict[str, Tensor],
    total: Callable[[Tensor], Tensor],
    cfg: AttributionPatchingConfig,
) -> dict[str, Tensor]:
    """``sum_l |AtP with layer l's residual writes gradient-blocked| / (L - 1)``, per pair."""
    n_layers = int(model.cfg.n_layers)

    def blocked(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
        return act.detach()  # same value, no gradient upstream through this write

    out: dict[str, Tensor] = {}
    for layer in range(n_layers):
        drop = [(f"blocks.{layer}.hook_attn_out", blocked), (f"blocks.{layer}.hook_mlp_out", blocked)]
        with model.hooks(fwd_hooks=drop):
            captured = activations_and_gradients(model, base_tokens, all_names, total, allow_unused=True)
        for site, hooks in names.items():
            per_layer = torch.stack([
                _cell_sums(site, (other[n] - base[n]) * captured.gradients[n], cfg.per_position)
                for _, n in hooks
            ], dim=1).float().abs()
            out[site] = out.get(site, 0) + per_layer
    return {site: value / max(n_layers - 1, 1) for site, value in out.items()}


def _mean_scores(
    model: Any, batch: TokenizedPairs, cfg: AttributionPatchingConfig, fn: AttributionMetric, progress: bool
) -> tuple[dict[str, Tensor], float, float]:
    """Scores per site averaged over the pairs, and the mean base/other metrics."""
    denoise = cfg.direction == "denoising"
    base_all = batch.corrupt_tokens if denoise else batch.clean_tokens
    other_all = batch.clean_tokens if denoise else batch.corrupt_tokens
    sums: dict[str, Tensor] = {}
    base_m, other_m = [], []
    starts = range(0, len(batch), cfg.batch_size)
    for lo in tqdm(starts, desc="attribution patching", disable=not progress or len(starts) < 2):
        sl = slice(lo, lo + cfg.batch_size)
        scores, b, o = _batch_scores(
            model, base_all[sl], other_all[sl], batch.last_positions[sl], batch.answer_ids[sl],
            batch.wrong_ids[sl], cfg, fn,
        )
        for site, values in scores.items():
            sums[site] = sums.get(site, 0) + values.sum(0).cpu()
        base_m.append(b.cpu())
        other_m.append(o.cpu())
    n = len(batch)
    means = {site: total / n for site, total in sums.items()}
    return means, float(torch.cat(base_m).mean()), float(torch.cat(other_m).mean())


def _fitting_batch(model: Any, cfg: AttributionPatchingConfig, n_tokens: int, max_memory_mb: float) -> int:
    """The largest batch size up to ``cfg.batch_size`` whose estimated pass fits the budget."""
    def need(b: int) -> float:
        return attribution_memory(model, n_tokens=n_tokens, batch_size=b, sites=cfg.sites, ig_steps=cfg.ig_steps) / 2**20

    if not max_memory_mb > 0:
        raise ValueError(f"max_memory_mb must be a positive number, got {max_memory_mb!r}")
    if need(1) > max_memory_mb:
        raise ValueError(
            f"one pair of {n_tokens} tokens needs about {need(1):.0f} MiB for these sites "
            f"(ig_steps={cfg.ig_steps}); raise max_memory_mb or score fewer sites at a time"
        )
    lo, hi = 1, cfg.batch_size
    while lo < hi:  # the estimate grows with the batch size
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= max_memory_mb else (lo, mid - 1)
    return lo


def attribution_patching(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    *,
    sites: Sequence[str] = DEFAULT_SITES,
    metric: str | AttributionMetric = "logit_diff",
    direction: Direction = "denoising",
    per_position: bool = True,
    ig_steps: int = 1,
    ig_mode: Literal["inputs", "activations"] = "inputs",
    batch_size: int = 32,
    grad_drop: bool = False,
    qk_fix: bool = False,
    max_memory_mb: float | None = None,
    control: Sequence[PromptPair] | TokenizedPairs | None = None,
    hook_check: HookCheck | bool = True,
    progress: bool = True,
) -> Attribution:
    """AtP (or integrated-gradients) estimates of every component's patching effect.

    Args:
        pairs: clean/corrupt ``PromptPair``s of equal token length (or a ``TokenizedPairs``).
        sites: sites to score, each at every layer (``embed``/``pos_embed``: layer 0 only).
        metric: a ``METRICS`` name or ``fn(logits [R, vocab], answer_ids [R], wrong_ids [R])
            -> [R]`` on the logits at each prompt's last real token.
        direction, per_position, ig_steps, ig_mode, batch_size, grad_drop, qk_fix: see
            ``AttributionPatchingConfig``.
        max_memory_mb: lower ``batch_size`` until ``attribution_memory`` estimates a pass
            under this many MiB (the batch size used is in the config); an error if one pair
            does not fit.
        control: control pairs whose scores (same settings) are subtracted: what remains is
            specific to ``pairs`` (with ``per_position``, both must have the same token length).
        hook_check: ``True`` runs ``checks.check_hooks`` first and refuses to score through
            hooks that do not mean what their names say; a ``HookCheck`` reuses one; ``False``
            skips it. The outcome is in the provenance (``extra["hook_check"]``).

    Returns:
        ``Attribution``: per site, ``Scores`` with axes ``("layer", [unit axis], ["pos"])`` in
        metric units (nats for ``logit_diff``), the estimated ``metric(patched) -
        metric(base)`` averaged over pairs.

    Raises:
        ValueError: empty pairs, clean/corrupt of different lengths, an unknown or unavailable
            site, ``ig_steps < 1``, a metric not returning one value per row.
        RuntimeError: the model is in training mode.
    """
    require_eval_mode(model, what="attribution_patching", needs_grad=True)
    metric_name, fn = pair_metric(metric)
    cfg = AttributionPatchingConfig(
        sites=tuple(sites) if not isinstance(sites, str) else (sites,), direction=direction,
        metric=metric_name, per_position=per_position, ig_steps=ig_steps, ig_mode=ig_mode,
        batch_size=batch_size, grad_drop=grad_drop, qk_fix=qk_fix,
    )
    for site in cfg.sites:
        comp.require_site(model, site)
    batch = pair_batch(model, pairs)
    if max_memory_mb is not None:
        cfg = dataclasses.replace(cfg, batch_size=_fitting_batch(model, cfg, batch.clean_tokens.shape[1], max_memory_mb))
    checked = hook_check_record(model, hook_check)
    means, base_metric, other_metric = _mean_scores(model, batch, cfg, fn, progress)
    n = len(batch)
    extra: dict[str, Any] = {}
    if control is not None:
        cbatch = pair_batch(model, control, what="control")
        if per_position and cbatch.clean_tokens.shape[1] != batch.clean_tokens.shape[1]:
            raise ValueError(
                f"control pairs have {cbatch.clean_tokens.shape[1]} tokens but the pairs "
                f"{batch.clean_tokens.shape[1]}: positions would not line up; use per_position=False"
            )
        cmeans, cb, co = _mean_scores(model, cbatch, cfg, fn, progress)
        means = {site: means[site] - cmeans[site] for site in means}
        extra = {"n_control": len(cbatch), "control_base_metric": cb, "control_other_metric": co}
    config = {**asdict(cfg), "n_pairs": n, "base_metric": base_metric, "other_metric": other_metric, **extra}
    labels = {}
    if per_position:
        tok = model.tokenizer
        labels["pos"] = tuple(tok.decode([t]) for t in batch.clean_tokens[0].tolist())
    texts = None if isinstance(pairs, TokenizedPairs) else [t for p in pairs for t in (p.clean, p.corrupt)]
    provenance = Provenance.of(model, data=texts, hook_check=checked)
    out = {}
    for site in cfg.sites:
        spec = comp.SITES[site]
        axes = ("layer",) + ((spec.index,) if spec.unit_dim is not None else ()) + (("pos",) if per_position else ())
        out[site] = Scores(
            means[site], axes, site, "attribution_patching",
            config={**config, "site": site}, provenance=provenance, labels=labels,
        )
    return Attribution(scores=out, base_metric=base_metric, other_metric=other_metric, config=config)


# ---------------------------------------------------------------------------------------------
# Edges (EAP): how much of each writer's change reaches each reader (``mechedit.edges``)
#
# The edge w -> r is scored ``(a_other[w] - a_base[w]) . d metric / d input[r]``: the first-order
# effect of patching w's output as r alone sees it. A head's q/k/v input gradient comes from the
# gradient at ``hook_q/k/v`` (the projection's output), back through that head's rows of the
# projection and then the block's norm, whose vector-Jacobian product is taken once per head with
# autograd on a per-head copy of the norm's input -- no per-head copies of the residual stream in
# the forward (TransformerLens's ``use_split_qkv_input`` makes its forward + backward ~3x dearer).


def _edge_hooks(n_layers: int) -> tuple[list[str], list[str]]:
    """Hooks read on both runs (writers) and on the base run only (readers' inputs/gradients)."""
    writers = writer_hooks(n_layers)
    readers = [
        f"blocks.{i}.{h}"
        for i in range(n_layers)
        for h in ("ln1.hook_in", "attn.hook_q", "attn.hook_k", "attn.hook_v", "ln2.hook_in")
    ] + [f"blocks.{n_layers - 1}.hook_resid_post"]
    return writers, readers


def _attention_reader_grads(model: Any, layer: int, acts: dict[str, Tensor], grads: dict[str, Tensor]) -> Tensor:
    """d metric / d (head's q, k or v input) for every query and key/value head of ``layer``.

    ``[rows, pos, n_heads + 2 n_kv, d_model]``: the gradient at each projection's output, back
    through that head's rows of the projection, then through the block's norm at the run's own
    input -- one norm vector-Jacobian product per head, batched by repeating the input.
    """
    pieces = []
    with torch.no_grad():
        for part in ("q", "k", "v"):
            g = grads[f"blocks.{layer}.attn.hook_{part}"]  # [rows, pos, heads, d_head]
            w, _ = head_projection(model, layer, part)
            pieces.append(torch.einsum("bphe,hed->bphd", g, w.to(g.dtype)))
    at_norm_out = torch.cat(pieces, dim=2)
    x = acts[f"blocks.{layer}.ln1.hook_in"]
    with torch.enable_grad():
        copies = x.detach().unsqueeze(2).expand(-1, -1, at_norm_out.shape[2], -1).clone().requires_grad_(True)
        (vjp,) = torch.autograd.grad(attention_norm(model, layer)(copies), copies, at_norm_out)
    return vjp


def _edge_batch(
    model: Any,
    base_tokens: Tensor,
    other_tokens: Tensor,
    last: Tensor,
    answer: Tensor,
    wrong: Tensor,
    fn: AttributionMetric,
    ig_steps: int,
    per_position: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed-over-pairs edge scores ``[(pos), writer, reader]`` and both runs' metrics."""
    n_layers = int(model.cfg.n_layers)
    writer_hooks, reader_hooks = _edge_hooks(n_layers)
    other = capture_activations(model, other_tokens, writer_hooks)
    rows = torch.arange(len(last), device=last.device)
    other_metric = fn(other.logits[rows, last], answer, wrong).detach().float()
    base_rows: list[Tensor] = []
    total = _metric_total(fn, last, answer, wrong, base_rows)
    k = ig_steps
    alphas = torch.arange(k, dtype=torch.float32, device=base_tokens.device) / k
    hooks = [("hook_embed", _interpolate(other.activations["hook_embed"], alphas))] if k > 1 else []
    with model.hooks(fwd_hooks=hooks):
        captured = activations_and_gradients(model, base_tokens.repeat(k, 1), writer_hooks + reader_hooks, total)
    n = len(last)
    base = {h: captured.activations[h][:n] for h in writer_hooks}  # alpha = 0: the base run
    with torch.no_grad():
        deltas = writer_outputs(model, {h: other.activations[h] - base[h] for h in writer_hooks}, n_layers)
    mean_k = lambda t: t.view(k, n, *t.shape[1:]).mean(0)  # noqa: E731 - average the IG points
    readers = []
    for layer in range(n_layers):
        readers.append(mean_k(_attention_reader_grads(model, layer, captured.activations, captured.gradients)))
        readers.append(mean_k(captured.gradients[f"blocks.{layer}.ln2.hook_in"]).unsqueeze(2))
    readers.append(mean_k(captured.gradients[f"blocks.{n_layers - 1}.hook_resid_post"]).unsqueeze(2))
    reader_grads = torch.cat(readers, dim=2).to(deltas.dtype)
    spec = "bpwd,bprd->pwr" if per_position else "bpwd,bprd->wr"
    with torch.no_grad():
        scores = torch.einsum(spec, deltas, reader_grads).float()
    return scores, base_rows[0][:n].float(), other_metric


@dataclass(frozen=True)
class EdgeAttribution:
    """EAP scores of every writer -> reader edge (see the section comment above).

    Attributes:
        values: ``[writer, reader]`` (``[pos, writer, reader]`` with ``per_position``), the
            estimated ``metric(patched) - metric(base)`` of patching the edge, averaged over pairs,
            in metric units; ``NaN`` where the writer does not feed the reader.
        writers, readers: labels of the two axes (``embed``, ``a{l}.h{h}``, ``m{l}``;
            ``a{l}.h{h}.q|k|v``, ``m{l}``, ``logits``).
        base_metric, other_metric: mean metric of the two runs.
        config: the settings, as in ``Attribution``.
        pos_labels: token strings of the first clean prompt (with ``per_position``).
    """

    values: Tensor
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    base_metric: float
    other_metric: float
    config: dict[str, Any] = field(default_factory=dict)
    provenance: Provenance | None = None
    pos_labels: tuple[str, ...] | None = None

    @property
    def mask(self) -> Tensor:
        """``Bool[writer, reader]``: the writer feeds the reader."""
        values = self.values if self.values.ndim == 2 else self.values[0]
        return ~torch.isnan(values)

    def total(self) -> Tensor:
        """``[writer, reader]`` scores summed over positions (the values if already summed)."""
        return self.values if self.values.ndim == 2 else self.values.sum(0)

    def writer_scores(self) -> dict[str, float]:
        """Each writer's edges summed: its node AtP score (every writer feeds ``logits``)."""
        sums = self.total().nan_to_num().sum(1)
        return dict(zip(self.writers, sums.tolist(), strict=True))

    def top_edges(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` edges of largest ``|score|`` (summed over positions), strongest first."""
        values = self.total()
        key = values.abs().nan_to_num(-1.0).flatten()
        order = torch.sort(key, descending=True, stable=True).indices[: _count(n, int(self.mask.sum()))]
        w, r = torch.unravel_index(order, values.shape)
        return [(self.writers[i], self.readers[j], float(values[i, j])) for i, j in zip(w.tolist(), r.tolist())]

    def greedy_edges(self, n: int = 10) -> list[tuple[str, str, float]]:
        """``n`` edges grown from ``logits`` backward, each step the strongest edge into the circuit.

        An edge can join once its reader is in the circuit: ``logits`` from the start, a head's
        q/k/v inputs and an MLP's input once that head or MLP is a writer of a chosen edge. So the
        result is connected to the output, unlike ``top_edges`` (Hanna et al. 2024's greedy).
        """
        values = self.total()
        key = values.abs().nan_to_num(-1.0)
        n = _count(n, int(self.mask.sum()))
        reader_of = {}  # writer index -> its reader indices
        for i, name in enumerate(self.writers):
            if name != "embed":
                reader_of[i] = [j for j, r in enumerate(self.readers) if r == name or r.rsplit(".", 1)[0] == name]
        open_readers = torch.zeros(len(self.readers), dtype=torch.bool)
        open_readers[self.readers.index("logits")] = True
        chosen = torch.zeros_like(key, dtype=torch.bool)
        out = []
        for _ in range(n):
            candidates = key.masked_fill(~open_readers[None, :] | chosen | ~self.mask, -1.0)
            flat = int(torch.argmax(candidates))
            if float(candidates.flatten()[flat]) < 0:
                break  # nothing left connected to the circuit
            i, j = divmod(flat, len(self.readers))
            chosen[i, j] = True
            open_readers[reader_of.get(i, [])] = True
            out.append((self.writers[i], self.readers[j], float(values[i, j])))
        return out

    def circuit(self, n: int = 10, *, method: Literal["top", "greedy"] = "greedy") -> Circuit:
        """The components of the ``n`` chosen edges (heads, MLPs, the embedding) as a ``Circuit``.

        The edges themselves (writer, reader, score) are kept in the circuit's config
        (``config["selection"]["edges"]``), so the saved file holds the graph too.
        """
        if method not in ("top", "greedy"):
            raise ValueError(f"method must be 'top' or 'greedy', got {method!r}")
        edges = self.top_edges(n) if method == "top" else self.greedy_edges(n)
        parts = [edge_component(label) for w, r, _ in edges for label in (w, r)]
        components = tuple(dict.fromkeys(c for c in parts if c is not None))
        return Circuit(
            components, method="edge_attribution_patching",
            config={"scores": self.config, "selection": {"rule": method, "n": n, "edges": [list(e) for e in edges]}},
            provenance=self.provenance, description=f"{method} {len(edges)} edges",
        )


def _count(n: int, available: int) -> int:
    if not comp.is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return min(n, available)


def edge_attribution_patching(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    *,
    metric: str | AttributionMetric = "logit_diff",
    direction: Direction = "denoising",
    per_position: bool = False,
    ig_steps: int = 1,
    batch_size: int = 16,
    hook_check: HookCheck | bool = True,
    progress: bool = True,
) -> EdgeAttribution:
    """EAP (``ig_steps = 1``) or EAP-IG (``ig_steps > 1``) scores of every writer -> reader edge.

    Same conventions as ``attribution_patching`` (``direction``, metric at each prompt's last real
    token, IG over the input embeddings, averaged over pairs); one forward of the other run and
    one forward + backward of the base run (``ig_steps`` copies) per batch of pairs. With
    ``per_position`` an edge is one position's write read at that position (TransformerLens's
    ``attribution_patch(..., granularity="edge")``); else summed over positions. Grouped-query
    attention is fine (key/value readers are per key/value head).

    Returns:
        ``EdgeAttribution``; ``.top_edges(n)``, ``.greedy_edges(n)`` and ``.circuit(n)`` select.

    Raises:
        ValueError: as ``attribution_patching``; a model whose residual stream is not a sum of
            writes (post-LN BERT).
        RuntimeError: the model is in training mode.
    """
    require_eval_mode(model, what="edge_attribution_patching", needs_grad=True)
    metric_name, fn = pair_metric(metric)
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    if not comp.is_int(ig_steps) or ig_steps < 1:
        raise ValueError(f"ig_steps must be an int >= 1 (1 is plain EAP), got {ig_steps!r}")
    if not comp.is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    graph = edge_graph(model)
    batch = pair_batch(model, pairs)
    checked = hook_check_record(model, hook_check)
    denoise = direction == "denoising"
    base_all = batch.corrupt_tokens if denoise else batch.clean_tokens
    other_all = batch.clean_tokens if denoise else batch.corrupt_tokens
    total: Tensor | int = 0
    base_m, other_m = [], []
    starts = range(0, len(batch), batch_size)
    for lo in tqdm(starts, desc="edge attribution", disable=not progress or len(starts) < 2):
        sl = slice(lo, lo + batch_size)
        scores, b, o = _edge_batch(
            model, base_all[sl], other_all[sl], batch.last_positions[sl], batch.answer_ids[sl],
            batch.wrong_ids[sl], fn, ig_steps, per_position,
        )
        total = total + scores.cpu()
        base_m.append(b.cpu())
        other_m.append(o.cpu())
    values = (total / len(batch)).masked_fill(~graph.mask, float("nan"))
    base_metric, other_metric = float(torch.cat(base_m).mean()), float(torch.cat(other_m).mean())
    config = {
        "direction": direction, "metric": metric_name, "per_position": per_position, "ig_steps": ig_steps,
        "batch_size": batch_size, "n_pairs": len(batch), "base_metric": base_metric, "other_metric": other_metric,
    }
    texts = None if isinstance(pairs, TokenizedPairs) else [t for p in pairs for t in (p.clean, p.corrupt)]
    pos_labels = None
    if per_position:
        pos_labels = tuple(model.tokenizer.decode([t]) for t in batch.clean_tokens[0].tolist())
    return EdgeAttribution(
        values, graph.writers, graph.readers, base_metric, other_metric, config,
        Provenance.of(model, data=texts, hook_check=checked), pos_labels,
    )
