"""Rank-one edits of one MLP's output matrix at a located layer (ROME), with AlphaEdit's projection.

An MLP block computes ``mlp_out = W k + b``: ``k`` (``[d_mlp]``) is what its output projection
reads, TransformerLens's ``blocks.{L}.mlp.hook_post`` (GPT-2 and GPT-NeoX: the activation of the
up-projection; Llama: ``act(gate) * up``), and ``W`` (``[d_model, d_mlp]``, by meaning) is the
output projection (``mechedit.hf.LAYOUTS[...].mlp_out``: GPT-2's ``mlp.c_proj``, a ``Conv1D``
stored as ``W^T``; GPT-NeoX's ``dense_4h_to_h`` and Llama's ``down_proj``, ``nn.Linear`` stored as
``W``). ROME (Meng et al. 2022) treats ``W`` as a key-value memory and writes one new pair:

1. **Key** ``k*``: ``hook_post`` at the subject's last token, averaged over every request prompt,
   each run bare and after a few random prefixes (here: seeded general-text sentences; ROME uses
   short generated texts), so the key does not depend on one context.
2. **Value** ``v* = W k* + b + δ``: ``δ`` (``[d_model]``) is added to ``blocks.{L}.hook_mlp_out``
   at the subject's last token of every such context and optimised (Adam) to minimise the mean
   per-token negative log-likelihood of the new answer (teacher-forced, so multi-token answers
   work), plus optionally ROME's *essence* term ``kl_factor * KL(edited || original)`` of the
   next-token distribution after the subject alone (``essence_template``, ``δ`` added there too),
   plus ROME's decay ``weight_decay * |δ| / |v0|^2`` (``v0`` = the original ``mlp_out`` at those
   tokens, mean over contexts); ``|δ|`` is clamped to ``clamp_norm_factor * |v0|``.
3. **Covariance** ``C = E[k k^T]`` (uncentred, ``[d_mlp, d_mlp]``) over every token of general text
   but BOS, plus a ridge ``cov_ridge * trace(C) / d_mlp * I`` so it is invertible on a small corpus.
4. **Update** ``ΔW = (v* - W k* - b) u^T`` with ``u = C^{-1} k* / (k*^T C^{-1} k*)``: the
   smallest change in ``tr(ΔW C ΔW^T)`` (keys weighted as general text makes them) with
   ``W' k* + b = v*`` exactly. The residual ``v* - W k* - b`` is ``δ``.

Two departures from ROME's defaults, both options (``RankOneConfig``): ``fact_token`` reads the
key and adds ``δ`` at the subject's first token or at the prompt's last token instead (ROME's own
``fact_token`` setting), and ``key_mode="contexts"`` fits every context's key ``k_i`` instead of
their mean: ``u`` minimises ``mean_i (u^T k_i - 1)^2 + λ u^T C u`` (MEMIT's single-layer normal
equations for one fact), so ``ΔW = δ u^T`` is still rank one. On ``factworld-planted`` (facts
planted in MLP 2 at every position) the subject's last token carries too little of a planted fact
for ROME's key (32 % of the edited prompts rewritten), while at the last token a mean key and
per-context keys both work; on the fact world trained before issue 7 the per-context keys were
also needed (one averaged key rewrote other people's answers). The README's rank-one section has
the measured table.

**AlphaEdit** (Fang et al. 2025) as an option (``preserve=``): given preserved keys ``K0``
(``[n, d_mlp]``: every token of preserved texts, the subject's last token of preserved facts, or
a tensor), ``u`` is restricted to the null space of ``K0``: the eigenvectors ``U`` of
``K0^T K0 / n`` whose eigenvalue is at most ``null_space_tol`` times the largest, and
``u = U a`` with ``a`` the same C-weighted minimum (``a = M^{-1} q / (q^T M^{-1} q)``,
``M = U^T C U``, ``q = U^T k*``). Then ``ΔW K0 = 0`` up to those eigenvalues: a preserved key's
output does not move. (AlphaEdit's own update drops ``C`` for an identity; here the projection is
applied to ROME's weighted solve, which it reduces to when ``preserve`` is not given.)

**Several facts** are edited **sequentially** (ROME one at a time, not MEMIT's batch): requests
are grouped by ``(subject, target_new)`` in order of first appearance; each group is one rank-one
update computed on the model holding the earlier ones (``C`` is measured once, on the original
model). With ``preserve``, each group's ``k*`` joins the preserved keys of the later groups, so a
later edit leaves earlier ones' keys alone.

The result is one ``WeightEdit`` (kind ``"rank_one"``) of the one output-projection weight; the
model is left as it was (apply it with ``edit.apply(model)``). Its ``params`` hold the settings,
the layer and weight name, and per group the subject, new answer, norms of ``k*``, ``v*``, ``δ``,
``W k* + b``, and the value loss before and after.

Where the layer comes from: ``layer=`` is an int or a ``Circuit`` from a localisation (causal
tracing's ``top_k(1)``, a neuron or ``mlp`` circuit): its components' layer. A circuit naming
several layers needs ``layer_rule`` (``"most"``: the layer with most components, ties to the
lowest; ``"first"`` / ``"last"``: lowest / highest).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechedit.checks import require_eval_mode
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.edit.weights import WeightEdit
from mechedit.hf import hf_parameters, layout
from mechedit.models import model_device
from mechedit.prompts import FactPrompt, facts_with_subjects
from mechedit.tokens import subject_token_positions, tokenize_continuations, tokenize_prompts

__all__ = [
    "FACT_TOKENS",
    "KEY_MODES",
    "LAYER_RULES",
    "RankOneConfig",
    "ValueFit",
    "collect_keys",
    "compute_key",
    "compute_keys",
    "compute_value",
    "key_covariance",
    "located_layer",
    "mlp_out_weight",
    "null_space_basis",
    "rank_one_delta",
    "rank_one_edit",
]

LAYER_RULES = ("most", "first", "last")
#: Where the key is read and the value written (ROME's ``fact_token``).
FACT_TOKENS = ("subject_last", "subject_first", "last")
#: One mean key written exactly (ROME), or every context's key fitted by least squares.
KEY_MODES = ("mean", "contexts")
# Sites whose layer is not an MLP block's (computed before the blocks).
_NOT_BLOCKS = ("embed", "pos_embed")


@dataclass(frozen=True)
class RankOneConfig:
    """Settings of ``rank_one_edit`` (ROME's GPT-2 XL values where they carry over).

    Attributes:
        fact_token: where the key is read and ``δ`` added (ROME's ``fact_token``, see
            ``FACT_TOKENS``): ``"subject_last"`` (ROME's default), ``"subject_first"``, or
            ``"last"`` (the prompt's last token, where a model that reads the subject early
            looks its facts up; the essence prompt then uses its own last token too).
        key_mode: ``"mean"`` (ROME): one key ``k*``, the mean over contexts, written exactly
            (``W' k* + b = v*``); ``"contexts"``: every context's own key ``k_i``, and ``u``
            minimises ``mean_i (u^T k_i - 1)^2 + cov_weight * u^T C u`` (MEMIT's single-layer
            normal equations for one fact's contexts; the update is still ``δ u^T``, rank one).
            Use it where the keys of one fact differ a lot between prompts (at ``"last"``).
        cov_weight: ``λ``, the weight of ``C`` against the contexts' keys in ``"contexts"`` mode
            (MEMIT's ``mom2_update_weight``, here per context: both terms are means, so it does
            not depend on how many contexts there are). Larger keeps other keys' outputs closer
            and reaches the edit's keys less. ``None`` (default) chooses it per edit: the largest
            of ``10^6, 10^5.75, ..., 10^-2`` at which the edited weight alone (no ``δ`` hook) gives
            every request prompt itself (bare, no prefix) the new answer with a mean per-token
            NLL ``<= auto_max_nll``; if none does, the smallest (recorded as ``reached: false``).
            Unused in ``"mean"`` mode, where the scale of ``C`` cancels.
        auto_max_nll: the automatic ``cov_weight``'s criterion, nats (``ln 2``: p(new) >= 1/2,
            so a one-token new answer is the top-1 token of every request prompt).
        n_prefixes: random general-text prefixes per request prompt, besides the bare prompt
            (ROME: 20 generated ones). 0 uses the bare prompts only.
        seed: seeds the choice of prefixes.
        v_steps: most Adam steps optimising ``δ`` (ROME: 20).
        v_lr: Adam's learning rate for ``δ`` (ROME: 0.5).
        stop_loss: stop once the mean per-token NLL of the new answer is below this (nats;
            ROME: 0.05, i.e. p(new) ≈ 0.95).
        kl_factor: weight of the essence KL term (ROME: 0.0625); 0 leaves it out.
        essence_template: the essence prompt, ``{}`` for the subject (ROME: ``"{} is a"``; the
            subject alone fits any vocabulary).
        weight_decay: weight of ``|δ| / |v0|^2`` (ROME: 0.5).
        clamp_norm_factor: ``|δ|`` is kept at most this times ``|v0|`` (ROME: 4).
        cov_ridge: ridge added to ``C``, relative to its mean eigenvalue ``trace(C) / d_mlp``.
        null_space_tol: with ``preserve``, eigen-directions of the preserved keys' second
            moment up to this fraction of its largest eigenvalue count as null space (AlphaEdit
            takes an absolute 2e-2 on its Wikipedia statistics).
        layer_rule: how to choose among several layers a circuit names (``LAYER_RULES``), or
            ``None`` to refuse such a circuit.
        batch_size: rows per forward pass when collecting keys and the covariance.
    """

    fact_token: str = "subject_last"
    key_mode: str = "mean"
    cov_weight: float | None = None
    auto_max_nll: float = math.log(2)
    n_prefixes: int = 5
    seed: int = 0
    v_steps: int = 25
    v_lr: float = 0.5
    stop_loss: float = 0.05
    kl_factor: float = 0.0625
    essence_template: str = "{}"
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    cov_ridge: float = 1e-4
    null_space_tol: float = 1e-2
    layer_rule: str | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("n_prefixes", "v_steps", "batch_size", "seed"):
            value = getattr(self, name)
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (0 if name in ("n_prefixes", "seed") else 1)
            ):
                raise ValueError(
                    f"{name} must be an int >= {0 if name in ('n_prefixes', 'seed') else 1}, got {value!r}"
                )
        for name in ("v_lr", "clamp_norm_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("stop_loss", "kl_factor", "weight_decay", "cov_ridge"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.null_space_tol, (int, float)) and 0 <= self.null_space_tol < 1):
            raise ValueError(f"null_space_tol must be in [0, 1), got {self.null_space_tol!r}")
        if not isinstance(self.essence_template, str) or self.essence_template.count("{}") != 1:
            raise ValueError(
                f"essence_template must hold exactly one '{{}}' for the subject, got {self.essence_template!r}"
            )
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {KEY_MODES}, got {self.key_mode!r}")
        if self.cov_weight is not None and not (
            isinstance(self.cov_weight, (int, float))
            and math.isfinite(self.cov_weight)
            and self.cov_weight > 0
        ):
            raise ValueError(
                f"cov_weight must be a finite number > 0 or None (automatic), got {self.cov_weight!r}"
            )
        if not (isinstance(self.auto_max_nll, (int, float)) and self.auto_max_nll > 0):
            raise ValueError(f"auto_max_nll must be a number > 0 (nats), got {self.auto_max_nll!r}")
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {self.fact_token!r}")
        if self.layer_rule is not None and self.layer_rule not in LAYER_RULES:
            raise ValueError(
                f"layer_rule must be one of {LAYER_RULES} or None, got {self.layer_rule!r}"
            )


# --------------------------------------------------------------------------------------------
# Where: the layer and its output-projection weight
# --------------------------------------------------------------------------------------------


def located_layer(model: Any, where: int | Circuit, *, rule: str | None = None) -> int:
    """The MLP layer to edit: ``where`` itself, or the layer a localisation's ``Circuit`` names.

    A circuit with provenance must come from ``model`` (same weights hash), else
    ``ModelMismatchError``; a hand-made circuit (no provenance) is taken as it is. Components
    without a layer (a partition of the embedding) and ``embed`` / ``pos_embed`` (before the
    blocks) name no MLP layer. Several layers need ``rule`` (see ``LAYER_RULES``).
    """
    n_layers = int(model.cfg.n_layers)
    if isinstance(where, bool) or not isinstance(where, (int, Circuit)):
        raise ValueError(
            f"layer must be an int or a Circuit from a localisation, got {type(where).__name__}"
        )
    if isinstance(where, int):
        if not 0 <= where < n_layers:
            raise ValueError(
                f"layer {where} is out of range: the model has layers 0..{n_layers - 1}"
            )
        return where
    if len(where) == 0:
        raise ValueError(
            "the circuit is empty, so it names no layer to edit; pass layer=int or a circuit with "
            "at least one component (e.g. causal_tracing(...).mlp.top_k(1))"
        )
    if where.provenance is not None:
        where.check_model(model, strict=True)
    layers = [c.layer for c in where if c.layer is not None and c.site not in _NOT_BLOCKS]
    if not layers:
        raise ValueError(
            f"the circuit's components ({', '.join(map(str, list(where)[:3]))}) name no block "
            "layer; pass layer=int"
        )
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(
            f"the circuit names layers {sorted(set(bad))}, outside this model's 0..{n_layers - 1}"
        )
    distinct = sorted(set(layers))
    if len(distinct) == 1:
        return distinct[0]
    if rule is None:
        raise ValueError(
            f"the circuit names {len(distinct)} layers {distinct}; a rank-one edit changes one MLP. "
            f"Pass layer_rule= one of {LAYER_RULES} (RankOneConfig), or layer=int"
        )
    if rule == "first":
        return distinct[0]
    if rule == "last":
        return distinct[-1]
    counts = {x: layers.count(x) for x in distinct}
    return max(distinct, key=lambda x: (counts[x], -x))


def mlp_out_weight(
    model: Any, layer: int
) -> tuple[str, Float[Tensor, "d_model d_mlp"], Tensor | None]:
    """The MLP output projection of ``layer``: HF weight name, ``W`` by meaning, and its bias.

    ``W`` is ``[d_model, d_mlp]`` (``mlp_out = W k + b``) whatever the storage (a detached view
    of GPT-2's ``Conv1D`` weight is transposed); the bias is ``None`` where the checkpoint has
    none (Llama without ``mlp_bias``). Names come from ``mechedit.hf.LAYOUTS``.
    """
    linear = layout(model).mlp_out
    params = hf_parameters(model)
    name = linear.weight.format(layer=layer)
    weight = params[name].detach()
    bias_name = None if linear.bias is None else linear.bias.format(layer=layer)
    bias = params[bias_name].detach() if bias_name in params else None
    return name, (weight.T if linear.in_out else weight), bias


# --------------------------------------------------------------------------------------------
# Contexts: request prompts, bare and after prefixes, with the subject's last token
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Contexts:
    texts: list[str]
    positions: Tensor  # [n] the fact token's position in each text (BOS counted)


def _with_prefix(prefix: str, fact: FactPrompt) -> FactPrompt:
    if not prefix:
        return fact
    shift = len(prefix) + 1
    start, end = fact.subject_span  # type: ignore[misc]
    return FactPrompt(
        prompt=f"{prefix} {fact.prompt}",
        target=fact.target,
        subject=fact.subject,
        subject_span=(start + shift, end + shift),
    )


def _contexts(
    model: Any, facts: Sequence[FactPrompt], prefixes: Sequence[str], token: str = "subject_last"
) -> _Contexts:
    """Every fact bare and after each prefix, with the position of ``token`` (``FACT_TOKENS``)."""
    if token not in FACT_TOKENS:
        raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {token!r}")
    rows = [_with_prefix(p, f) for f in facts for p in ("", *prefixes)]
    texts = [f.prompt for f in rows]
    if token == "last":
        positions = tokenize_prompts(model, texts, device="cpu").last_positions
    else:
        spans = [subject_token_positions(model, f) for f in rows]
        positions = torch.tensor(
            [s.start if token == "subject_first" else s.stop - 1 for s in spans]
        )
    return _Contexts(texts, positions)


def _prefixes(texts: Sequence[str] | None, cfg: RankOneConfig) -> list[str]:
    pool = sorted(set(texts or ()))
    if not pool or cfg.n_prefixes == 0:
        return []
    return random.Random(cfg.seed).sample(pool, min(cfg.n_prefixes, len(pool)))


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


class _Done(Exception):
    """Raised by a hook to end a forward pass once what it needs has been computed."""


def _hook(layer: int, what: str) -> str:
    return f"blocks.{layer}.mlp.hook_post" if what == "key" else f"blocks.{layer}.hook_mlp_out"


@torch.no_grad()
def _keys_at(
    model: Any,
    layer: int,
    texts: Sequence[str],
    positions: Sequence[Tensor] | None,
    batch_size: int,
) -> Float[Tensor, "n d_mlp"]:
    """``hook_post`` rows: at ``positions[i]`` of text i, or (``None``) every real token but BOS.

    Also checks, on the rows it reads, that ``hook_mlp_out = W hook_post + b`` with ``W``/``b``
    from ``LAYOUTS``: the key is the exact input of the weight being edited.
    """
    device = model_device(model)
    _, weight, bias = mlp_out_weight(model, layer)
    bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    out: list[Tensor] = []
    got: dict[str, Tensor] = {}

    def grab_key(act: Tensor, hook: Any = None) -> None:  # noqa: ARG001
        got["key"] = act.detach()

    def grab_value(act: Tensor, hook: Any = None) -> None:  # noqa: ARG001
        got["value"] = act.detach()
        raise _Done  # nothing later is needed: skip the remaining layers

    hooks = [(_hook(layer, "key"), grab_key), (_hook(layer, "value"), grab_value)]
    for start in range(0, len(texts), batch_size):
        batch = tokenize_prompts(model, list(texts[start : start + batch_size]), device=device)
        got.clear()
        try:
            with model.hooks(fwd_hooks=hooks):
                model(batch.tokens)
        except _Done:
            pass
        if set(got) != {"key", "value"}:
            raise RuntimeError(
                f"the model never ran {_hook(layer, 'key')} and {_hook(layer, 'value')}; a rank-one "
                "edit reads the MLP's input and output there"
            )
        if positions is None:
            mask = batch.attention_mask.clone()
            if bos:
                mask[:, 0] = False
        else:
            mask = torch.zeros_like(batch.attention_mask)
            for row, pos in enumerate(positions[start : start + batch_size]):
                mask[row, pos] = True
        keys, values = got["key"][mask], got["value"][mask]
        predicted = keys.to(weight.dtype) @ weight.T + (0 if bias is None else bias)
        scale = float(values.abs().max()) + 1e-6
        if float((predicted - values).abs().max()) > 1e-4 * scale + 1e-5:
            raise RuntimeError(
                f"blocks.{layer}.hook_mlp_out is not W @ hook_post + b for the weight "
                f"{mlp_out_weight(model, layer)[0]} on this {type(model.original_model).__name__}: "
                "the hook or mechedit.hf.LAYOUTS does not mean what the rank-one edit assumes"
            )
        out.append(keys.double())
    return torch.cat(out)


def compute_keys(
    model: Any,
    layer: int,
    facts: Sequence[FactPrompt],
    *,
    prefixes: Sequence[str] = (),
    fact_token: str = "subject_last",
    batch_size: int = 64,
) -> Float[Tensor, "context d_mlp"]:
    """Every context's key: ``hook_post`` at the fact token of each fact, bare then after each
    prefix (fact-major order). Float64, on the CPU; ``compute_key`` is their mean."""
    ctx = _contexts(model, _checked_requests(facts, need_new=False), prefixes, fact_token)
    return _keys_at(model, layer, ctx.texts, list(ctx.positions), batch_size).cpu()


def compute_key(
    model: Any,
    layer: int,
    facts: Sequence[FactPrompt],
    *,
    prefixes: Sequence[str] = (),
    fact_token: str = "subject_last",
    batch_size: int = 64,
) -> Float[Tensor, " d_mlp"]:
    """ROME's ``k*``: mean ``blocks.{layer}.mlp.hook_post`` at the fact token.

    The fact token is the subject's last token by default (``FACT_TOKENS``). Averaged over every
    fact prompt, bare and after each prefix (``"{prefix} {prompt}"``). Float64, on the CPU.
    """
    return compute_keys(
        model, layer, facts, prefixes=prefixes, fact_token=fact_token, batch_size=batch_size
    ).mean(0)


def collect_keys(
    model: Any,
    layer: int,
    items: Sequence[str] | Sequence[FactPrompt],
    *,
    fact_token: str = "subject_last",
    batch_size: int = 64,
) -> Float[Tensor, "n d_mlp"]:
    """Keys ``hook_post`` at ``layer`` to preserve or to measure (float64, CPU).

    Texts give every real token but BOS; ``FactPrompt``s give each one's ``fact_token``.
    """
    items = list(items)
    if not items:
        raise ValueError("no texts or facts to collect keys from")
    if all(isinstance(i, FactPrompt) for i in items):
        ctx = _contexts(model, items, (), fact_token)
        return _keys_at(model, layer, ctx.texts, list(ctx.positions), batch_size).cpu()
    if all(isinstance(i, str) for i in items):
        return _keys_at(model, layer, items, None, batch_size).cpu()
    raise ValueError("pass a list of texts (str) or a list of FactPrompt, not a mix")


def key_covariance(
    model: Any, layer: int, texts: Sequence[str], *, batch_size: int = 64
) -> Float[Tensor, "d_mlp d_mlp"]:
    """``C = E[k k^T]`` of ``hook_post`` at ``layer`` over every token of ``texts`` but BOS.

    Uncentred (ROME's second moment), float64, CPU; no ridge (``rank_one_delta`` adds it).
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of general text (e.g. world.text_train)")
    keys = collect_keys(model, layer, list(texts), batch_size=batch_size)
    return keys.T @ keys / keys.shape[0]


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Targets:
    """The new answer after every context, teacher-forced: tokens and where to read them."""

    batch: Any  # TokenizedContinuations on the model's device
    positions: Tensor  # [n] the fact token of each context
    tok_pos: Tensor  # [n, width] position of continuation token j (clamped past a row's end)
    tok_ids: Tensor  # [n, width] its id
    tok_mask: Tensor  # [n, width] True at real continuation tokens

    @classmethod
    def of(
        cls, model: Any, facts: Sequence[FactPrompt], prefixes: Sequence[str], token: str
    ) -> _Targets:
        device = model_device(model)
        ctx = _contexts(model, facts, prefixes, token)
        news = [f.target_new for f in facts for _ in range(1 + len(prefixes))]
        batch = tokenize_continuations(model, ctx.texts, news, device=device)  # type: ignore[arg-type]
        # Continuation token j of row b sits at start+j and is predicted at start+j-1.
        width = int(batch.continuation_lengths.max())
        offsets = torch.arange(width, device=device)
        mask = offsets[None, :] < batch.continuation_lengths[:, None]
        pos = (batch.continuation_starts[:, None] + offsets[None, :]).clamp(
            max=batch.tokens.shape[1] - 1
        )
        return cls(batch, ctx.positions.to(device), pos, batch.tokens.gather(1, pos), mask)

    @property
    def n(self) -> int:
        return int(self.positions.shape[0])

    def nll(self, logits: Tensor) -> Float[Tensor, " n"]:
        """Per context, the mean per-token NLL of the new answer (nats, float64)."""
        logp = torch.log_softmax(logits.double(), -1)
        rows = torch.arange(self.n, device=logits.device)[:, None]
        tok_lp = logp[rows, self.tok_pos - 1].gather(-1, self.tok_ids[..., None]).squeeze(-1)
        return -(tok_lp * self.tok_mask).sum(1) / self.tok_mask.sum(1)


@dataclass(frozen=True)
class ValueFit:
    """What ``compute_value`` found: ``delta`` ``[d_model]`` (float64, CPU; ``v* = W k* + b +
    delta``), ``v0_norm`` (``|v0|``), the value loss (mean per-token NLL of the new answer over the
    contexts, nats, without the KL and decay terms) before and after, and the Adam steps taken."""

    delta: Tensor  # [d_model] float64
    v0_norm: float
    loss_before: float
    loss_after: float
    steps: int


def compute_value(
    model: Any,
    layer: int,
    facts: Sequence[FactPrompt],
    *,
    prefixes: Sequence[str] = (),
    config: RankOneConfig | None = None,
) -> ValueFit:
    """Optimise ROME's ``δ`` for facts of one subject and one ``target_new`` (see the module doc).

    Returns the fit: ``delta`` (``[d_model]``, float64, CPU; ``v* = W k* + b + delta``),
    ``v0_norm`` (``|v0|``), the value loss (mean per-token NLL of the new answer, nats, without
    the KL and decay terms) before and after, and the steps taken.
    """
    cfg = config or RankOneConfig()
    facts = _checked_requests(facts, need_new=True)
    require_eval_mode(model, what="rank-one value optimisation", needs_grad=True)
    device = model_device(model)
    targets = _Targets.of(model, facts, prefixes, cfg.fact_token)
    rows = torch.arange(targets.n, device=device)
    subj = targets.positions
    if layer == int(model.cfg.n_layers) - 1 and bool(
        (subj < targets.batch.continuation_starts - 1).any()
    ):
        raise ValueError(
            f"layer {layer} is the model's last: its MLP output at the {cfg.fact_token} token reaches "
            "no later position, so it cannot change the answer after a prompt that goes on past "
            "the subject. Edit an earlier layer"
        )

    subject = facts[0].subject
    essence = FactPrompt(
        prompt=cfg.essence_template.format(subject), target=facts[0].target, subject=subject
    )
    ess_ctx = _contexts(model, [essence], (), cfg.fact_token)
    ess_batch = tokenize_prompts(model, ess_ctx.texts, device=device)
    ess_pos = ess_ctx.positions.to(device)

    d_model = int(model.cfg.d_model)
    dtype = next(iter(hf_parameters(model).values())).dtype
    delta = torch.zeros(d_model, device=device, dtype=dtype, requires_grad=True)
    name = _hook(layer, "value")
    captured: dict[str, Tensor] = {}

    def add_delta(positions: Tensor, row_index: Tensor, *, capture: bool = False):
        def fn(act: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
            if capture:  # the contexts' own outputs, not the essence prompt's
                captured["v0"] = act[row_index, positions].detach()
            mask = torch.zeros(act.shape[:2], dtype=act.dtype, device=act.device)
            mask[row_index, positions] = 1.0
            return act + mask[..., None] * delta

        return fn

    with torch.no_grad():
        with model.hooks(fwd_hooks=[(name, add_delta(ess_pos, torch.arange(1, device=device)))]):
            ess_logp0 = torch.log_softmax(model(ess_batch.tokens)[0, ess_pos[0]].double(), -1)

    def losses() -> tuple[Tensor, Tensor]:
        with model.hooks(fwd_hooks=[(name, add_delta(subj, rows, capture=True))]):
            nll = targets.nll(model(targets.batch.tokens))
        kl = torch.zeros((), dtype=torch.float64, device=device)
        if cfg.kl_factor > 0:
            with model.hooks(
                fwd_hooks=[(name, add_delta(ess_pos, torch.arange(1, device=device)))]
            ):
                ess_logp = torch.log_softmax(model(ess_batch.tokens)[0, ess_pos[0]].double(), -1)
            kl = (ess_logp.exp() * (ess_logp - ess_logp0)).sum()  # KL(edited || original)
        return nll.mean(), kl

    optimiser = torch.optim.Adam([delta], lr=cfg.v_lr)
    loss_before = math.nan
    steps = 0
    v0_norm = math.nan
    nll_value = math.nan
    for step in range(cfg.v_steps + 1):
        nll, kl = losses()
        nll_value = float(nll.detach())
        if step == 0:
            loss_before = nll_value
            v0_norm = float(captured["v0"].double().mean(0).norm())
        if nll_value < cfg.stop_loss or step == cfg.v_steps:
            break
        decay = cfg.weight_decay * delta.double().norm() / max(v0_norm, 1e-12) ** 2
        loss = nll + cfg.kl_factor * kl + decay
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        steps += 1
        with torch.no_grad():
            limit = cfg.clamp_norm_factor * v0_norm
            norm = float(delta.norm())
            if norm > limit:
                delta.mul_(limit / norm)
    return ValueFit(delta.detach().double().cpu(), v0_norm, loss_before, nll_value, steps)


# --------------------------------------------------------------------------------------------
# The closed form
# --------------------------------------------------------------------------------------------


def null_space_basis(
    preserved: Float[Tensor, "n d_mlp"], *, tol: float = 1e-2
) -> Float[Tensor, "d_mlp m"]:
    """Orthonormal basis of the directions the preserved keys (nearly) do not use.

    The eigenvectors of ``K0^T K0 / n`` with eigenvalue ``<= tol * largest`` (float64).
    Raises ``ValueError`` when no direction qualifies (the keys span everything: raise ``tol``).
    """
    keys = preserved.double()
    if keys.ndim != 2 or keys.shape[0] == 0:
        raise ValueError(
            f"preserved keys must be [n, d_mlp] with n >= 1, got shape {tuple(keys.shape)}"
        )
    second = keys.T @ keys / keys.shape[0]
    values, vectors = torch.linalg.eigh(second)
    free = values <= tol * values.max().clamp(min=1e-300)
    if not bool(free.any()):
        raise ValueError(
            f"the {keys.shape[0]} preserved keys span all {keys.shape[1]} key directions above "
            f"null_space_tol={tol}: there is no null space to edit in; raise null_space_tol or "
            "preserve fewer keys"
        )
    return vectors[:, free]


def rank_one_delta(
    key: Float[Tensor, " d_mlp"] | Float[Tensor, "context d_mlp"],
    residual: Float[Tensor, " d_model"],
    covariance: Float[Tensor, "d_mlp d_mlp"],
    *,
    ridge: float = 0.0,
    null_basis: Float[Tensor, "d_mlp m"] | None = None,
    cov_weight: float = 1000.0,
) -> Float[Tensor, "d_model d_mlp"]:
    """``ΔW = residual u^T`` (float64), ``u`` the key-side vector of a rank-one edit.

    ``C = covariance + ridge * trace(covariance) / d_mlp * I``.

    * One key ``[d_mlp]`` (ROME): ``u^T key = 1`` minimising ``u^T C u``, so
      ``u = C^{-1} key / (key^T C^{-1} key)`` and ``(W + ΔW) key = W key + residual`` exactly.
    * Keys ``[n, d_mlp]`` (one per context): ``u`` minimises
      ``mean_i (u^T k_i - 1)^2 + cov_weight * u^T C u``, so
      ``u = (n cov_weight C + K^T K)^{-1} K^T 1``.

    With ``null_basis`` (``U``, ``[d_mlp, m]``, orthonormal) ``u = U a`` is confined to its span
    and the same problem is solved for ``a`` (AlphaEdit's projection): then
    ``ΔW k0 = residual (a^T U^T k0)``, zero for every ``k0`` orthogonal to the span.
    """
    k = key.double()
    r = residual.double().reshape(-1)
    c = covariance.double()
    d = k.shape[-1]
    if k.ndim not in (1, 2) or (k.ndim == 2 and k.shape[0] == 0):
        raise ValueError(f"key must be [d_mlp] or [n, d_mlp] with n >= 1, got {tuple(k.shape)}")
    if c.shape != (d, d):
        raise ValueError(f"covariance must be [{d}, {d}] for a key of {d}, got {tuple(c.shape)}")
    if ridge:
        c = c + ridge * torch.trace(c) / d * torch.eye(d, dtype=c.dtype)
    if k.ndim == 2:
        basis = torch.eye(d, dtype=c.dtype) if null_basis is None else null_basis.double()
        kp = k @ basis
        a = torch.linalg.solve(k.shape[0] * cov_weight * basis.T @ c @ basis + kp.T @ kp, kp.sum(0))
        u = basis @ a
        if not bool(torch.isfinite(u).all()) or float((k @ u).mean()) <= 0:
            raise ValueError(
                "the keys have no usable component (u^T k <= 0 on average): a rank-one update "
                "cannot reach them; lower cov_weight or preserve fewer keys"
            )
        return torch.outer(r, u)
    if null_basis is None:
        cinv_k = torch.linalg.solve(c, k)
        denom = k @ cinv_k
        u = cinv_k / denom
    else:
        basis = null_basis.double()
        q = basis.T @ k
        m = basis.T @ c @ basis
        minv_q = torch.linalg.solve(m, q)
        denom = q @ minv_q
        u = basis @ (minv_q / denom)
    if not bool(torch.isfinite(u).all()) or float(denom) <= 0:
        raise ValueError(
            "the key has no usable component (k^T C^-1 k <= 0, or the key lies in the preserved "
            "keys' span): a rank-one update cannot reach it; check the key, raise cov_ridge, or "
            "preserve fewer keys"
        )
    return torch.outer(r, u)


# --------------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _auto_cov_weight(
    model: Any,
    param: torch.nn.Parameter,
    in_out: bool,
    facts: Sequence[FactPrompt],
    prefixes: Sequence[str],
    keys: Tensor,
    residual: Tensor,
    covariance: Tensor,
    basis: Tensor | None,
    cfg: RankOneConfig,
) -> tuple[Tensor, float, dict[str, Any]]:
    """The update at the largest ``cov_weight`` whose edited weight alone gives every request
    prompt the new answer (mean per-token NLL ``<= cfg.auto_max_nll``; ``RankOneConfig.cov_weight``).

    Prefixed contexts are left out of the criterion: they are there to make ``δ`` and the keys
    robust, and requiring them too chose weights ~100x smaller on the fact world, at the cost of
    other people's facts."""
    targets = _Targets.of(model, facts, (), cfg.fact_token)  # the request prompts themselves
    original = param.detach().clone()
    delta_w, weight, worst = None, math.nan, math.nan
    try:
        for exponent in torch.arange(6.0, -2.01, -0.25).tolist():
            weight = 10.0**exponent
            delta_w = rank_one_delta(
                keys, residual, covariance, ridge=cfg.cov_ridge, null_basis=basis, cov_weight=weight
            )
            param.add_((delta_w.T if in_out else delta_w).to(param.dtype).to(param.device))
            worst = float(targets.nll(model(targets.batch.tokens)).max())
            param.copy_(original)
            if worst <= cfg.auto_max_nll:
                break
    finally:
        param.copy_(original)
    return delta_w, weight, {"reached": worst <= cfg.auto_max_nll, "max_prompt_nll": worst}  # type: ignore[return-value]


def _u_of(delta_w: Tensor, residual: Tensor) -> Tensor:
    """``u`` back from ``ΔW = residual u^T`` (for the manifest's ``mean_u_dot_key``)."""
    r = residual.double()
    return delta_w.T @ r / (r @ r).clamp(min=1e-300)


def _checked_requests(facts: Sequence[FactPrompt], *, need_new: bool) -> list[FactPrompt]:
    facts = facts_with_subjects(facts, why="the key is read at the subject's tokens")
    for i, fact in enumerate(facts):
        if need_new and fact.target_new is None:
            raise ValueError(
                f"fact {i} ({fact.prompt!r}) has no target_new: what should it say instead?"
            )
    return list(facts)


def _groups(facts: list[FactPrompt]) -> list[list[FactPrompt]]:
    groups: dict[tuple[str, str], list[FactPrompt]] = {}
    for fact in facts:
        groups.setdefault((fact.subject.strip(), fact.target_new.strip()), []).append(fact)  # type: ignore[union-attr]
    return list(groups.values())


def rank_one_edit(
    model: Any,
    facts: Sequence[FactPrompt],
    *,
    layer: int | Circuit | Component,
    texts: Sequence[str] | None = None,
    preserve: Sequence[str] | Sequence[FactPrompt] | Tensor | None = None,
    config: RankOneConfig | None = None,
    prefixes: Sequence[str] | None = None,
    covariance: Tensor | None = None,
    key: Tensor | None = None,
    value: Tensor | None = None,
) -> WeightEdit:
    """ROME's rank-one edit of ``layer``'s MLP output projection, as one ``WeightEdit``.

    Args:
        facts: ``FactPrompt``s with ``subject`` and ``target_new``; those sharing subject and new
            answer are one edit (their prompts all feed ``k*`` and ``δ``), several such groups
            are edited one after another (see the module docstring).
        layer: an int, a ``Circuit`` from a localisation, or one ``Component`` (see
            ``located_layer``; ``config.layer_rule`` picks among several layers).
        texts: general text (e.g. ``world.text_train``) for ``C`` and the random prefixes.
            Needed unless both ``covariance`` and ``prefixes`` are given.
        preserve: AlphaEdit's preserved keys at ``layer``: texts (every token), facts (the
            subject's last token) or a ``[n, d_mlp]`` tensor. ``None``: plain ROME.
        config: ``RankOneConfig``.
        prefixes: the contexts before each prompt; ``None`` draws ``config.n_prefixes`` of
            ``texts`` (seeded).
        covariance: ``C`` (``[d_mlp, d_mlp]``) instead of measuring it on ``texts``.
        key, value: ``k*`` (``[d_mlp]``; in ``"contexts"`` mode the keys ``[n, d_mlp]``) and
            ``v*`` (``[d_model]``, the whole MLP output wanted for the mean key, bias included)
            instead of computing them; only for a single group. ``ΔW`` is then the closed form
            of exactly these (``rank_one_delta`` with residual ``v* - W mean(k) - b``).

    Returns:
        A ``WeightEdit`` of kind ``"rank_one"`` (not applied: ``edit.apply(model)``) writing the
        one HF weight ``LAYOUTS`` names as the MLP output projection of the layer.

    Raises:
        ValueError: no facts, a fact without subject or ``target_new``, a circuit naming no
            layer or several without a rule, missing ``texts``, ``key``/``value`` with several
            groups or of the wrong size, a key the update cannot reach.
        ModelMismatchError: a circuit computed on another model.
        RuntimeError: the model is in training mode, or its hooks do not mean what the edit
            assumes (``hook_mlp_out != W hook_post + b``).
    """
    cfg = config or RankOneConfig()
    if not isinstance(cfg, RankOneConfig):
        raise ValueError(f"config must be a RankOneConfig, got {type(cfg).__name__}")
    require_eval_mode(model, what="rank_one_edit", needs_grad=True)
    requests = _checked_requests(facts, need_new=True)
    if isinstance(layer, Component):
        layer = Circuit((layer,))
    layer_index = located_layer(model, layer, rule=cfg.layer_rule)
    groups = _groups(requests)
    if (key is None) != (value is None):
        raise ValueError("pass both key and value (k*, v*), or neither")
    if key is not None and len(groups) != 1:
        raise ValueError(
            f"key/value describe one edit, but the facts form {len(groups)} (subject, target_new) groups"
        )
    text_list = None if texts is None else list(texts)
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not one string")
    if covariance is None and not text_list:
        raise ValueError(
            "a rank-one edit weighs keys by their covariance on general text: pass texts= (e.g. "
            "world.text_train) or covariance="
        )
    if prefixes is None:
        prefix_list = _prefixes(text_list, cfg)
    else:
        if isinstance(prefixes, str):
            raise ValueError("prefixes must be a list of strings, not one string")
        prefix_list = [p.strip() for p in prefixes if p.strip()]

    name, weight, bias = mlp_out_weight(model, layer_index)
    d_model, d_mlp = weight.shape
    if covariance is None:
        covariance = key_covariance(model, layer_index, text_list, batch_size=cfg.batch_size)  # type: ignore[arg-type]
        cov_source = {"texts": len(text_list)}  # type: ignore[arg-type]
    else:
        cov_source = {"given": True}
    if tuple(covariance.shape) != (d_mlp, d_mlp):
        raise ValueError(f"covariance must be [{d_mlp}, {d_mlp}], got {tuple(covariance.shape)}")
    preserved: Tensor | None = None
    if preserve is not None:
        preserved = (
            preserve.detach().double().cpu()
            if isinstance(preserve, Tensor)
            else collect_keys(
                model,
                layer_index,
                list(preserve),
                fact_token=cfg.fact_token,
                batch_size=cfg.batch_size,
            )
        )
        if preserved.ndim != 2 or preserved.shape[1] != d_mlp:
            raise ValueError(f"preserved keys must be [n, {d_mlp}], got {tuple(preserved.shape)}")
    n_preserved = 0 if preserved is None else int(preserved.shape[0])

    param = hf_parameters(model)[name]
    in_out = layout(model).mlp_out.in_out
    original = param.detach().clone()
    records: list[dict[str, Any]] = []
    null_dims: list[int] = []
    try:
        for group in groups:
            _, weight, bias = mlp_out_weight(
                model, layer_index
            )  # holds the earlier groups' updates
            w64 = weight.double().cpu()
            b64 = torch.zeros(d_model, dtype=torch.float64) if bias is None else bias.double().cpu()
            if key is None:
                keys = compute_keys(
                    model,
                    layer_index,
                    group,
                    prefixes=prefix_list,
                    fact_token=cfg.fact_token,
                    batch_size=cfg.batch_size,
                )
                k = keys.mean(0)
                fit = compute_value(model, layer_index, group, prefixes=prefix_list, config=cfg)
                residual = fit.delta
                fit_info = {
                    "v0_norm": fit.v0_norm,
                    "loss_before": fit.loss_before,
                    "loss_after": fit.loss_after,
                    "steps": fit.steps,
                }
            else:
                keys = key.detach().double().cpu()
                k = keys.reshape(-1, keys.shape[-1]).mean(0)
                v = value.detach().double().cpu().reshape(-1)  # type: ignore[union-attr]
                if k.shape[0] != d_mlp or v.shape[0] != d_model:
                    raise ValueError(
                        f"key must be [{d_mlp}] and value [{d_model}], got {tuple(k.shape)} and {tuple(v.shape)}"
                    )
                residual = v - (w64 @ k + b64)
                fit_info = {"given": True}
            basis = None
            if preserved is not None:
                basis = null_space_basis(preserved, tol=cfg.null_space_tol)
                null_dims.append(int(basis.shape[1]))
            if cfg.key_mode == "contexts" and cfg.cov_weight is None:
                delta_w, fit_info["cov_weight"], fit_info["auto"] = _auto_cov_weight(
                    model, param, in_out, group, prefix_list, keys, residual, covariance, basis, cfg
                )
            else:
                delta_w = rank_one_delta(
                    keys if cfg.key_mode == "contexts" else k,
                    residual,
                    covariance,
                    ridge=cfg.cov_ridge,
                    null_basis=basis,
                    cov_weight=cfg.cov_weight or 1.0,
                )
            with torch.no_grad():
                update = (delta_w.T if in_out else delta_w).to(param.dtype).to(param.device)
                param.add_(update)
            base_out = w64 @ k + b64
            records.append(
                {
                    "subject": group[0].subject,
                    "target_new": group[0].target_new,
                    "n_prompts": len(group),
                    "n_contexts": len(group) * (1 + len(prefix_list)),
                    "key_norm": float(k.norm()),
                    "mean_u_dot_key": float(
                        (keys.reshape(-1, d_mlp) @ _u_of(delta_w, residual)).mean()
                    ),
                    "value_norm": float((base_out + residual).norm()),
                    "original_value_norm": float(base_out.norm()),
                    "delta_norm": float(residual.norm()),
                    "update_norm": float(delta_w.norm()),
                    **fit_info,
                }
            )
            if preserved is not None:
                # Later edits must leave this one's key alone too.
                preserved = torch.cat([preserved, keys.reshape(-1, d_mlp)])
        new = param.detach().clone()
    finally:
        with torch.no_grad():
            param.copy_(original)
    params = {
        "layer": layer_index,
        "weight": name,
        "config": asdict(cfg),
        "prefixes": prefix_list,
        "covariance": cov_source,
        "alphaedit": None
        if preserve is None
        else {"n_preserved": n_preserved, "null_space_dims": null_dims},
        "sequential": len(groups) > 1,
        "edits": records,
    }
    return WeightEdit.from_new_tensors(model, {name: new}, kind="rank_one", params=params)
