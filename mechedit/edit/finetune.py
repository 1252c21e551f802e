"""Fine-tuning restricted to a circuit, as one revertible weight edit.

``finetune(model, circuit, forget=..., edit=..., retain=..., general_text=..., config=...)``
minimises ``sum_k weight_k * loss_k`` over the objectives of ``config``
(``mechedit.edit.objectives``) by AdamW, changing **only the parameter entries the circuit covers**
(``mechedit.hf.circuit_parameters``: whole MLP / attention blocks, heads' q/k/v/o slices, neurons'
rows and columns, weight partitions). How the rest is kept exactly as it was:

* The optimiser never sees a frozen entry. Each covered tensor is packed into a 1-D leaf holding
  only its covered entries (``param[mask]``); AdamW's moments and its weight decay live on those
  leaves, and after every step the leaves are scattered back (``masked_scatter_``). Uncovered
  entries are never written, so they keep their bits (weight decay cannot make them drift), and
  optimiser memory is proportional to the covered entries (``bench/bench_finetune.py``).
* Gradients are taken with ``torch.autograd.grad`` for the covered tensors' autograd leaves only
  (``requires_grad`` is switched off everywhere else for the run and restored after); the
  bridge's GPT-2 q/k/v views are separate leaves over ``c_attn``'s memory, so their gradients are
  added back into ``c_attn``'s (``mechedit.gradients.gradient_leaves`` / ``assemble_gradient``).

Each step runs one forward per kind of data the objectives read (forget, edit, retain, general
text, the random-mismatch answers), sums the weighted losses, clips the gradient of the covered
entries to ``clip_norm`` (global L2 norm), steps AdamW and then the learning-rate schedule (linear
warm-up, then cosine from ``lr`` to ``lr * min_lr_ratio``). The original model's outputs that NPO
and the KL term compare with are computed once, before the first step, on the fixed data: no
second copy of the model is held. Every ``eval_every`` steps the exact-match accuracy of the
forget set (every answer token the greedy one, teacher-forced) and of the edit set (new answers)
is measured; training stops early once ``forget_target`` / ``edit_target`` are met.

The result is a ``WeightEdit`` (kind ``"finetune"``; bit-exact revert, save/load, HF export)
recorded with ``WeightEdit.recording``; its ``params`` hold the config, the circuit, the data
sizes and hashes, the loss curve (every step's weighted total, each objective's unweighted loss,
the learning rate and the gradient norm before clipping) and the accuracy checks. The model is
left as it was given: apply the edit to use it. Seeded and deterministic on the CPU (the random
mismatch answers and the row order come from ``config.seed``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mechedit.artifacts import check_model
from mechedit.checks import require_eval_mode
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.edit.objectives import LossInputs, Objective, RandomMismatch, objectives_from
from mechedit.edit.weights import WeightEdit
from mechedit.gradients import assemble_gradient, gradient_leaves
from mechedit.hf import circuit_parameters, hf_parameters
from mechedit.metrics import continuation_logprobs
from mechedit.models import is_masked_lm
from mechedit.prompts import FactPrompt
from mechedit.provenance import text_hash
from mechedit.tokens import tokenize_continuations, tokenize_prompts

#: ``circuit="all"``: every parameter (unrestricted fine-tuning, the baseline)
ALL = "all"

Pair = tuple[str, str]


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of ``finetune``.

    Attributes:
        objectives: what to minimise: ``{"npo": 1.0, "retain_kl": 0.5}`` (default parameters)
            or objective instances (``(NPO(beta=0.2), RetainCE(weight=2.0))``); validated by
            ``mechedit.edit.objectives.objectives_from`` (names, finite weights >= 0).
        lr: AdamW's peak learning rate (parameter units per normalised step).
        steps: maximum optimiser steps.
        batch_size: rows of each data set per step (``None``: the whole set every step); sets
            are walked through in seeded random order, epoch after epoch.
        weight_decay: AdamW's decoupled weight decay, applied to covered entries only.
        betas, eps: AdamW's moment decays and denominator constant.
        warmup_steps: steps of linear warm-up from 0 to ``lr``.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio`` at step ``steps``.
        clip_norm: clip the covered entries' gradient to this global L2 norm (``None``: off).
        forget_target: stop once the forget set's exact-match accuracy (true answers) is <= this
            fraction (``None``: no such stop).
        edit_target: stop once the edit set's exact-match accuracy (new answers) is >= this
            fraction (``None``: no such stop). With both targets, both must hold.
        eval_every: steps between accuracy checks (when a target is set).
        seed: row order and random-mismatch answers.
    """

    objectives: tuple[Objective, ...] | Mapping[str, float]
    lr: float = 1e-3
    steps: int = 100
    batch_size: int | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    clip_norm: float | None = 1.0
    forget_target: float | None = None
    edit_target: float | None = None
    eval_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", objectives_from(self.objectives))
        _number(self.lr, "lr", low=0.0, strict=True)
        _number(self.weight_decay, "weight_decay", low=0.0)
        _number(self.eps, "eps", low=0.0, strict=True)
        _number(self.min_lr_ratio, "min_lr_ratio", low=0.0, high=1.0)
        for name in ("steps", "eval_every"):
            _integer(getattr(self, name), name, low=1)
        _integer(self.warmup_steps, "warmup_steps", low=0)
        if self.batch_size is not None:
            _integer(self.batch_size, "batch_size", low=1)
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        betas = tuple(self.betas)
        if len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for b in betas:
            _number(b, "betas", low=0.0, high=1.0, strict_high=True)
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if self.clip_norm is not None:
            _number(self.clip_norm, "clip_norm", low=0.0, strict=True)
        for name in ("forget_target", "edit_target"):
            if getattr(self, name) is not None:
                _number(getattr(self, name), name, low=0.0, high=1.0)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON (objectives as ``{"name", "weight", <parameters>}``)."""
        out: dict[str, Any] = {}
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            out[key] = [o.to_dict() for o in value] if key == "objectives" else (
                list(value) if isinstance(value, tuple) else value
            )
        return out


def _number(value: Any, name: str, *, low: float, high: float = math.inf, strict: bool = False,
            strict_high: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (value < high if strict_high else value <= high)
    if not ok:
        lo = f"> {low}" if strict else f">= {low}"
        hi = "" if high == math.inf else (f" and < {high}" if strict_high else f" and <= {high}")
        raise ValueError(f"{name} must be a finite number {lo}{hi}, got {value!r}")


def _integer(value: Any, name: str, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


# --- data ---------------------------------------------------------------------------------------


def _pairs(items: Sequence[FactPrompt | Pair], what: str, *, new: bool = False) -> list[Pair]:
    """``(prompt, answer)`` rows from fact prompts (their ``target``, or ``target_new``) or pairs."""
    if isinstance(items, str | FactPrompt):
        raise ValueError(f"{what} must be a list of FactPrompt or (prompt, answer) pairs, got one item")
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, FactPrompt):
            answer = item.target_new if new else item.target
            if answer is None:
                raise ValueError(
                    f"{what}[{i}] ({item.prompt!r}) has no target_new: an edit needs the new "
                    "answer (FactPrompt(..., target_new=...)) or a (prompt, new_answer) pair"
                )
            rows.append((item.prompt, answer))
        elif isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(s, str) for s in item):
            rows.append((item[0], item[1]))
        else:
            raise ValueError(f"{what}[{i}] must be a FactPrompt or a (prompt, answer) pair of strings, got {item!r:.80}")
    return rows


@dataclass
class _Answers:
    """One tokenised set of ``(prompt, answer)`` rows, all on the model's device."""

    rows: list[Pair]
    tokens: Tensor
    starts: Tensor
    lengths: Tensor

    @classmethod
    def of(cls, model: Any, rows: Sequence[Pair]) -> _Answers:
        batch = tokenize_continuations(model, [p for p, _ in rows], [a for _, a in rows])
        return cls(list(rows), batch.tokens, batch.continuation_starts, batch.continuation_lengths)

    def take(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # drop columns past the chosen rows' longest row: shorter forwards for minibatches
        width = int((self.starts[index] + self.lengths[index]).max())
        return self.tokens[index, :width], self.starts[index], self.lengths[index]


def _logits(model: Any, tokens: Tensor) -> Tensor:
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def _answer_logprobs(model: Any, tokens: Tensor, starts: Tensor, lengths: Tensor):
    return continuation_logprobs(_logits(model, tokens), tokens, starts, lengths)


@torch.no_grad()
def exact_match(model: Any, rows: Sequence[Pair], *, batch_size: int = 256) -> float:
    """Fraction of ``(prompt, answer)`` rows whose every answer token is the model's greedy next
    token given the prompt and the answer's earlier tokens (teacher-forced exact match)."""
    hits = 0
    for start in range(0, len(rows), batch_size):
        chunk = _Answers.of(model, rows[start : start + batch_size])
        logits = _logits(model, chunk.tokens)
        width = int(chunk.lengths.max())
        offsets = torch.arange(width, device=logits.device)
        mask = offsets < chunk.lengths[:, None]
        where = (chunk.starts[:, None] + offsets).clamp(max=chunk.tokens.shape[1] - 1)
        rows_idx = torch.arange(len(chunk.rows), device=logits.device)[:, None]
        greedy = logits[rows_idx, where - 1].argmax(-1)
        right = (greedy == chunk.tokens.gather(1, where)) | ~mask
        hits += int(right.all(-1).sum())
    return hits / len(rows)


class _Order:
    """Seeded row order of one set: consecutive batches, reshuffled every epoch."""

    def __init__(self, n: int, batch_size: int | None, generator: torch.Generator) -> None:
        self.n, self.size, self.gen = n, batch_size, generator
        self.order: list[int] = []

    def next(self) -> Tensor:
        if self.size is None or self.size >= self.n:
            return torch.arange(self.n)
        if len(self.order) < self.size:
            self.order += torch.randperm(self.n, generator=self.gen).tolist()
        chosen, self.order = self.order[: self.size], self.order[self.size :]
        return torch.tensor(chosen)


# --- which entries train ------------------------------------------------------------------------


def covered_masks(model: Any, circuit: Circuit | Iterable[Component] | str) -> dict[str, Tensor]:
    """HF name -> boolean mask of the entries ``finetune`` trains for ``circuit``.

    ``circuit`` is a ``Circuit`` (its provenance must be this model's weights: a circuit found on
    another model raises ``ModelMismatchError``; a hand-made circuit without provenance is not
    checked), a list of components, or ``"all"`` (every parameter: unrestricted fine-tuning).

    Raises:
        ValueError: an empty circuit, one that covers no parameter (residual or hook-output
            sites only), or components out of range.
    """
    if isinstance(circuit, str):
        if circuit != ALL:
            raise ValueError(f"circuit must be a Circuit, a list of components or {ALL!r}, got {circuit!r}")
        return {n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in hf_parameters(model).items()}
    if isinstance(circuit, Circuit):
        if circuit.provenance is not None:
            check_model(circuit.provenance, model, strict=True, what="this circuit")
        components = list(circuit)
    else:
        components = list(circuit)
    if not components:
        raise ValueError("the circuit is empty: there is nothing to train; select components first")
    masks = circuit_parameters(model, components)
    if not masks:
        raise ValueError("the circuit covers no parameter (e.g. residual-stream sites only); use attn / mlp / head / neuron / partition components")
    return masks


# --- the training loop --------------------------------------------------------------------------


@dataclass
class _Run:
    """What one training run did: the loss curve, accuracy checks, steps and time."""

    curve: list[dict[str, float]] = field(default_factory=list)
    checks: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "stopped_early": self.stopped_early, "seconds": round(self.seconds, 3),
                "curve": self.curve, "checks": self.checks}


def _schedule(cfg: FinetuneConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


class _OnlyTheseRequireGrad:
    """Within the block only ``leaves`` require grad (no gradient is built for frozen weights)."""

    def __init__(self, model: Any, leaves: Sequence[Tensor]) -> None:
        every: dict[int, Tensor] = {}
        for root in (model, getattr(model, "original_model", None)):
            if isinstance(root, torch.nn.Module):
                for p in root.parameters():
                    every.setdefault(id(p), p)
        self.every = list(every.values())
        self.leaves = {id(p) for p in leaves}

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.every]
        for p in self.every:
            p.requires_grad_(id(p) in self.leaves)

    def __exit__(self, *exc: object) -> None:
        for p, flag in zip(self.every, self.flags, strict=True):
            p.requires_grad_(flag)


def _train(
    model: Any,
    masks: Mapping[str, Tensor],
    data: Mapping[str, list[Pair]],
    general_text: Sequence[str],
    cfg: FinetuneConfig,
    *,
    progress: bool,
    desc: str,
) -> _Run:
    """Train the masked entries of ``model`` in place by ``cfg``; return the run's record."""
    from mechedit.progress import tqdm

    start_time = time.perf_counter()
    live = hf_parameters(model)
    names = list(masks)
    params = [live[n] for n in names]
    # Packed leaves: exactly the covered entries; what AdamW holds state for and steps.
    full = [bool(masks[n].all()) for n in names]
    # a fully covered tensor is packed as a flat view (no boolean gather of every entry)
    packed = [
        (p.detach().reshape(-1) if whole else p.detach()[masks[n]]).clone()
        for n, p, whole in zip(names, params, full, strict=True)
    ]
    optimiser = torch.optim.AdamW(packed, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(cfg))
    groups = gradient_leaves(model, params)
    leaves = list({id(p): p for g in groups for p in g}.values())

    generator = torch.Generator().manual_seed(cfg.seed)
    sets = {kind: _Answers.of(model, rows) for kind, rows in data.items() if rows and kind != "mismatch"}
    orders = {kind: _Order(len(s.rows), cfg.batch_size, generator) for kind, s in sets.items()}
    text = tokenize_prompts(model, list(general_text)) if general_text else None
    if text is not None:
        orders["general"] = _Order(len(general_text), cfg.batch_size, generator)
    mismatch = next((o for o in cfg.objectives if isinstance(o, RandomMismatch)), None)
    pool = _mismatch_pool(mismatch, data) if mismatch is not None else []

    # The frozen original's outputs, once, on the fixed data (no second model in memory).
    reference_total = None
    reference_text = None
    with torch.no_grad():
        if any(o.needs_reference and o.reads == "forget" for o in cfg.objectives):
            s = sets["forget"]
            reference_total = _answer_logprobs(model, s.tokens, s.starts, s.lengths).total
        if text is not None and any(o.needs_reference and o.reads == "general" for o in cfg.objectives):
            reference_text = _logits(model, text.tokens).float().log_softmax(-1)

    run = _Run()
    bar = tqdm(total=cfg.steps, desc=desc, disable=not progress, leave=False)
    try:
        with _OnlyTheseRequireGrad(model, leaves), torch.enable_grad():
            for step in range(cfg.steps):
                inputs: dict[str, LossInputs] = {}
                for kind in ("forget", "edit", "retain"):
                    if kind in sets:
                        index = orders[kind].next().to(sets[kind].tokens.device)
                        tokens, starts, lengths = sets[kind].take(index)
                        ref = None if reference_total is None or kind != "forget" else reference_total[index]
                        inputs[kind] = LossInputs(
                            answers=_answer_logprobs(model, tokens, starts, lengths), reference_total=ref
                        )
                if text is not None:
                    index = orders["general"].next().to(text.tokens.device)
                    mask = text.attention_mask[index]
                    scored = mask.clone()
                    scored[:, -1] = False
                    scored[:, :-1] &= mask[:, 1:]  # a position counts when its next token is real
                    inputs["general"] = LossInputs(
                        logits=_logits(model, text.tokens[index])[:, :-1],
                        reference_logprobs=None if reference_text is None else reference_text[index][:, :-1],
                        mask=scored[:, :-1],
                    )
                if mismatch is not None:
                    index = orders["forget"].next()
                    rows = [sets["forget"].rows[i] for i in index.tolist()]
                    picked = _draw(rows, pool, generator)
                    s = _Answers.of(model, picked)
                    inputs["mismatch"] = LossInputs(answers=_answer_logprobs(model, s.tokens, s.starts, s.lengths))

                losses = {o.name: o.loss(inputs[o.reads]) for o in cfg.objectives}
                total = sum(o.weight * losses[o.name] for o in cfg.objectives)
                if not torch.isfinite(total):
                    raise FloatingPointError(
                        f"the loss became {total.item()} at step {step} ({ {k: v.item() for k, v in losses.items()} }); "
                        "lower lr, add a retain term, or use a bounded forget objective (npo, simnpo, log_one_minus_p)"
                    )
                grads = torch.autograd.grad(total, leaves, allow_unused=True)
                by_leaf = {id(p): g for p, g in zip(leaves, grads, strict=True)}
                for p, group, mask, leaf, whole in zip(params, groups, (masks[n] for n in names), packed, full,
                                                       strict=True):
                    g = assemble_gradient(p, group, [by_leaf[id(x)] for x in group])
                    leaf.grad = torch.zeros_like(leaf) if g is None else (g.reshape(-1) if whole else g[mask])
                norm = torch.nn.utils.clip_grad_norm_(packed, cfg.clip_norm if cfg.clip_norm is not None else math.inf)
                lr = optimiser.param_groups[0]["lr"]
                optimiser.step()
                scheduler.step()
                with torch.no_grad():
                    for p, mask, leaf, whole in zip(params, (masks[n] for n in names), packed, full, strict=True):
                        if whole:
                            p.copy_(leaf.view(p.shape))
                        else:
                            p.masked_scatter_(mask, leaf)
                run.steps = step + 1
                row = {"step": step + 1, "loss": total.item(), "lr": lr, "grad_norm": norm.item(),
                       **{k: v.item() for k, v in losses.items()}}
                run.curve.append(row)
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k not in ("step", "lr")}, refresh=False)
                bar.update(1)
                if _targets_set(cfg, data) and (run.steps % cfg.eval_every == 0 or run.steps == cfg.steps):
                    check, met = _check_targets(model, cfg, data)
                    run.checks.append({"step": run.steps, **check})
                    if met:
                        run.stopped_early = run.steps < cfg.steps
                        break
    finally:
        bar.close()
    run.seconds = time.perf_counter() - start_time
    return run


def _targets_set(cfg: FinetuneConfig, data: Mapping[str, list[Pair]]) -> bool:
    return (cfg.forget_target is not None and bool(data.get("forget"))) or (
        cfg.edit_target is not None and bool(data.get("edit"))
    )


def _check_targets(model: Any, cfg: FinetuneConfig, data: Mapping[str, list[Pair]]) -> tuple[dict[str, float], bool]:
    check: dict[str, float] = {}
    met = True
    if cfg.forget_target is not None and data.get("forget"):
        check["forget_accuracy"] = exact_match(model, data["forget"])
        met &= check["forget_accuracy"] <= cfg.forget_target
    if cfg.edit_target is not None and data.get("edit"):
        check["edit_accuracy"] = exact_match(model, data["edit"])
        met &= check["edit_accuracy"] >= cfg.edit_target
    return check, met


def _mismatch_pool(objective: RandomMismatch, data: Mapping[str, list[Pair]]) -> list[str]:
    pool = list(objective.answers) or list(
        dict.fromkeys(a for kind in ("forget", "retain", "edit") for _, a in data.get(kind, []))
    )
    if len(set(pool)) < 2:
        raise ValueError(
            "random_mismatch needs at least two distinct answers to draw from; give "
            "RandomMismatch(answers=[...]) or forget/retain sets with several answers"
        )
    return pool


def _draw(rows: Sequence[Pair], pool: Sequence[str], generator: torch.Generator) -> list[Pair]:
    """Each row's prompt with a random pool answer other than its own (seeded)."""
    out = []
    picks = torch.randint(0, len(pool) - 1, (len(rows),), generator=generator).tolist()
    for (prompt, answer), k in zip(rows, picks, strict=True):
        others = [a for a in pool if a.strip() != answer.strip()]
        out.append((prompt, others[k % len(others)]))
    return out


# --- the public call ----------------------------------------------------------------------------


def _check_inputs(
    model: Any, cfg: FinetuneConfig, data: Mapping[str, list[Pair]], general_text: Sequence[str]
) -> None:
    require_eval_mode(model, what="finetune", needs_grad=True)
    if is_masked_lm(model):
        raise ValueError("finetune trains causal language models (teacher-forced answers); this is a masked LM")
    given = {k for k, rows in data.items() if rows} | ({"general"} if general_text else set())
    read = {("forget" if o.reads == "mismatch" else o.reads) for o in cfg.objectives}
    missing = sorted(read - given)
    if missing:
        names = sorted(o.name for o in cfg.objectives if ("forget" if o.reads == "mismatch" else o.reads) in missing)
        arg = {"general": "general_text"}
        raise ValueError(
            f"objectives {names} read {[arg.get(m, m) for m in missing]}, which were not given (or are empty)"
        )
    unused = sorted(given - read)
    if unused:
        raise ValueError(
            f"{unused} were given but no objective reads them; add one (forget: npo, simnpo, "
            "grad_ascent, log_one_minus_p; edit: edit_ce; retain: retain_ce; general_text: retain_kl) "
            "or leave the argument out"
        )
    keep = {p.strip(): a for p, a in data.get("retain", [])}
    for kind in ("forget", "edit"):
        clash = [p for p, _ in data.get(kind, []) if p.strip() in keep]
        if clash:
            raise ValueError(
                f"{len(clash)} {kind} prompts are also in the retain set (e.g. {clash[0]!r}): a prompt "
                f"cannot be {'forgotten' if kind == 'forget' else 'edited'} and kept; remove them from one side"
            )
    if isinstance(general_text, str):
        raise ValueError("general_text must be a list of texts, not one string")


def finetune(
    model: Any,
    circuit: Circuit | Iterable[Component] | str,
    *,
    forget: Sequence[FactPrompt | Pair] = (),
    edit: Sequence[FactPrompt | Pair] = (),
    retain: Sequence[FactPrompt | Pair] = (),
    general_text: Sequence[str] = (),
    config: FinetuneConfig,
    progress: bool = True,
) -> WeightEdit:
    """Fine-tune only ``circuit``'s parameters of ``model`` by ``config``; return the weight edit.

    Args:
        model: a causal LM bridge (``mechedit.load``) in eval mode.
        circuit: a ``Circuit`` computed on this model, components, or ``"all"`` (see
            ``covered_masks``).
        forget: facts to forget, scored on their ``target`` (or ``(prompt, answer)`` pairs).
        edit: facts to change, scored on their ``target_new`` (or ``(prompt, new_answer)``).
        retain: facts to keep (``target``); a prompt may not be both here and in forget/edit.
        general_text: texts whose next-token distributions ``retain_kl`` keeps.
        config: objectives and optimiser settings (``FinetuneConfig``).
        progress: show a tqdm bar with the live losses.

    Returns:
        A ``WeightEdit`` of kind ``"finetune"``, not applied (the model is left as it was), whose
        ``params`` hold ``config``, ``circuit``, ``data`` (sizes and text hashes), ``trained``
        (covered entries per tensor) and ``run`` (``steps``, ``stopped_early``, ``seconds``,
        ``curve``: one row per step, ``checks``: the target measurements).

    Raises:
        ValueError: no data for an objective, data no objective reads, a forget/edit prompt
            also in the retain set, an edit row without a new answer, an empty circuit or one
            without parameters, a masked LM.
        ModelMismatchError: a ``Circuit`` whose provenance is another model's weights.
        RuntimeError: the model in training mode.
        FloatingPointError: the loss became NaN or infinite (the model is restored).
    """
    if not isinstance(config, FinetuneConfig):
        raise ValueError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    data = {"forget": _pairs(forget, "forget"), "edit": _pairs(edit, "edit", new=True), "retain": _pairs(retain, "retain")}
    _check_inputs(model, config, data, general_text)
    masks = covered_masks(model, circuit)
    meta: dict[str, Any] = {
        "config": config.to_dict(),
        "circuit": _circuit_json(circuit),
        "data": _data_json(data, general_text),
        "trained": {n: int(m.sum()) for n, m in masks.items()},
    }
    with WeightEdit.recording(model, list(masks), kind="finetune", params_meta=meta) as rec:
        try:
            run = _train(model, masks, data, general_text, config, progress=progress, desc="finetune")
        except BaseException:
            rec.restore()
            raise
        meta["run"] = run.to_dict()  # read by the recording when the block ends
    edit_ = rec.edit
    edit_.revert(model)
    return edit_


def _circuit_json(circuit: Circuit | Iterable[Component] | str) -> Any:
    if isinstance(circuit, str):
        return circuit
    if not isinstance(circuit, Circuit):
        circuit = Circuit(tuple(circuit))
    return circuit.to_dict()


def _data_json(data: Mapping[str, list[Pair]], general_text: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, rows in data.items():
        if rows:
            out[kind] = {"n": len(rows), "hash": text_hash([f"{p}\t{a}" for p, a in rows])}
    if general_text:
        out["general_text"] = {"n": len(general_text), "hash": text_hash(list(general_text))}
    return out


__all__ = ["ALL", "FinetuneConfig", "covered_masks", "exact_match", "finetune"]
