"""The PCGU update as one weight edit, with its two baselines in the same call.

Each step takes a batch of contrastive pairs, ranks every weight partition by cos(g+, g-)
(``mechedit.locate.pcgu``'s ranking: ``rank_partitions``; reselected every batch; the side
gradients come from the core, ``mechedit.pair_scores``) and takes a plain gradient step on the
advantaged side's score in the selected partitions only:

    θ_p ← θ_p − lr · g+_p        (p selected; every other entry keeps its exact bits)

which lowers the advantaged side's score there. No optimiser state exists that could leak into
unselected weights. After every ``eval_every`` steps the dev bias (``dev_metric``, by default the
pair preference of ``dev_pairs``) is measured; the checkpoint whose dev bias is **closest to
``target``** (0.5) is kept — not the lowest, which overshoots into the opposite bias.

Baselines, on the same pairs, batches and steps, at PCGU's learning rate unless
``baseline_lr`` gives theirs (an unrestricted step at PCGU's rate can break the model):

* ``"finetune"``: the same step on **every** parameter (unrestricted gradient descent on the
  advantaged side's score), same checkpoint rule.
* ``"task_vector"``: fine-tune **toward** the advantaged side (θ ← θ + lr · g+ on every
  parameter), take the task vector τ = θ_ft − θ_0 and negate it: θ_0 − λ τ, with λ from
  ``task_vector_scales`` chosen by the same dev rule.

Every run is one ``WeightEdit`` (HF names; revertible bit-exactly, savable, exportable) recorded
with ``WeightEdit.recording``; ``pcgu_update`` leaves the model as it found it (edits not applied).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from mechedit.checks import require_eval_mode
from mechedit.data_pairs import ContrastivePair
from mechedit.edit.weights import WeightEdit
from mechedit.hf import hf_parameters
from mechedit.locate.pcgu import (
    PCGUConfig,
    partition_specs,
    rank_partitions,
    resolve_k,
    selection_masks,
)
from mechedit.pair_scores import PairBatch, pair_gradients, tokenize_pair_sides

BASELINES = ("finetune", "task_vector")


@dataclass(frozen=True)
class PCGUUpdateConfig:
    """Settings of ``pcgu_update``.

    Attributes:
        ranking: the selection settings of each step (``k``, aggregation, side scoring; its
            ``batch_size`` is ignored here: a step's batch is ``batch_size`` below).
        lr: step size (parameter units per unit of score gradient). Paper: 1e-5 for BERT-base.
        baseline_lr: the baselines' step size (fine-tuning and the task vector's fine-tuning
            toward the advantaged side); ``None``: ``lr``.
        epochs: passes over the pairs (paper: 5).
        batch_size: pairs per step (paper: 16); the gradient is summed over them.
        eval_every: steps between dev measurements (each one a checkpoint candidate).
        target: the dev bias to aim at (0.5 = no preference).
        seed: the shuffling of pairs into batches.
        task_vector_scales: the λ grid of the task-vector baseline.
    """

    ranking: PCGUConfig = field(default_factory=PCGUConfig)
    lr: float = 1e-5
    baseline_lr: float | None = None
    epochs: int = 5
    batch_size: int = 16
    eval_every: int = 1
    target: float = 0.5
    seed: int = 0
    task_vector_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

    def __post_init__(self) -> None:
        if not isinstance(self.ranking, PCGUConfig):
            raise ValueError(f"ranking must be a PCGUConfig, got {type(self.ranking).__name__}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.baseline_lr is not None and not self.baseline_lr > 0:
            raise ValueError(f"baseline_lr must be > 0 (or None for lr), got {self.baseline_lr}")
        for name in ("epochs", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= self.target <= 1.0:
            raise ValueError(f"target must be a fraction in [0, 1], got {self.target}")
        scales = tuple(float(s) for s in self.task_vector_scales)
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"task_vector_scales must be positive numbers, got {self.task_vector_scales}")
        object.__setattr__(self, "task_vector_scales", scales)


@dataclass
class PCGURun:
    """One method's outcome.

    Attributes:
        method: ``"pcgu"``, ``"finetune"`` or ``"task_vector"``.
        edit: the chosen checkpoint as a ``WeightEdit`` (not applied).
        checkpoint: the step (or for the task vector, the λ) of the chosen checkpoint.
        dev_bias: the dev metric there.
        history: one dict per measurement (``step`` or ``scale``, ``dev_bias``).
        seconds: wall time of the run.
        steps: update steps taken.
    """

    method: str
    edit: WeightEdit
    checkpoint: float
    dev_bias: float
    history: list[dict[str, float]]
    seconds: float
    steps: int

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method, "checkpoint": self.checkpoint, "dev_bias": self.dev_bias,
            "steps": self.steps, "seconds": round(self.seconds, 2), "tensors": len(self.edit.names),
        }


@dataclass
class PCGUUpdate:
    """What ``pcgu_update`` returns: ``runs[method]`` per method; ``edit`` is PCGU's."""

    runs: dict[str, PCGURun]
    config: dict[str, Any]
    skipped: dict[str, int]

    @property
    def edit(self) -> WeightEdit:
        return self.runs["pcgu"].edit


def _batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        out.extend(order[i : i + batch_size] for i in range(0, n, batch_size))
    return out


def _train(
    model: Any,
    batch: PairBatch,
    cfg: PCGUUpdateConfig,
    dev_metric: Callable[[Any], float],
    *,
    method: str,
) -> PCGURun:
    """One gradient run (PCGU, unrestricted or toward the advantaged side), recorded as one edit."""
    start = time.perf_counter()
    specs = partition_specs(model, cfg.ranking.aggregation, cfg.ranking.params)
    names = [s.name for s in specs]
    live = hf_parameters(model)
    sign = 1.0 if method == "task_vector_ft" else -1.0  # ascent toward / descent away from g+
    lr = cfg.lr if method == "pcgu" or cfg.baseline_lr is None else cfg.baseline_lr
    r = cfg.ranking

    def gradients(chunk: PairBatch, side: str) -> dict[str, Tensor]:
        return pair_gradients(
            model, chunk, names, side,
            batch_size=cfg.batch_size, causal_reduction=r.causal_reduction, masked_score=r.masked_score,
        )

    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    touched: set[str] = set()
    step = 0
    meta = {**asdict(cfg), "method": method}
    with WeightEdit.recording(model, names, kind=f"pcgu_{method}", params_meta=meta) as rec:
        try:
            for rows in _batches(len(batch), cfg.batch_size, cfg.epochs, cfg.seed):
                chunk = batch.take(rows)
                g_adv = gradients(chunk, "advantaged")
                if method == "pcgu":
                    g_dis = gradients(chunk, "disadvantaged")
                    _, _, selected = rank_partitions(g_adv, g_dis, specs, r)
                    masks = selection_masks(specs, selected)
                else:
                    masks = {n: None for n in names}
                with torch.no_grad():
                    for name, mask in masks.items():
                        param, grad = live[name], g_adv[name]
                        if mask is None:
                            param.add_(grad, alpha=sign * lr)
                        else:
                            # where(): unselected entries keep their exact bits (x - 0 could flip -0.0)
                            mask = mask.to(param.device)
                            param.copy_(torch.where(mask, param + sign * lr * grad, param))
                        touched.add(name)
                step += 1
                if method != "task_vector_ft" and step % cfg.eval_every == 0:
                    bias = float(dev_metric(model))
                    history.append({"step": step, "dev_bias": bias})
                    distance = abs(bias - cfg.target)
                    if best is None or distance < best[0]:
                        best = (distance, step, {n: live[n].detach().clone() for n in touched})
            if best is not None:
                with torch.no_grad():
                    for name in touched:
                        live[name].copy_(best[2].get(name, rec.snapshot[name]))
        except BaseException:
            rec.restore()
            raise
    edit = rec.edit
    edit.revert(model)
    return PCGURun(
        method=method,
        edit=edit,
        checkpoint=float(best[1]) if best is not None else float(step),
        dev_bias=history[[h["step"] for h in history].index(best[1])]["dev_bias"] if best else float("nan"),
        history=history,
        seconds=time.perf_counter() - start,
        steps=step,
    )


def _task_vector(model: Any, batch: PairBatch, cfg: PCGUUpdateConfig, dev_metric: Callable[[Any], float]) -> PCGURun:
    start = time.perf_counter()
    toward = _train(model, batch, cfg, dev_metric, method="task_vector_ft")
    live = hf_parameters(model, tied_aliases=True)
    theta0 = {n: live[n].detach().clone() for n in toward.edit.names}
    tau = {n: toward.edit.new_tensors[n].to(theta0[n].device) - theta0[n] for n in toward.edit.names}
    history, best = [], None
    for scale in cfg.task_vector_scales:
        new = {n: theta0[n] - scale * tau[n] for n in tau}
        edit = WeightEdit.from_new_tensors(model, new, kind="pcgu_task_vector", params={"scale": scale})
        with edit.applied(model):
            bias = float(dev_metric(model))
        history.append({"scale": scale, "dev_bias": bias})
        if best is None or abs(bias - cfg.target) < best[0]:
            best = (abs(bias - cfg.target), scale, edit, bias)
    return PCGURun(
        method="task_vector", edit=best[2], checkpoint=best[1], dev_bias=best[3],
        history=history, seconds=time.perf_counter() - start, steps=toward.steps,
    )


def pcgu_update(
    model: Any,
    pairs: Sequence[ContrastivePair],
    dev_pairs: Sequence[ContrastivePair] | None = None,
    *,
    config: PCGUUpdateConfig | None = None,
    dev_metric: Callable[[Any], float] | None = None,
    baselines: Sequence[str] = (),
) -> PCGUUpdate:
    """Unlearn the bias of ``pairs`` with PCGU (and optionally the baselines); return the edits.

    ``dev_pairs`` (or a custom ``dev_metric(model) -> fraction``) picks the checkpoint closest to
    ``config.target``; by default the dev metric is ``evaluate.bias.pair_preference`` of
    ``dev_pairs`` with the ranking's side scoring. ``baselines``: any of ``"finetune"``,
    ``"task_vector"``. The model is left unchanged; apply ``result.edit`` (or
    ``result.runs[name].edit``) to use an outcome.

    Raises:
        ValueError: no usable pair, no dev set, ``k`` out of range, an unknown baseline.
    """
    from mechedit.evaluate.bias import pair_preference

    cfg = config or PCGUUpdateConfig()
    require_eval_mode(model, what="pcgu_update", needs_grad=True)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown or isinstance(baselines, str):
        raise ValueError(f"baselines must be a list of {BASELINES}, got {baselines!r}")
    if dev_metric is None:
        if not dev_pairs:
            raise ValueError("give dev_pairs (or dev_metric) to choose the checkpoint by its dev bias")
        r = cfg.ranking

        def dev_metric(m: Any) -> float:
            return pair_preference(
                m, dev_pairs, mode=r.mode, causal_reduction=r.causal_reduction, masked_score=r.masked_score
            ).rate

    batch = tokenize_pair_sides(model, pairs, cfg.ranking.mode)
    specs = partition_specs(model, cfg.ranking.aggregation, cfg.ranking.params)
    resolve_k(cfg.ranking.k, sum(s.n_units for s in specs))
    runs = {"pcgu": _train(model, batch, cfg, dev_metric, method="pcgu")}
    if "finetune" in baselines:
        runs["finetune"] = _train(model, batch, cfg, dev_metric, method="finetune")
    if "task_vector" in baselines:
        runs["task_vector"] = _task_vector(model, batch, cfg, dev_metric)
    return PCGUUpdate(runs, {**asdict(cfg), "mode": batch.mode, "n_pairs": len(batch)}, dict(batch.skipped))


__all__ = ["BASELINES", "PCGURun", "PCGUUpdate", "PCGUUpdateConfig", "pcgu_update"]
