"""DEPN's privacy neurons: detect per secret, aggregate by votes, return the neurons to edit.

DEPN (Wu et al., EMNLP 2023, "DEPN: Detecting and Editing Privacy Neurons in Pretrained Language
Models") finds the MLP neurons that hold memorised private data in three steps; this module does
the first two and hands the third to the existing edits:

1. **Detect** (per secret): knowledge-neuron scores by integrated gradients
   (``mechedit.locate.knowledge_neurons``, one map per secret, each secret's scores summed over
   its tokens); keep the neurons whose score is ``>= threshold * max`` of that secret's map
   over all layers and neurons (DEPN: ``t = 0.1``; Dai et al.: ``0.2``). Only positive scores
   are kept (a secret whose best score is not positive keeps nothing).
2. **Aggregate**: each secret votes once for each neuron it kept; the circuit is the ``top_z``
   neurons by votes (ties: higher summed score first, then lower layer and index), or those with
   votes ``>= vote_fraction * n_secrets``, or the first capped by the second.
3. **Edit**: zero them, by hook (``mechedit.edit.ablate(model, circuit, mode="zero")``,
   reversible) or in the weights (``mechedit.edit.zero_neurons(model, circuit)``); both give
   the same logits.

Dai et al.'s refinement (``dai_refine=True``) changes what votes in step 2: secrets are grouped
(``groups``: one label per secret, e.g. the fact or person; default: by target text), and a
group keeps the neurons kept by more than a share ``p`` of its prompts, ``p`` starting at 0.7
and moving by 0.05 until the group keeps ``refine_range`` (2..5) neurons where it can; each
group then votes once per refined neuron.

The circuit's ``config`` holds the settings, the votes and summed scores of the chosen neurons
(also in ``provenance.extra``). ``random_neurons`` gives the seeded same-size control circuit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechedit.checks import HookCheck
from mechedit.circuit import Circuit
from mechedit.components import Component, hook_name
from mechedit.gradients import activations_and_gradients
from mechedit.locate.knowledge_neurons import knowledge_neurons, knowledge_prompts
from mechedit.models import is_masked_lm, model_device
from mechedit.provenance import Provenance
from mechedit.scores import Scores
from mechedit.secrets import as_secrets, encode_secrets, mask_token_id, masked_secret_rows

__all__ = [
    "DEPNConfig",
    "depn",
    "depn_select",
    "keep_mask",
    "perturb_neurons",
    "random_neurons",
    "refine_groups",
    "secret_attribution",
]


@dataclass(frozen=True)
class DEPNConfig:
    """Selection settings of ``depn`` / ``depn_select`` (see the module docstring).

    Attributes:
        threshold: ``t`` in ``(0, 1]``: a secret keeps neurons scoring ``>= t * its max``.
        top_z: keep at most this many neurons by votes (``None``: no cap).
        vote_fraction: keep neurons voted for by at least this share of the secrets (or groups),
            in ``(0, 1]`` (``None``: no floor). At least one of ``top_z`` / ``vote_fraction``.
        dai_refine: group secrets and refine per group before voting (Dai et al.).
        refine_p: the starting share ``p`` of the refinement; ``refine_step`` its step;
            ``refine_range``: the (min, max) neurons a group should keep.
    """

    threshold: float = 0.1
    top_z: int | None = 20
    vote_fraction: float | None = None
    dai_refine: bool = False
    refine_p: float = 0.7
    refine_step: float = 0.05
    refine_range: tuple[int, int] = (2, 5)

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) or not 0 < self.threshold <= 1:
            raise ValueError(f"threshold t must be in (0, 1] (a share of each secret's max score), got {self.threshold!r}")
        if self.top_z is None and self.vote_fraction is None:
            raise ValueError("give top_z (keep the z most voted neurons) or vote_fraction (a vote floor), or both")
        if self.top_z is not None and (isinstance(self.top_z, bool) or not isinstance(self.top_z, int) or self.top_z < 1):
            raise ValueError(f"top_z must be an int >= 1, got {self.top_z!r}")
        if self.vote_fraction is not None and not 0 < self.vote_fraction <= 1:
            raise ValueError(f"vote_fraction must be in (0, 1], got {self.vote_fraction!r}")
        if not 0 <= self.refine_p < 1 or not 0 < self.refine_step < 1:
            raise ValueError(f"refine_p must be in [0, 1) and refine_step in (0, 1), got {self.refine_p}, {self.refine_step}")
        lo, hi = self.refine_range
        if not 0 <= lo <= hi:
            raise ValueError(f"refine_range must be (min, max) with 0 <= min <= max, got {self.refine_range}")
        object.__setattr__(self, "refine_range", (int(lo), int(hi)))


def keep_mask(values: Tensor, threshold: float) -> Tensor:
    """``Bool[n, layer, neuron]``: per secret, scores ``>= threshold * max`` and ``> 0``.

    ``values`` is ``[n, layer, neuron]`` (NaN where unscored, never kept); the max is each
    secret's over all its scored layers and neurons.
    """
    DEPNConfig(threshold=threshold)
    if values.ndim != 3:
        raise ValueError(f"values must be [secret, layer, neuron], got shape {tuple(values.shape)}")
    filled = values.nan_to_num(nan=float("-inf"))
    peak = filled.flatten(1).amax(1).clamp(min=0)
    return (filled >= threshold * peak[:, None, None]) & (filled > 0)


def refine_groups(
    kept: Tensor, groups: Sequence[Hashable], *, p: float = 0.7, step: float = 0.05, keep_range: tuple[int, int] = (2, 5)
) -> tuple[Tensor, list[Hashable], list[float]]:
    """Dai et al.'s refinement: per group, neurons kept by more than a share ``p`` of its prompts.

    ``p`` starts at ``p`` and moves by ``step`` (down while fewer than ``keep_range[0]`` neurons
    pass and ``p > 0``, up while more than ``keep_range[1]`` pass and ``p < 1``).

    Returns ``(Bool[n_groups, layer, neuron], group labels in first-seen order, final p per group)``.
    """
    if len(groups) != kept.shape[0]:
        raise ValueError(f"groups has {len(groups)} labels for {kept.shape[0]} secrets; give one per secret")
    labels = list(dict.fromkeys(groups))
    index = torch.tensor([labels.index(g) for g in groups])
    counts = torch.zeros(len(labels), *kept.shape[1:], dtype=torch.long).index_add_(0, index, kept.long())
    sizes = torch.bincount(index, minlength=len(labels)).double()
    share = counts.double() / sizes[:, None, None]
    lo, hi = keep_range
    out, final = [], []
    for g in range(len(labels)):  # a few threshold moves per group; neurons stay vectorised
        moves = 0

        def share_p(n: int) -> float:  # p after n moves, rounded so that 0.7 - 2 * 0.05 is 0.6
            return min(max(round(p + n * step, 9), 0.0), 1.0)

        passed = share[g] > share_p(moves)
        while int(passed.sum()) < lo and share_p(moves) > 0:
            moves -= 1
            passed = share[g] > share_p(moves)
        while int(passed.sum()) > hi and share_p(moves + 1) < 1:
            moves += 1
            passed = share[g] > share_p(moves)
        out.append(passed)
        final.append(share_p(moves))
    return torch.stack(out), labels, final


def depn_select(
    scores: Scores,
    *,
    threshold: float = 0.1,
    top_z: int | None = 20,
    vote_fraction: float | None = None,
    dai_refine: bool = False,
    groups: Sequence[Hashable] | None = None,
    config: DEPNConfig | None = None,
) -> Circuit:
    """DEPN's selection and aggregation on per-secret scores (``knowledge_neurons(..., per_prompt=True)``).

    ``scores`` has axes ``("prompt", "layer", "neuron")``. ``groups`` (one label per prompt) is
    required with ``dai_refine`` (``depn`` defaults it to each secret's target text). A
    ``config`` replaces the keyword settings. Returns a ``Circuit`` of ``neuron`` components
    (``neuron_pre`` if so scored), most voted first; see the module docstring.

    Raises:
        ValueError: scores without a prompt axis, bad settings, ``top_z`` above the number of
            scored neurons.
    """
    cfg = config or DEPNConfig(threshold=threshold, top_z=top_z, vote_fraction=vote_fraction, dai_refine=dai_refine)
    if scores.axes != ("prompt", "layer", "neuron"):
        raise ValueError(
            f"depn_select needs per-secret scores with axes ('prompt', 'layer', 'neuron'), got "
            f"{scores.axes}: compute them with knowledge_neurons(..., per_prompt=True)"
        )
    values = scores.values
    n_scored = int((~values[0].isnan()).sum())
    if cfg.top_z is not None and cfg.top_z > n_scored:
        raise ValueError(f"top_z = {cfg.top_z} is more than the {n_scored} scored neurons (layers x d_mlp)")
    kept = keep_mask(values, cfg.threshold)
    # the tie-break: each neuron's scores summed over the secrets that kept it
    total = torch.where(kept, values.nan_to_num(0.0), 0.0).sum(0)
    refined_p = None
    if cfg.dai_refine:
        if groups is None:
            raise ValueError("dai_refine needs groups=[label per secret] (e.g. the fact each prompt states)")
        kept, labels, refined_p = refine_groups(
            kept, list(groups), p=cfg.refine_p, step=cfg.refine_step, keep_range=cfg.refine_range
        )
    voters = kept.shape[0]
    votes = kept.sum(0)  # [layer, neuron]: one vote per secret (or group) per kept neuron
    chosen = _rank(votes, total, cfg, voters)
    layer, neuron = (chosen // votes.shape[1]).tolist(), (chosen % votes.shape[1]).tolist()
    picked = {
        "neurons": [[a, b] for a, b in zip(layer, neuron, strict=True)],
        "votes": votes.flatten()[chosen].tolist(),
        "summed_scores": [float(x) for x in total.flatten()[chosen].tolist()],
        "n_voters": voters,
    }
    selection = {
        "rule": "depn",
        **dataclasses.asdict(cfg),
        "kept_per_voter": kept.flatten(1).sum(1).tolist(),
        **({"refined_p": refined_p} if refined_p is not None else {}),
        **picked,
    }
    provenance = scores.provenance
    if provenance is not None:
        provenance = dataclasses.replace(provenance, extra={**provenance.extra, "depn": picked})
    site = scores.site
    return Circuit(
        tuple(Component(site, a, neuron=b) for a, b in zip(layer, neuron, strict=True)),
        method="depn",
        config={"scores": dict(scores.config), "selection": selection},
        provenance=provenance,
        description=f"DEPN: {len(layer)} neurons voted by {voters} {'groups' if cfg.dai_refine else 'secrets'}",
    )


def _rank(votes: Tensor, total: Tensor, cfg: DEPNConfig, voters: int) -> Tensor:
    """Flat indices of the chosen neurons: most votes first, then higher summed score, then index."""
    flat_votes, flat_total = votes.flatten(), total.flatten().double()
    eligible = flat_votes > 0
    if cfg.vote_fraction is not None:
        eligible &= flat_votes >= cfg.vote_fraction * voters
    candidates = eligible.nonzero().flatten()
    # two stable sorts: by summed score, then by votes (stable keeps the score order within ties)
    order = torch.sort(flat_total[candidates], descending=True, stable=True).indices
    candidates = candidates[order]
    order = torch.sort(flat_votes[candidates], descending=True, stable=True).indices
    candidates = candidates[order]
    return candidates if cfg.top_z is None else candidates[: cfg.top_z]


def depn(
    model: Any,
    secrets: Any,
    *,
    targets: Sequence[str] | None = None,
    threshold: float = 0.1,
    top_z: int | None = 20,
    vote_fraction: float | None = None,
    dai_refine: bool = False,
    groups: Sequence[Hashable] | None = None,
    steps: int = 20,
    alpha_grid: str = "depn",
    prob: str = "prob",
    site: str = "post",
    layers: Sequence[int] | None = None,
    batch_size: int = 256,
    hook_check: HookCheck | bool = True,
    progress: bool = True,
) -> Circuit:
    """DEPN's privacy neurons for ``secrets``: detect per secret, aggregate by votes (module docstring).

    Args:
        secrets: what ``knowledge_neurons`` takes: ``PrivateRecord`` objects, ``(prefix,
            secret)`` pairs, ``KnowledgePrompt``, ``FactPrompt``, or strings with ``targets``.
        threshold, top_z, vote_fraction, dai_refine: see ``DEPNConfig``. ``groups``: one label
            per secret for ``dai_refine`` (default: the secret's target text).
        steps, alpha_grid, prob, site, layers, batch_size, hook_check, progress: passed to
            ``knowledge_neurons``.

    Returns:
        A ``Circuit`` of MLP neurons, most voted first, with votes and summed scores in its
        config and provenance. Edit it with ``mechedit.edit.ablate`` or ``zero_neurons``.
    """
    cfg = DEPNConfig(threshold=threshold, top_z=top_z, vote_fraction=vote_fraction, dai_refine=dai_refine)
    items = knowledge_prompts(model, secrets, targets)
    n_layers = model.cfg.n_layers if layers is None else len(set(layers))
    if cfg.top_z is not None and cfg.top_z > n_layers * model.cfg.d_mlp:
        raise ValueError(
            f"top_z = {cfg.top_z} is more than the model's {n_layers * model.cfg.d_mlp} MLP neurons "
            f"in the scored layers ({n_layers} x {model.cfg.d_mlp})"
        )
    scores = knowledge_neurons(
        model, items, steps=steps, alpha_grid=alpha_grid, prob=prob, site=site, layers=layers,
        batch_size=batch_size, per_prompt=True, hook_check=hook_check, progress=progress,
    )
    if dai_refine and groups is None:
        groups = [p.target for p in items]
    return depn_select(scores, groups=groups, config=cfg)


def random_neurons(
    model: Any,
    n: int | Circuit,
    *,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    exclude: Circuit | None = None,
    site: str = "neuron",
) -> Circuit:
    """``n`` distinct MLP neurons drawn uniformly (seeded) from ``layers``: the random control.

    ``n`` may be a circuit, whose size is used (and whose neurons are excluded, as with
    ``exclude``). The same seed gives the same neurons on any machine (a CPU generator).
    """
    if isinstance(n, Circuit):
        exclude = n if exclude is None else Circuit(tuple({*n.components, *exclude.components}))
        n = len(n)
    layer_list = list(range(model.cfg.n_layers)) if layers is None else sorted(set(layers))
    d_mlp = model.cfg.d_mlp
    banned = torch.zeros(len(layer_list) * d_mlp, dtype=torch.bool)
    for c in exclude or ():
        if c.neuron is not None and c.layer in layer_list:
            banned[layer_list.index(c.layer) * d_mlp + c.neuron] = True
    pool = (~banned).nonzero().flatten()
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(pool):
        raise ValueError(f"n must be an int in 0..{len(pool)} (the neurons available), got {n!r}")
    generator = torch.Generator().manual_seed(seed)
    picked = pool[torch.randperm(len(pool), generator=generator)[:n]]
    return Circuit.of(
        model,
        [Component(site, layer_list[int(i) // d_mlp], neuron=int(i) % d_mlp) for i in picked],
        method="random_neurons",
        config={"n": n, "seed": seed, "layers": layer_list},
        description=f"{n} random MLP neurons (seed {seed})",
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------
# Controls: what tells a real privacy-neuron effect from an artefact


def _by_layer(circuit: Circuit) -> dict[int, Tensor]:
    """Layer -> the circuit's neuron indices there (``Long[k]``), for one hook per layer."""
    out: dict[int, list[int]] = {}
    for c in circuit:
        if c.neuron is None or c.site not in ("neuron", "neuron_pre"):
            raise ValueError(f"{c} is not an MLP neuron; the DEPN controls edit neurons only")
        out.setdefault(c.layer, []).append(c.neuron)
    return {layer: torch.tensor(sorted(set(v))) for layer, v in out.items()}


@contextlib.contextmanager
def perturb_neurons(model: Any, circuit: Circuit, *, seed: int = 0) -> Iterator[None]:
    """While the block runs, move the circuit's neurons in a random direction as far as zeroing would.

    At every token and for each layer's selected neurons ``a`` (``[k]`` at that token), zeroing
    moves the activation by ``-a``; this adds instead ``u * ||a||`` with ``u`` a uniformly random
    unit vector in the same ``k`` coordinates (a seeded Gaussian, normalised per token): an
    edit of the same size in a random direction (the control of Wu et al.'s critics). Draws come
    from one generator seeded on entry, so the same forward passes give the same result. Hooks
    are removed on exit (the bridge's ``model.hooks`` context).
    """
    by_layer = _by_layer(circuit)
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    site = next(iter(circuit)).site

    def hook_fn(units: Tensor):
        def fn(act: Tensor, hook: Any) -> Tensor:
            idx = units.to(act.device)
            a = act[..., idx]
            direction = torch.randn(a.shape, generator=generator, device=act.device, dtype=a.dtype)
            direction = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            out = act.clone()
            out[..., idx] = a + direction * a.norm(dim=-1, keepdim=True)
            return out

        return fn

    hooks = [(hook_name(site, layer), hook_fn(units)) for layer, units in by_layer.items()]
    with model.hooks(fwd_hooks=hooks):
        yield


def secret_attribution(model: Any, secrets: Any, *, site: str = "neuron") -> Scores:
    """Plain activation x gradient of the secrets' log-probability, per MLP neuron (``[layer, neuron]``).

    ``score[l, n] = - sum_p a[p] * dL/da[p]`` summed over the secrets, with ``L`` the secret's
    summed log-probability (causal: teacher-forced, ``sum_j log p(s_j | prefix, s_<j)``; masked:
    one row per secret token with that token masked, ``sum_j log p(s_j | rest)``) and ``a`` the
    neuron's activation at every position: the first-order predicted drop in nats when the
    neuron is zeroed everywhere (``neuron_attribution``'s formula, on multi-token secrets).
    Positive: removing the neuron is predicted to hide the secret. One forward and backward pass
    per secret (its rows share one length, so no padding enters a masked LM).
    """
    secrets = as_secrets(secrets)
    masked = is_masked_lm(model)
    names = [hook_name(site, layer) for layer in range(model.cfg.n_layers)]
    total = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp)
    device = model_device(model)
    for enc in encode_secrets(model, secrets):
        start, n = len(enc.head), len(enc.secret)
        if masked:
            rows, where = masked_secret_rows(enc, mask_token_id(model))
            tokens = torch.tensor(rows, device=device)
            at = torch.tensor(where, device=device)
        else:
            tokens = torch.tensor([enc.row], device=device).expand(n, -1)
            at = torch.arange(start - 1, start + n - 1, device=device)  # position predicting token j
        target = torch.tensor(enc.secret, device=device)
        if not masked:  # one row suffices for a causal LM: all predictions read the same pass
            tokens = tokens[:1]

        def metric(logits: Tensor, at=at, target=target) -> Tensor:
            if masked:
                return logits[torch.arange(len(at)), at].log_softmax(-1)[torch.arange(len(at)), target].sum()
            return logits[0, at].log_softmax(-1)[torch.arange(len(at)), target].sum()

        cap = activations_and_gradients(model, tokens, names, metric)
        drops = [-(cap.activations[h] * cap.gradients[h]).sum((0, 1)) for h in names]
        total -= torch.stack(drops).float().cpu()
    return Scores(
        total, ("layer", "neuron"), site, "secret_attribution",
        config={"n_secrets": len(secrets), "masked_lm": masked},
        provenance=Provenance.of(model, data=[s.text for s in secrets]),
    )
