"""Causal tracing (Meng et al. 2022, ROME): which hidden states undo a corrupted subject.

For a fact prompt ("hilde lorvane was born in" -> "boston"), causal tracing runs the model three
ways and reads the probability of the target token at the prompt's last token:

- **clean**: the prompt as it is, ``P(clean)``;
- **corrupt**: the token embeddings of the subject's tokens (the output of ``hook_embed``: on
  GPT-2 the token embedding *before* the position embedding is added, like ROME's noise on
  ``wte``) get Gaussian noise added, ``P(corrupt)``;
- **restored**: the corrupt run with one clean hidden state put back, ``P(restored)``.

Restorations (``kinds``), at token position ``t`` and layer ``l``:

- ``"state"``: the output of block ``l`` (``blocks.{l}.hook_resid_post``) at ``t``;
- ``"mlp"`` / ``"attn"``: the MLP / attention outputs (``hook_mlp_out`` / ``hook_attn_out``) at
  ``t`` of every layer of the window ``[l - w // 2, l + ceil(w / 2))`` clipped to the model, as
  ROME's ``trace_important_window`` (``w = 10`` there, on GPT-2 XL's 48 layers).

Scores are **indirect effects** ``P(restored) - P(corrupt)`` (probability units, positive where
restoring the state brings the target back), averaged over the noise samples and, unless
``per_fact``, over the facts. The **total effect** is ``P(clean) - P(corrupt)``. Positions before
a fact's subject score exactly 0 (under causal attention the clean and corrupt runs do not differ
there, so nothing is run for them); positions past a fact's last token (shorter facts with
``per_fact=True``) are NaN.

Noise, precisely: ``noise_std`` (σ) is, unless given, the standard deviation (Bessel-corrected)
of all elements of the ``hook_embed`` output at the subject tokens of the given facts (each fact's
subject tokens as they appear in its prompt, so a subject repeated in several prompts counts
repeatedly). ROME takes the same statistic over the subjects of its whole known-facts set: pass
``noise_std=subject_embedding_std(model, many_facts)`` to do that, and to use one σ across calls
(``control=`` reuses the facts' σ). Corruption ``s`` of a fact whose subject has ``k`` tokens adds
``noise_scale * σ * z[s]`` to those ``k`` embeddings, with
``z = torch.randn((n_noise, k, d_model), generator=torch.Generator().manual_seed(seed))`` (float32,
on the CPU). Every fact with a ``k``-token subject gets the same ``z`` (as ROME, whose every trace
draws from ``RandomState(1)``), so a fact's scores do not depend on what it is batched with.

How it is fast (``mechedit.resume``): the corrupt runs (one row per fact and noise sample) are
*reference* runs with the noise as a hook; a restoration at layer ``l`` and token ``t`` leaves
every position before ``t`` and every layer below the restoration as in the corrupt run, so it
resumes from the corrupt run's cached residuals and keys/values, at positions ``t ..`` only and
from its first restored layer only (a state restore at block ``l``'s output starts at block
``l + 1``, writing its input), with every (restoration, fact, noise sample) of one ``t`` in a
batch and logits at the last token only.

Facts of different token lengths are right-padded and allowed with ``per_fact=True`` (each fact's
own positions, NaN past its end); averaging over facts needs one length (e.g. one template), as
positions of different templates do not line up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechedit.checks import HookCheck, hook_check_record, require_eval_mode
from mechedit.models import model_device
from mechedit.progress import tqdm
from mechedit.prompts import FactPrompt, TokenizedFacts, facts_with_subjects
from mechedit.provenance import Provenance
from mechedit.resume import ReferenceRun, check_resumable, reference_run, resume
from mechedit.scores import Scores
from mechedit.tokens import subject_token_positions, tokenize_facts

__all__ = [
    "KINDS",
    "CausalTrace",
    "CausalTracingConfig",
    "causal_tracing",
    "default_window",
    "subject_embedding_std",
]

#: What a restoration puts back, and the site its scores refer to.
KINDS = ("state", "mlp", "attn")
_SITE = {"state": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
_HOOK = {"mlp": "hook_mlp_out", "attn": "hook_attn_out"}
_EMBED = "hook_embed"


def default_window(n_layers: int) -> int:
    """ROME's window of 10 layers out of GPT-2 XL's 48, scaled to ``n_layers`` (at least 1).

    ``max(1, floor(10 * n_layers / 48 + 0.5))``: 1 for 6 layers, 3 for 12, 5 for 24, 10 for 48.
    """
    return max(1, int(10 * n_layers / 48 + 0.5))


@dataclass(frozen=True)
class CausalTracingConfig:
    """Settings of ``causal_tracing`` (see the module docstring for the noise and the signs).

    Attributes:
        kinds: restorations to score, a subset of ``KINDS`` (``"state"``, ``"mlp"``, ``"attn"``).
        n_noise: corruption runs per fact (ROME: 10).
        noise_scale: the noise's standard deviation in units of σ (ROME: 3).
        noise_std: σ itself; ``None`` measures it on the facts' subject embeddings.
        window: layers per MLP/attention restoration; ``None`` is ``default_window(n_layers)``.
        seed: seeds the noise; the same seed gives the same numbers.
        per_fact: keep a leading ``fact`` axis instead of averaging over facts.
        batch_rows: restored rows (restorations x facts x noise samples) per forward pass, and
            the most rows a corrupt reference run keeps at once (residuals and keys/values of
            every layer: about ``3 * n_layers * n_pos * d_model`` floats a row).
    """

    kinds: tuple[str, ...] = KINDS
    n_noise: int = 10
    noise_scale: float = 3.0
    noise_std: float | None = None
    window: int | None = None
    seed: int = 0
    per_fact: bool = False
    batch_rows: int = 256

    def __post_init__(self) -> None:
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        if not kinds or len(set(kinds)) != len(kinds) or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be distinct names among {KINDS}, got {self.kinds!r}")
        object.__setattr__(self, "kinds", tuple(k for k in KINDS if k in kinds))
        for name, low in (("n_noise", 1), ("batch_rows", 1), ("seed", None)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                raise ValueError(f"{name} must be an int{'' if low is None else f' >= {low}'}, got {value!r}")
        if self.window is not None and (
            not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1
        ):
            raise ValueError(f"window must be an int >= 1 (layers per restoration) or None, got {self.window!r}")
        for name in ("noise_scale", "noise_std"):
            value = getattr(self, name)
            if value is None and name == "noise_std":
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.per_fact, bool):
            raise ValueError(f"per_fact must be True or False, got {self.per_fact!r}")


@dataclass(frozen=True, eq=False)
class CausalTrace:
    """What ``causal_tracing`` returns.

    Attributes:
        state, mlp, attn: indirect-effect ``Scores`` (probability units) with axes
            ``(["fact"], "layer", "pos")`` on sites ``resid_post``, ``mlp_out``, ``attn_out``;
            ``None`` for kinds not requested.
        clean_prob: ``Float[fact]``, ``P(target)`` of the clean run.
        corrupt_prob: ``Float[fact]``, ``P(target)`` of the corrupt runs, mean over noise samples.
        noise_std: σ; the noise's standard deviation is ``config.noise_scale * noise_std``.
        config: the settings, with ``window`` resolved.
    """

    state: Scores | None
    mlp: Scores | None
    attn: Scores | None
    clean_prob: Float[Tensor, " fact"]
    corrupt_prob: Float[Tensor, " fact"]
    noise_std: float
    config: CausalTracingConfig

    @property
    def total_effect(self) -> Float[Tensor, " fact"]:
        """``P(clean) - P(corrupt)`` per fact (probability units)."""
        return self.clean_prob - self.corrupt_prob

    def __getitem__(self, kind: str) -> Scores:
        if kind not in KINDS:
            raise KeyError(f"no kind {kind!r}; choose one of {KINDS}")
        scores = getattr(self, kind)
        if scores is None:
            raise KeyError(f"kind {kind!r} was not traced; pass kinds=(..., {kind!r})")
        return scores


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _checked_facts(facts: Sequence[FactPrompt], what: str) -> list[FactPrompt]:
    return facts_with_subjects(facts, what=what, why="causal tracing corrupts the subject's tokens")


@dataclass(frozen=True)
class _Facts:
    """Tokenised facts: ``batch`` (right-padded) and each fact's subject token span."""

    batch: TokenizedFacts
    span_start: Tensor  # [F] first subject token
    span_end: Tensor  # [F] one past the last subject token

    @property
    def n(self) -> int:
        return len(self.batch)

    @property
    def n_pos(self) -> int:
        return int(self.batch.tokens.shape[1])

    def subject_mask(self) -> Tensor:
        """``Bool[F, n_pos]``: True at subject tokens."""
        pos = torch.arange(self.n_pos)[None, :]
        return (pos >= self.span_start[:, None]) & (pos < self.span_end[:, None])


def _tokenized(model: Any, facts: list[FactPrompt]) -> _Facts:
    batch = tokenize_facts(model, facts, padding_side="right", device=model_device(model))
    spans = []
    for i, fact in enumerate(facts):
        try:
            spans.append(subject_token_positions(model, fact))
        except ValueError as err:
            raise ValueError(f"fact {i} ({fact.prompt!r}): {err}") from None
    return _Facts(batch, torch.tensor([s.start for s in spans]), torch.tensor([s.stop for s in spans]))


def _embeddings(model: Any, tokens: Tensor) -> Tensor:
    """``hook_embed``'s output ``[batch, pos, d_model]`` (the forward stops right after it)."""
    got: dict[str, Tensor] = {}

    class _Done(Exception):
        pass

    def grab(act: Tensor, hook: Any = None) -> None:  # noqa: ARG001
        got["x"] = act.detach().clone()
        raise _Done

    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(_EMBED, grab)]):
            model(tokens)
    except _Done:
        pass
    if "x" not in got:
        raise RuntimeError(f"the model never ran {_EMBED}; causal tracing corrupts its output")
    return got["x"]


def _std(embeddings: Tensor, facts: _Facts) -> float:
    return float(embeddings[facts.subject_mask().to(embeddings.device)].float().std())


def subject_embedding_std(model: Any, facts: Sequence[FactPrompt]) -> float:
    """σ for the noise: std of all elements of the subject tokens' ``hook_embed`` outputs.

    Each fact's subject tokens as they occur in its prompt, pooled over the facts (Bessel-
    corrected). ROME computes it over its whole known-facts set; pass the result as
    ``noise_std=`` to use one σ for several calls.
    """
    facts = _checked_facts(facts, "facts")
    tokenized = _tokenized(model, facts)
    return _std(_embeddings(model, tokenized.batch.tokens), tokenized)


def _draws(facts: _Facts, cfg: CausalTracingConfig, d_model: int) -> dict[int, Tensor]:
    """``{k: z}``, ``z = Float[n_noise, k, d_model]`` standard normal, per subject length ``k``."""
    draws: dict[int, Tensor] = {}
    for k in sorted(set((facts.span_end - facts.span_start).tolist())):
        gen = torch.Generator().manual_seed(cfg.seed)
        draws[k] = torch.randn((cfg.n_noise, k, d_model), generator=gen)
    return draws


def _noise(facts: _Facts, draws: dict[int, Tensor], samples: list[int], level: float) -> Tensor:
    """``Float[len(samples) * F, n_pos, d_model]``: what corruption ``samples[i]`` adds to fact
    ``f``'s embeddings, in row ``i * F + f``."""
    d_model = next(iter(draws.values())).shape[-1]
    out = torch.zeros(len(samples), facts.n, facts.n_pos, d_model)
    for f in range(facts.n):
        a, b = int(facts.span_start[f]), int(facts.span_end[f])
        out[:, f, a:b] = draws[b - a][samples]
    return (out * level).reshape(len(samples) * facts.n, facts.n_pos, d_model)


# --------------------------------------------------------------------------------------------
# Restorations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Restorations:
    """The ``C`` restorations of one position, ``(kind, layer)`` each, and where they write.

    ``start[c]``: block the restored row resumes from. ``writes``: ``{hook name: (Bool[C], clean
    source [F, n_pos, d_model])}``, which restorations write the clean value at that hook.
    ``order``: restorations sorted by start block (``resume`` wants its rows that way).
    """

    kind: list[str]
    layer: list[int]
    start: Tensor
    writes: dict[str, tuple[Tensor, Tensor]]
    order: Tensor


def _window(layer: int, window: int, n_layers: int) -> range:
    return range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))


def _restorations(cfg: CausalTracingConfig, clean: ReferenceRun, window: int) -> _Restorations:
    n_layers = clean.n_layers
    cells = [(k, layer) for k in cfg.kinds for layer in range(n_layers)]
    start, targets = [], []  # targets[c]: the hook names restoration c writes at
    for kind, layer in cells:
        if kind == "state" and layer < n_layers - 1:
            # block l's output is block l + 1's input: start there, one block later
            start.append(layer + 1)
            targets.append([f"blocks.{layer + 1}.hook_resid_pre"])
        elif kind == "state":
            start.append(layer)
            targets.append([f"blocks.{layer}.hook_resid_post"])
        else:
            span = _window(layer, window, n_layers)
            start.append(span.start)
            targets.append([f"blocks.{j}.{_HOOK[kind]}" for j in span])
    writes: dict[str, tuple[Tensor, Tensor]] = {}
    for c, names in enumerate(targets):
        for name in names:
            if name not in writes:
                writes[name] = (torch.zeros(len(cells), dtype=torch.bool), _clean_source(clean, name))
            writes[name][0][c] = True
    start_t = torch.tensor(start)
    return _Restorations(
        [k for k, _ in cells], [x for _, x in cells], start_t, writes, torch.argsort(start_t, stable=True)
    )


def _clean_source(clean: ReferenceRun, name: str) -> Tensor:
    layer = int(name.split(".")[1])
    if name.endswith("hook_resid_pre"):
        return clean.resid[layer]
    if name.endswith("hook_resid_post"):
        return clean.resid[layer + 1]
    return clean.activations[name]


def _writer(rows: Tensor, values: Tensor) -> Callable[..., Tensor]:
    """A hook putting ``values[i]`` at relative position 0 of batch row ``rows[i]``."""

    def fn(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
        out = act.clone()
        out[rows, 0] = values.to(out.dtype)
        return out

    return fn


# --------------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Trace:
    """Raw results of one fact set: ``ie [C, F, n_pos]`` (mean over noise), probabilities."""

    ie: Tensor
    clean: Tensor  # [F]
    corrupt: Tensor  # [F], mean over noise samples
    sigma: float
    restorations: _Restorations


def _target_prob(logits: Tensor, target: Tensor) -> Tensor:
    return logits.float().softmax(-1).gather(1, target[:, None])[:, 0]


def _sample_groups(n_noise: int, n_facts: int, batch_rows: int) -> list[list[int]]:
    """Noise samples per corrupt reference run: as many as fit ``batch_rows`` rows, balanced."""
    per_ref = max(1, batch_rows // n_facts)
    n_groups = -(-n_noise // per_ref)
    bounds = [round(i * n_noise / n_groups) for i in range(n_groups + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(n_groups)]


def _trace(
    model: Any,
    facts: _Facts,
    cfg: CausalTracingConfig,
    window: int,
    sigma: float | None,
    progress: bool,
    desc: str,
) -> _Trace:
    batch = facts.batch
    device = batch.tokens.device
    n_layers, n_facts, n_pos = len(model.blocks), facts.n, facts.n_pos
    keep = [_EMBED] + [f"blocks.{j}.{_HOOK[k]}" for k in cfg.kinds if k in _HOOK for j in range(n_layers)]
    clean = reference_run(model, batch.tokens, last_positions=batch.last_positions, keep=keep)
    target = batch.target_ids
    clean_prob = _target_prob(clean.logits, target).cpu()
    if sigma is None:
        sigma = _std(clean.activations[_EMBED], facts)
    if not sigma > 0:
        raise ValueError(
            f"the subject embeddings have std {sigma}: there is no scale for the noise; pass noise_std="
        )
    draws = _draws(facts, cfg, int(clean.activations[_EMBED].shape[-1]))
    rest = _restorations(cfg, clean, window)
    n_cells = len(rest.kind)
    last = batch.last_positions.cpu()
    restored = torch.full((n_cells, cfg.n_noise, n_facts, n_pos), float("nan"))
    corrupt = torch.empty(cfg.n_noise, n_facts)

    groups = _sample_groups(cfg.n_noise, n_facts, cfg.batch_rows)
    work = []  # (group index, t, ref rows [R], restoration of each row [R])
    for g, samples in enumerate(groups):
        for t in range(n_pos):
            # facts whose subject starts at or before t and that have a token at t
            live = ((facts.span_start <= t) & (last >= t)).repeat(len(samples))
            ref_rows = live.nonzero()[:, 0]
            if not len(ref_rows):
                continue
            cell_rows = rest.order.repeat_interleave(len(ref_rows))
            ref_rows = ref_rows.repeat(n_cells)
            for lo in range(0, len(cell_rows), cfg.batch_rows):
                work.append((g, t, ref_rows[lo : lo + cfg.batch_rows], cell_rows[lo : lo + cfg.batch_rows]))

    bar = tqdm(total=len(work), desc=desc, disable=not progress)
    ref: ReferenceRun | None = None
    current = -1
    for g, t, ref_rows, cell_rows in work:
        if g != current:
            ref = None  # free the previous group's cache first
            samples = groups[g]
            rows_noise = _noise(facts, draws, samples, cfg.noise_scale * sigma).to(device)

            def add_noise(act: Tensor, hook: Any = None, z: Tensor = rows_noise) -> Tensor:  # noqa: ARG001
                return act + z.to(act.dtype)

            ref = reference_run(
                model,
                batch.tokens.repeat(len(samples), 1),
                last_positions=batch.last_positions.repeat(len(samples)),
                fwd_hooks=[(_EMBED, add_noise)],
            )
            corrupt[samples] = _target_prob(ref.logits, target.repeat(len(samples))).cpu().view(len(samples), n_facts)
            current = g
        assert ref is not None
        fact_of = ref_rows % n_facts
        sample_of = torch.tensor(groups[g])[ref_rows // n_facts]
        hooks = []
        for name, (mask, source) in rest.writes.items():
            sel = mask[cell_rows].nonzero()[:, 0]
            if len(sel):
                values = source[fact_of[sel].to(device), t]
                hooks.append((name, _writer(sel.to(device), values)))
        logits = resume(
            model, ref, start_pos=t, rows=ref_rows.to(device),
            start_layers=rest.start[cell_rows].to(device), fwd_hooks=hooks,
        )
        restored[cell_rows, sample_of, fact_of, t] = _target_prob(logits, target[fact_of.to(device)]).cpu()
        bar.update()
    bar.close()

    # before the subject the corrupt run is the clean run: restoring changes nothing
    pos = torch.arange(n_pos)
    before = (pos[None, :] < facts.span_start[:, None]) & (pos[None, :] <= last[:, None])  # [F, n_pos]
    restored = torch.where(before[None, None], corrupt[None, :, :, None], restored)
    ie = (restored - corrupt[None, :, :, None]).mean(1)  # [C, F, n_pos]
    return _Trace(ie, clean_prob, corrupt.mean(0), float(sigma), rest)


def _kind_values(trace: _Trace, kind: str, per_fact: bool) -> Tensor:
    """``[F, layer, pos]`` (``per_fact``) or ``[layer, pos]`` indirect effects of ``kind``."""
    cells = [c for c, k in enumerate(trace.restorations.kind) if k == kind]
    values = trace.ie[cells].transpose(0, 1)  # [F, layer, pos]
    return values if per_fact else values.mean(0)


def _pos_labels(model: Any, facts: _Facts) -> tuple[str, ...]:
    ids = facts.batch.tokens[0].tolist()
    n = int(facts.batch.last_positions[0]) + 1
    return tuple(model.tokenizer.decode([i]) if p < n else "" for p, i in enumerate(ids))


def causal_tracing(
    model: Any,
    facts: Sequence[FactPrompt],
    *,
    kinds: Sequence[str] = KINDS,
    n_noise: int = 10,
    noise_scale: float = 3.0,
    noise_std: float | None = None,
    window: int | None = None,
    seed: int = 0,
    per_fact: bool = False,
    control: Sequence[FactPrompt] | None = None,
    batch_rows: int = 256,
    hook_check: HookCheck | bool = True,
    progress: bool = True,
) -> CausalTrace:
    """ROME's causal tracing of ``facts``: indirect effects per (layer, position) and kind.

    Args:
        facts: ``FactPrompt`` list, each with a ``subject`` (its tokens are corrupted) and a
            one-token ``target`` (whose probability at the last prompt token is read). Facts of
            different token lengths need ``per_fact=True``.
        kinds, n_noise, noise_scale, noise_std, window, seed, per_fact, batch_rows: see
            ``CausalTracingConfig``.
        control: control facts (e.g. facts the model does not store where you look), traced with
            the same settings and the facts' σ; their fact-averaged scores are subtracted, leaving
            what is specific to ``facts``. Needs ``per_fact=False`` and the facts' token length.
        hook_check: ``True`` runs ``checks.check_hooks`` first (refusing hooks that do not mean
            what their names say); a ``HookCheck`` reuses one; ``False`` skips it. The outcome
            is in the provenance (``extra["hook_check"]``).
        progress: show a progress bar over batches.

    Returns:
        ``CausalTrace``: per kind, ``Scores`` of ``P(restored) - P(corrupt)`` with axes
        ``(["fact"], "layer", "pos")`` (sites ``resid_post``, ``mlp_out``, ``attn_out``);
        ``labels["pos"]`` are the first fact's tokens; ``config`` records the settings, σ, the
        subject spans (``subject_spans``, per fact, token positions ``[start, end)``;
        ``subject_span`` when all facts share one), the mean clean/corrupt probabilities and, per
        layer, the layers each restoration puts back (``restored_layers``).

    Raises:
        ValueError: empty facts, a fact without a subject (or whose subject no token covers),
            facts of different lengths without ``per_fact``, bad settings, a model that cannot
            resume forward passes (not a causal LM).
        RuntimeError: the model is in training mode.
    """
    require_eval_mode(model, what="causal_tracing")
    cfg = CausalTracingConfig(
        kinds=tuple(kinds) if not isinstance(kinds, str) else (kinds,), n_noise=n_noise,
        noise_scale=noise_scale, noise_std=noise_std, window=window, seed=seed, per_fact=per_fact,
        batch_rows=batch_rows,
    )
    problem = check_resumable(model)
    if problem:
        raise ValueError(f"causal tracing needs a causal language model: {problem}")
    n_layers = len(model.blocks)
    cfg = replace(cfg, window=cfg.window if cfg.window is not None else default_window(n_layers))
    fact_list = _checked_facts(facts, "facts")
    main = _tokenized(model, fact_list)
    lengths = (main.batch.last_positions + 1).tolist()
    if not per_fact and len(set(lengths)) > 1:
        raise ValueError(
            f"the facts have different token lengths {sorted(set(lengths))}: positions of different "
            "prompts do not line up, so they cannot be averaged. Trace facts of one template "
            "together, or pass per_fact=True (each fact's own positions, NaN past its end)."
        )
    if control is not None and per_fact:
        raise ValueError("control= subtracts fact-averaged scores; it cannot be combined with per_fact=True")
    checked = hook_check_record(model, hook_check)
    trace = _trace(model, main, cfg, cfg.window, cfg.noise_std, progress, "causal tracing")
    control_trace = None
    if control is not None:
        ctl = _tokenized(model, _checked_facts(control, "control"))
        ctl_lengths = (ctl.batch.last_positions + 1).tolist()
        if set(ctl_lengths) != {lengths[0]}:
            raise ValueError(
                f"control facts have token lengths {sorted(set(ctl_lengths))} but the facts {lengths[0]}: "
                "positions would not line up. Use control prompts of the facts' template."
            )
        control_trace = _trace(model, ctl, cfg, cfg.window, trace.sigma, progress, "causal tracing (control)")

    spans = [[int(a), int(b)] for a, b in zip(main.span_start, main.span_end, strict=True)]
    common: dict[str, Any] = {
        **asdict(cfg),
        "noise_std": trace.sigma,
        "noise_std_given": cfg.noise_std is not None,
        "noise_level": cfg.noise_scale * trace.sigma,
        "n_facts": main.n,
        "lengths": lengths,
        "subject_spans": spans,
        "subject_span": spans[0] if all(s == spans[0] for s in spans) else None,
        "clean_prob": float(trace.clean.mean()),
        "corrupt_prob": float(trace.corrupt.mean()),
        "total_effect": float((trace.clean - trace.corrupt).mean()),
        "metric": "target_prob",
    }
    if control_trace is not None:
        common.update(
            n_control=len(control),
            control_clean_prob=float(control_trace.clean.mean()),
            control_corrupt_prob=float(control_trace.corrupt.mean()),
            control_total_effect=float((control_trace.clean - control_trace.corrupt).mean()),
        )
    provenance = Provenance.of(model, data=[f.prompt for f in fact_list], seed=cfg.seed, hook_check=checked)
    labels = {"pos": _pos_labels(model, main)}
    axes = (("fact",) if per_fact else ()) + ("layer", "pos")
    out: dict[str, Scores | None] = dict.fromkeys(KINDS)
    for kind in cfg.kinds:
        values = _kind_values(trace, kind, per_fact)
        if control_trace is not None:
            values = values - _kind_values(control_trace, kind, False)
        if kind == "state":
            restored_layers = [[x, x + 1] for x in range(n_layers)]
        else:
            restored_layers = [[w.start, w.stop] for w in (_window(x, cfg.window, n_layers) for x in range(n_layers))]
        config = {**common, "kind": kind, "restored_layers": restored_layers}
        out[kind] = Scores(
            values, axes, _SITE[kind], "causal_tracing", config=config, provenance=provenance, labels=labels
        )
    return CausalTrace(
        state=out["state"], mlp=out["mlp"], attn=out["attn"],
        clean_prob=trace.clean, corrupt_prob=trace.corrupt, noise_std=trace.sigma, config=cfg,
    )
