"""Knowledge neurons: integrated gradients of a target's probability with respect to MLP neurons.

Dai et al. (2022, "Knowledge Neurons in Pretrained Transformers") and DEPN (Wu et al., 2023)
score MLP neuron ``i`` of layer ``l`` for a prompt and its target token by integrated gradients
from a zero baseline, all of the layer's neurons scaled together, at the predicting position:

    score[l, i] = a_i * (1/m) * sum_k  dP(target | a^l := alpha_k * a^l) / da_i  evaluated at alpha_k * a^l

``a^l`` is the layer's activation vector (``blocks.l.mlp.hook_post``, after the nonlinearity; the
pre-activation ``hook_pre`` with ``site="pre"``) at the one position whose logits predict the
target, replaced there by ``alpha_k * a^l`` (every other position and layer runs as usual) and
``P`` is the softmax probability of the target token (``prob="logprob"``: its log-probability).
The grid ``alpha_k`` (``alpha_grid``):

- ``"depn"`` (default): ``alpha_k = k/m``, ``k = 0 .. m-1`` (DEPN; captum's ``riemann_left``);
- ``"dai"``: ``alpha_k = k/m``, ``k = 1 .. m`` (Dai et al.'s formula; captum's ``riemann_right``);
- ``"linspace"``: ``alpha_k = linspace(0, 1, m)[k]`` (what the ``knowledge-neurons`` library does).

The weight is always ``1/m``, so the score is in probability units (nats with ``"logprob"``); by
the completeness of integrated gradients a layer's scores sum to about ``P(target | a^l) -
P(target | a^l := 0)``: positive where a neuron's activation raises the target.

**Where the target is predicted.** A causal LM predicts target token ``j`` at the position before
it, given the prompt and the target's true tokens ``0 .. j-1`` (its true prefix). A masked LM
(``BertForMaskedLM``) predicts at a mask: the prompt holds one mask token per target token, and
target token ``j`` is predicted at the ``j``-th mask with the other masks filled with their true
tokens. A multi-token target (a phone number) is scored per token and the scores are **summed**
over its tokens (DEPN); ``per_prompt=False`` then averages over prompts.

**How it is computed.** Every (predicted token, layer, step) is one row of a batch; each row
replaces its own layer's activation at its own position by its own ``alpha_k * a`` (one
``mechedit.interventions.Intervention`` per layer, selecting that layer's rows), and one
backward pass gives every row's gradient with respect to those replaced values. On a causal LM
(``method="resume"``, the default there) a row cannot change anything below its layer or before
its position, so it resumes from one reference run of the unchanged prompt (``mechedit.resume``):
only blocks ``l ..`` at the one predicting position are recomputed, with the earlier positions'
keys and values taken from the reference, and only that position is unembedded. ``method="full"``
runs whole forward passes (masked LMs, where every position sees the mask, always do). Rows are
chunked by ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mechedit.checks import HookCheck, hook_check_record, require_eval_mode
from mechedit.components import hook_name
from mechedit.gradients import capture_activations
from mechedit.interventions import Intervention, patch
from mechedit.models import is_masked_lm, model_device
from mechedit.progress import tqdm
from mechedit.prompts import FactPrompt
from mechedit.provenance import Provenance
from mechedit.resume import ReferenceRun, check_resumable, reference_run, resume
from mechedit.scores import Scores
from mechedit.tokens import answer_ids, get_tokenizer, token_ids, tokenize_prompts
from mechedit.zoo.world import PrivateRecord

__all__ = [
    "ALPHA_GRIDS",
    "KnowledgeNeuronsConfig",
    "KnowledgePrompt",
    "alphas",
    "is_masked_lm",
    "knowledge_neurons",
    "knowledge_prompts",
]

AlphaGrid = Literal["depn", "dai", "linspace"]
ALPHA_GRIDS = ("depn", "dai", "linspace")
_SITES = {"post": "neuron", "pre": "neuron_pre"}
_PROMPTS_PER_REFERENCE = 64


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class KnowledgePrompt:
    """A prompt and the target (one or more tokens) whose probability the neurons are scored for.

    Attributes:
        prompt: causal LM: the text right before the target (``"alvo abernoth was born in"``);
            masked LM: the text with one mask token per target token
            (``"alvo abernoth was born in <mask> ."``).
        target: the target as text, e.g. ``"paris"`` or a secret ``"5 5 0 1 2"``; on a causal LM
            it is tokenised in context after the prompt (``mechedit.tokens.answer_ids``).
    """

    prompt: str
    target: str

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(
                f"the target (secret) of prompt {self.prompt!r} is empty ({self.target!r}): give "
                "the text whose tokens the neurons should be scored for"
            )


def knowledge_prompts(model: Any, items: Any, targets: Sequence[str] | None = None) -> list[KnowledgePrompt]:
    """``items`` as ``KnowledgePrompt`` objects for ``model``.

    Accepted: ``KnowledgePrompt``; ``(prompt, target)`` string pairs; ``FactPrompt`` (its prompt
    and target); the fact world's ``PrivateRecord`` (prefix and secret; on a masked LM, the form
    ``factworld-mlm`` is trained on: ``"<prefix> <mask> ... <mask> ."``, one mask per secret
    token); or plain prompt strings with ``targets`` (one target each).
    """
    if isinstance(items, (str, KnowledgePrompt, FactPrompt, PrivateRecord)):
        items = [items]
    items = list(items)
    if not items:
        raise ValueError("no prompts given: pass at least one (prompt, target) item")
    if targets is not None:
        if isinstance(targets, str):
            targets = [targets]
        targets = list(targets)
        if len(targets) != len(items) or not all(isinstance(p, str) for p in items):
            raise ValueError(
                f"targets= pairs with plain prompt strings, one target each: got {len(items)} "
                f"prompts and {len(targets)} targets"
            )
        return [KnowledgePrompt(p, t) for p, t in zip(items, targets, strict=True)]
    masked = is_masked_lm(model)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, KnowledgePrompt):
            out.append(item)
        elif isinstance(item, FactPrompt):
            out.append(KnowledgePrompt(item.prompt, item.target))
        elif isinstance(item, PrivateRecord):
            if masked:
                mask = get_tokenizer(model).mask_token
                n = len(token_ids(model, item.secret))
                out.append(KnowledgePrompt(f"{item.prefix} {' '.join([mask] * n)} .", item.secret))
            else:
                out.append(KnowledgePrompt(item.prefix, item.secret))
        elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(s, str) for s in item):
            out.append(KnowledgePrompt(*item))
        elif isinstance(item, str):
            raise ValueError(
                f"prompt {i} is a plain string {item!r}: give its target with targets=[...], or "
                "pass (prompt, target) pairs"
            )
        else:
            raise ValueError(
                f"prompt {i} is a {type(item).__name__}; give KnowledgePrompt, (prompt, target) "
                "pairs, FactPrompt or PrivateRecord objects"
            )
    return out


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class KnowledgeNeuronsConfig:
    """Settings of ``knowledge_neurons`` (see the module docstring for the formula).

    Attributes:
        steps: ``m``, the number of points on the integration path (>= 1).
        alpha_grid: ``"depn"`` (``k/m``, ``k = 0..m-1``), ``"dai"`` (``k = 1..m``) or
            ``"linspace"`` (``linspace(0, 1, m)``, the ``knowledge-neurons`` library's grid).
        prob: ``"prob"`` (the target's softmax probability, DEPN/Dai) or ``"logprob"``.
        site: ``"post"`` (``mlp.hook_post``, after the nonlinearity; DEPN/Dai) or ``"pre"``.
        layers: layers to score (``None``: all); other layers are NaN in the scores.
        batch_size: rows (predicted token x layer x step) per forward/backward pass when
            resumed (one position each); whole forward passes take ``batch_size // n_pos`` rows
            (at least 1), so either holds about ``batch_size`` positions' logits at once.
        per_prompt: keep one score map per prompt (axis ``"prompt"``) instead of their mean.
        method: ``"auto"`` (``"resume"`` on causal LMs, else ``"full"``), ``"resume"`` or
            ``"full"`` (whole forward passes; the reference).
    """

    steps: int = 20
    alpha_grid: AlphaGrid = "depn"
    prob: Literal["prob", "logprob"] = "prob"
    site: Literal["post", "pre"] = "post"
    layers: tuple[int, ...] | None = None
    batch_size: int = 256
    per_prompt: bool = False
    method: Literal["auto", "resume", "full"] = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps (m, the integration points) must be an int >= 1, got {self.steps!r}")
        if self.alpha_grid not in ALPHA_GRIDS:
            raise ValueError(f"alpha_grid must be one of {ALPHA_GRIDS}, got {self.alpha_grid!r}")
        if self.prob not in ("prob", "logprob"):
            raise ValueError(f"prob must be 'prob' or 'logprob', got {self.prob!r}")
        if self.site not in _SITES:
            raise ValueError(f"site must be 'post' (after the activation) or 'pre', got {self.site!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.method not in ("auto", "resume", "full"):
            raise ValueError(f"method must be 'auto', 'resume' or 'full', got {self.method!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
            if not self.layers:
                raise ValueError("layers is empty: give at least one layer, or None for all")


def alphas(steps: int, grid: AlphaGrid = "depn") -> Tensor:
    """The ``steps`` scaling factors of ``grid`` (float64, CPU); see the module docstring."""
    KnowledgeNeuronsConfig(steps=steps, alpha_grid=grid)  # validates both
    if grid == "linspace":
        return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    k = torch.arange(steps, dtype=torch.float64) + (1 if grid == "dai" else 0)
    return k / steps


# ---------------------------------------------------------------------------------------------
# Predicted tokens: one row per target token


@dataclass(frozen=True)
class _Row:
    """One target token: the tokens the model sees, where it predicts, what, for which prompt."""

    tokens: tuple[int, ...]
    position: int
    target: int
    prompt: int


def _causal_rows(model: Any, prompts: Sequence[KnowledgePrompt]) -> list[_Row]:
    heads = tokenize_prompts(model, [p.prompt for p in prompts], device="cpu")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    rows = []
    for i, p in enumerate(prompts):
        head = heads.tokens[i, : int(heads.last_positions[i]) + 1].tolist()
        target = answer_ids(model, p.prompt, p.target)
        # token j is predicted at the position before it, from the prompt and target[:j]
        if n_ctx is not None and len(head) + len(target) - 1 > n_ctx:
            raise ValueError(
                f"prompt {i}: the target {p.target!r} ends beyond the sequence the model can read: "
                f"its last token is predicted at position {len(head) + len(target) - 2} but the "
                f"context is {n_ctx} tokens. Shorten the prompt or the target."
            )
        full = head + target
        rows.extend(
            _Row(tuple(full[: len(head) + j]), len(head) + j - 1, tok, i) for j, tok in enumerate(target)
        )
    return rows


def _masked_rows(model: Any, prompts: Sequence[KnowledgePrompt]) -> list[_Row]:
    tok = get_tokenizer(model)
    mask_id = tok.mask_token_id
    if mask_id is None:
        raise ValueError("this masked LM's tokenizer has no mask token, so there is no position to predict at")
    batch = tokenize_prompts(model, [p.prompt for p in prompts], device="cpu")
    rows = []
    for i, p in enumerate(prompts):
        ids = batch.tokens[i, : int(batch.last_positions[i]) + 1]
        masks = (ids == mask_id).nonzero().flatten().tolist()
        target = token_ids(model, p.target)
        if not masks:
            raise ValueError(
                f"prompt {i} ({p.prompt!r}) has no mask token {tok.mask_token!r}: a masked LM "
                f"predicts the target at a mask; put one {tok.mask_token!r} per target token "
                "where the target goes"
            )
        if len(masks) != len(target):
            raise ValueError(
                f"prompt {i} ({p.prompt!r}) has {len(masks)} mask tokens but its target "
                f"{p.target!r} is {len(target)} tokens: give one mask per target token"
            )
        filled = ids.clone()
        filled[masks] = torch.tensor(target)
        for pos, t in zip(masks, target, strict=True):
            row = filled.clone()
            row[pos] = mask_id  # the others show their true tokens
            rows.append(_Row(tuple(row.tolist()), pos, t, i))
    return rows


# ---------------------------------------------------------------------------------------------
# Integrated gradients over rows x layers x steps


def _target_value(logits: Tensor, targets: Tensor, prob: str) -> Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]
    return (logp.exp() if prob == "prob" else logp).sum()


def _ig_full(model: Any, group: list[_Row], names: list[str], grid: Tensor, cfg: KnowledgeNeuronsConfig, bar: Any) -> Tensor:
    """``[len(group), len(names), d]`` scores of rows of equal length, by whole forward passes."""
    device = model_device(model)
    tokens = torch.tensor([r.tokens for r in group], device=device)
    pos = torch.tensor([r.position for r in group], device=device)
    targets = torch.tensor([r.target for r in group], device=device)
    n_rows, n_layers, m = len(group), len(names), len(grid)
    cap = capture_activations(model, tokens, names)
    acts = torch.stack([cap.activations[n][torch.arange(n_rows, device=device), pos] for n in names], 1)
    grads = torch.zeros_like(acts).reshape(n_rows * n_layers, -1)
    # cell c = (row, layer, step) in row-major order; chunks of cells are forward passes
    total = n_rows * n_layers * m
    grid = grid.to(device=device, dtype=acts.dtype)
    # a whole forward keeps logits at every position: batch_size counts positions, as resumed rows do
    chunk = max(1, cfg.batch_size // tokens.shape[1])
    for start in range(0, total, chunk):
        cell = torch.arange(start, min(start + chunk, total), device=device)
        row, layer, step = cell // (n_layers * m), (cell // m) % n_layers, cell % m
        scaled = (grid[step, None] * acts[row, layer]).requires_grad_(True)
        edits = [
            Intervention(name, "replace", source=scaled, source_shape="row", rows=sel, positions=pos[row[sel]])
            for li, name in enumerate(names)
            if len(sel := (layer == li).nonzero().flatten())
        ]
        with torch.enable_grad():
            with patch(model, edits):
                logits = model(tokens[row])
            value = _target_value(logits[torch.arange(len(cell), device=device), pos[row]], targets[row], cfg.prob)
            grad = torch.autograd.grad(value, scaled)[0]
        grads.index_add_(0, row * n_layers + layer, grad)
        bar.update(len(cell))
    return acts * grads.reshape(acts.shape) / m


def _truncated(ref: ReferenceRun, end: int) -> ReferenceRun:
    """The reference of the rows' first ``end`` positions, each read at position ``end - 1``.

    Under causal attention nothing at positions ``< end`` depends on later tokens, so a prefix of
    a reference run is the reference run of the prefix.
    """
    return ReferenceRun(
        tokens=ref.tokens[:, :end],
        last_positions=torch.full_like(ref.last_positions, end - 1),
        resid=ref.resid[:, :, :end],
        keys=tuple(k[:, :, :end] for k in ref.keys),
        values=tuple(v[:, :, :end] for v in ref.values),
        logits=ref.logits,  # read only for rows that resume after their read position: none here
        activations={},
    )


def _ig_resume(model: Any, rows: list[_Row], names: list[str], layers: list[int], grid: Tensor, cfg: KnowledgeNeuronsConfig, bar: Any) -> Tensor:
    """As ``_ig_full`` for a causal LM: each row recomputed from its layer at its one position.

    One reference run of each prompt's whole sequence (prompt + target) serves all its target
    tokens; rows predicting at the same position share each ``resume`` batch.
    """
    device = model_device(model)
    n_rows, n_layers, m = len(rows), len(names), len(grid)
    prompts = sorted({r.prompt for r in rows})
    seq = {p: max((r.tokens for r in rows if r.prompt == p), key=len) for p in prompts}
    ref_row = {p: i for i, p in enumerate(prompts)}
    width = max(len(t) for t in seq.values())
    tokens = torch.tensor([list(seq[p]) + [seq[p][0]] * (width - len(seq[p])) for p in prompts], device=device)
    ref = reference_run(model, tokens, keep=names)  # right padding: no real token sees the pad
    row_of = torch.tensor([ref_row[r.prompt] for r in rows], device=device)
    pos = torch.tensor([r.position for r in rows], device=device)
    targets = torch.tensor([r.target for r in rows], device=device)
    acts = torch.stack([ref.activations[n][row_of, pos] for n in names], 1)  # [rows, layer, d]
    grads = torch.zeros_like(acts).reshape(n_rows * n_layers, -1)
    grid = grid.to(device=device, dtype=acts.dtype)
    layer_ids = torch.tensor(layers, device=device)
    for p in sorted(set(pos.tolist())):
        members = (pos == p).nonzero().flatten()
        view = _truncated(ref, p + 1)
        # cells (layer, member, step) in that order, so start layers never decrease in a batch
        total = len(members) * n_layers * m
        for start in range(0, total, cfg.batch_size):
            cell = torch.arange(start, min(start + cfg.batch_size, total), device=device)
            layer, member, step = cell // (len(members) * m), (cell // m) % len(members), cell % m
            row = members[member]
            scaled = (grid[step, None] * acts[row, layer]).requires_grad_(True)
            edits = []
            for li, name in enumerate(names):
                # resume hands block l the rows that started at or below it, in batch order
                lo, hi = int((layer < li).sum()), int((layer <= li).sum())
                if hi > lo:
                    edits.append(Intervention(
                        name, "replace", source=scaled[:hi], source_shape="row",
                        rows=torch.arange(lo, hi, device=device), positions=0,
                    ))
            with torch.enable_grad():
                logits = resume(
                    model, view, start_pos=p, rows=row_of[row], start_layers=layer_ids[layer],
                    fwd_hooks=[e.hook() for e in edits], differentiable=True,
                )
                grad = torch.autograd.grad(_target_value(logits, targets[row], cfg.prob), scaled)[0]
            grads.index_add_(0, row * n_layers + layer, grad)
            bar.update(len(cell))
    return acts * grads.reshape(acts.shape) / m


def _method(model: Any, cfg: KnowledgeNeuronsConfig) -> str:
    problem = check_resumable(model)
    if cfg.method == "resume" and problem:
        raise ValueError(f"method='resume' needs a causal LM: {problem}; use method='full'")
    if cfg.method == "auto":
        return "full" if problem else "resume"
    return cfg.method


def knowledge_neurons(
    model: Any,
    prompts: Any,
    *,
    targets: Sequence[str] | None = None,
    steps: int = 20,
    alpha_grid: AlphaGrid = "depn",
    prob: Literal["prob", "logprob"] = "prob",
    site: Literal["post", "pre"] = "post",
    layers: Sequence[int] | None = None,
    batch_size: int = 256,
    per_prompt: bool = False,
    method: Literal["auto", "resume", "full"] = "auto",
    hook_check: HookCheck | bool = True,
    progress: bool = True,
) -> Scores:
    """Integrated-gradients scores of every MLP neuron for each prompt's target (Dai et al.; DEPN).

    Args:
        prompts: ``KnowledgePrompt`` / ``(prompt, target)`` / ``FactPrompt`` / ``PrivateRecord``
            items, or prompt strings with ``targets`` (see ``knowledge_prompts``).
        steps, alpha_grid, prob, site, layers, batch_size, per_prompt, method: see
            ``KnowledgeNeuronsConfig``.
        hook_check: ``True`` runs ``checks.check_hooks`` first (refusing hooks that do not mean
            what their names say); a ``HookCheck`` reuses one; ``False`` skips it. The outcome
            is in the provenance (``extra["hook_check"]``).
        progress: show a progress bar over the rows.

    Returns:
        ``Scores`` on site ``"neuron"`` (``"neuron_pre"`` for ``site="pre"``) with axes
        ``("layer", "neuron")``: the mean over prompts of each prompt's score summed over its
        target tokens (module docstring: probability units, positive = the neuron raises the
        target); with ``per_prompt`` axes ``("prompt", "layer", "neuron")``. Unscored layers
        are NaN. The config records the exact ``alphas``.

    Raises:
        ValueError: an empty target, a target beyond the model's context, a masked-LM prompt
            without (enough) mask tokens, a layer out of range, bad settings.
        RuntimeError: the model is in training mode.
    """
    cfg = KnowledgeNeuronsConfig(
        steps=steps, alpha_grid=alpha_grid, prob=prob, site=site,
        layers=None if layers is None else tuple(layers), batch_size=batch_size,
        per_prompt=per_prompt, method=method,
    )
    require_eval_mode(model, what="knowledge_neurons", needs_grad=True)
    items = knowledge_prompts(model, prompts, targets)
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    scored = list(range(n_layers)) if cfg.layers is None else list(cfg.layers)
    bad = [layer for layer in scored if not 0 <= layer < n_layers]
    if bad or len(set(scored)) != len(scored):
        raise ValueError(f"layers must be distinct and in 0..{n_layers - 1}, got {scored}")
    scored = sorted(scored)
    masked = is_masked_lm(model)
    how = _method(model, cfg)
    rows = _masked_rows(model, items) if masked else _causal_rows(model, items)
    checked = hook_check_record(model, hook_check)
    names = [hook_name(_SITES[cfg.site], layer) for layer in scored]
    grid = alphas(cfg.steps, cfg.alpha_grid)

    per_item = torch.zeros(len(items), len(scored), d_mlp, dtype=torch.float64)
    total = len(rows) * len(scored) * cfg.steps
    with tqdm(total=total, desc="knowledge neurons", unit="row", disable=not progress) as bar:
        if how == "resume":
            # reference runs of at most _PROMPTS_PER_REFERENCE prompts at a time bound the memory
            chunks = [
                [r for r in rows if start <= r.prompt < start + _PROMPTS_PER_REFERENCE]
                for start in range(0, len(items), _PROMPTS_PER_REFERENCE)
            ]
            runs = [(chunk, _ig_resume(model, chunk, names, scored, grid, cfg, bar)) for chunk in chunks]
        else:
            by_length: dict[int, list[_Row]] = {}
            for r in rows:
                by_length.setdefault(len(r.tokens), []).append(r)  # equal lengths: no padding
            runs = [(group, _ig_full(model, group, names, grid, cfg, bar)) for group in by_length.values()]
    for group, values in runs:
        owners = torch.tensor([r.prompt for r in group])
        per_item.index_add_(0, owners, values.detach().to("cpu", torch.float64))

    full = torch.full((len(items), n_layers, d_mlp), float("nan"), dtype=torch.float64)
    full[:, scored] = per_item
    values = full.float() if cfg.per_prompt else full.mean(0).float()
    axes = ("prompt", "layer", "neuron") if cfg.per_prompt else ("layer", "neuron")
    config = {
        **asdict(cfg),
        "layers": scored,
        "method": how,
        "alphas": grid.tolist(),
        "score": "a_i * (1/m) * sum_k dP(target | alpha_k * a)/da_i at alpha_k * a; "
        "zero baseline; all neurons of the layer scaled together at the predicting position",
        "aggregate": "sum over each prompt's target tokens; " + ("per prompt" if cfg.per_prompt else "mean over prompts"),
        "masked_lm": masked,
        "n_prompts": len(items),
        "n_target_tokens": len(rows),
    }
    return Scores(
        values, axes, _SITES[cfg.site], "knowledge_neurons", config=config,
        provenance=Provenance.of(model, data=[f"{p.prompt}\t{p.target}" for p in items], hook_check=checked),
    )
