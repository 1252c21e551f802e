"""What zeroing neurons does, next to what the attribution predicted: the edit-effect tables.

Three measurements behind the demo's edit-effect figures (``mechedit.viz.effects``):

* ``top_predictions`` - the model's ``n`` most likely next tokens after each prompt, before and
  with an edit applied (what the edited model says instead of the forgotten answer).
* ``predicted_vs_observed`` - for a neuron ``Scores`` from ``neuron_attribution`` (the predicted
  drop in the fact's log-probability when the neuron is zeroed, minus ``retain_weight`` times the
  same on the facts to keep, nats), the *observed* value of that difference when the neuron alone
  is zeroed at every position, for the selected top-k and a seeded random sample of other neurons;
  and for all selected neurons zeroed together, next to the sum of their predictions (the
  attribution is a first-order, additive estimate; the joint effect of zeroing many is not).
* ``k_sweep`` - the target's probability and top-1 accuracy on the forget set and on neighbours
  with the top-k neurons zeroed, for several k, against k random neurons (several seeds): how much
  of the edit is *which* neurons rather than *how many*.

All of them run one batched forward pass per chunk of (neuron set, prompt) rows: row ``r`` of a
chunk carries its own set of zeroed neurons, applied by one multiplicative hook per MLP layer
(``blocks.{l}.mlp.hook_post``, every position, as ``ablate(model, circuit)`` and
``zero_neurons`` do), so no Python loop over neurons runs a forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mechedit.checks import require_eval_mode
from mechedit.components import hook_name
from mechedit.edit.protocol import applied_edit
from mechedit.interventions import real_tokens
from mechedit.metrics import target_logprob, top1_correct
from mechedit.models import model_device
from mechedit.prompts import FactPrompt
from mechedit.scores import Scores
from mechedit.tokens import get_tokenizer, tokenize_facts, tokenize_prompts

__all__ = ["DEFAULT_KS", "k_sweep", "predicted_vs_observed", "top_predictions", "zeroed_scores"]

#: the k of the demo's sweep (x axis of ``mechedit.viz.k_sweep_lines``)
DEFAULT_KS = (1, 2, 4, 8, 16, 24, 32)


# --------------------------------------------------------------------------------------------
# Top predictions
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _top_next_tokens(model: Any, texts: list[str], n: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """``(ids [len(texts), n], probs [len(texts), n])``: the ``n`` likeliest next tokens, best first."""
    device = model_device(model)
    ids, probs = [], []
    for lo in range(0, len(texts), batch_size):
        batch = tokenize_prompts(model, texts[lo : lo + batch_size])
        with real_tokens(batch):  # an activation edit at pos=-1 acts on each row's own last token
            logits = model(batch.tokens.to(device))
        last = logits[torch.arange(len(batch.tokens), device=logits.device), batch.last_positions.to(logits.device)]
        top = last.float().softmax(-1).topk(n, dim=-1)
        ids.append(top.indices.cpu())
        probs.append(top.values.cpu())
    return torch.cat(ids), torch.cat(probs)


def top_predictions(
    model: Any,
    prompts: Sequence[FactPrompt | str],
    *,
    n: int = 5,
    edit: Any = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """The ``n`` likeliest next tokens after each prompt, before and (given ``edit``) with the edit.

    Args:
        prompts: ``FactPrompt``s (their ``target`` is recorded) or plain strings.
        n: tokens per prompt (1 <= n <= vocabulary size).
        edit: an ``Edit`` (e.g. ``ablate(model, circuit)``) or a callable returning a context
            manager, applied for the second pass and reverted after (as in ``evaluate_fact_edit``).
        batch_size: prompts per forward pass.

    Returns:
        One row per (prompt, rank): ``prompt``, ``target`` (``""`` for strings), ``rank`` (1 =
        likeliest), ``token_before``, ``p_before`` (probability over the whole vocabulary, in
        [0, 1]) and, with an edit, ``token_after``, ``p_after``. Tokens are decoded text (a
        leading space kept as the tokenizer has it).

    Raises:
        ValueError: no prompts, or ``n`` out of range.
    """
    items = [prompts] if isinstance(prompts, (str, FactPrompt)) else list(prompts)
    if not items:
        raise ValueError("no prompts: pass FactPrompts or strings whose next token to show")
    vocab = int(model.cfg.d_vocab)
    if not isinstance(n, int) or not 1 <= n <= vocab:
        raise ValueError(f"n must be an int in 1..{vocab} (the vocabulary size), got {n!r}")
    require_eval_mode(model, what="top_predictions")
    texts = [p.prompt if isinstance(p, FactPrompt) else p for p in items]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ValueError(f"prompt {i} must be a non-empty string or a FactPrompt, got {text!r}")
    tok = get_tokenizer(model)
    stages = [("before", contextlib.nullcontext())]
    if edit is not None:
        stages.append(("after", applied_edit(model, edit)))
    frame = pd.DataFrame({
        "prompt": [t for t in texts for _ in range(n)],
        "target": [(p.target if isinstance(p, FactPrompt) else "") for p in items for _ in range(n)],
        "rank": list(range(1, n + 1)) * len(texts),
    })
    for stage, context in stages:
        with context:
            ids, probs = _top_next_tokens(model, texts, n, batch_size)
        frame[f"token_{stage}"] = [tok.decode([i]) for i in ids.flatten().tolist()]
        frame[f"p_{stage}"] = probs.flatten().tolist()
    return frame


# --------------------------------------------------------------------------------------------
# Zeroing neuron sets, one set per batch row
# --------------------------------------------------------------------------------------------


def _keep_hook(keep: Tensor) -> Callable[..., Tensor]:
    """A hook multiplying ``[batch, pos, d_mlp]`` by ``keep[batch, d_mlp]`` (0 zeroes, 1 keeps)."""

    def fn(activation: Tensor, hook: Any = None) -> Tensor:
        return activation * keep[:, None, :].to(activation)

    return fn


@torch.no_grad()
def zeroed_scores(
    model: Any, facts: Sequence[FactPrompt], zeroed: Tensor, *, batch_size: int = 512
) -> tuple[Tensor, Tensor]:
    """Target log-prob and top-1 correctness of every fact with each neuron set zeroed.

    Args:
        facts: single-token-target prompts (``P`` of them).
        zeroed: ``Bool[S, n_layers, d_mlp]``, set ``s``'s neurons to zero (at every position);
            an all-False set is the unedited model.
        batch_size: (set, prompt) rows per forward pass.

    Returns:
        ``(logprob Float[S, P] in nats (<= 0), correct Bool[S, P])`` on the CPU.
    """
    if not facts:
        raise ValueError("no prompts to score")
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    if zeroed.dtype != torch.bool or zeroed.ndim != 3 or tuple(zeroed.shape[1:]) != (n_layers, d_mlp):
        raise ValueError(f"zeroed must be Bool[sets, {n_layers}, {d_mlp}] (sets x layer x neuron), got {zeroed.dtype} {tuple(zeroed.shape)}")
    require_eval_mode(model, what="zeroed_scores")
    device = model_device(model)
    batch = tokenize_facts(model, list(facts))
    tokens, targets, last = batch.tokens.to(device), batch.target_ids.to(device), batch.last_positions.to(device)
    keep = (~zeroed).to(device=device, dtype=torch.float32)
    layers = zeroed.any(dim=2).any(dim=0).nonzero().flatten().tolist()  # hook only layers some set edits
    n_sets, n_prompts = zeroed.shape[0], len(facts)
    # rows prompt by prompt, shortest prompts first, so each chunk is cut to its own longest
    # prompt (right padding: the cut columns are pads no real token attends to)
    by_length = last.argsort(stable=True)
    logprob = torch.empty(n_sets, n_prompts)
    correct = torch.empty(n_sets, n_prompts, dtype=torch.bool)
    for lo in range(0, n_sets * n_prompts, batch_size):
        rows = torch.arange(lo, min(lo + batch_size, n_sets * n_prompts), device=device)
        which, prompt = rows % n_sets, by_length[rows // n_sets]
        width = int(last[prompt].max()) + 1
        hooks = [(hook_name("neuron", layer), _keep_hook(keep[which, layer])) for layer in layers]
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens[prompt, :width])
        logprob[which.cpu(), prompt.cpu()] = target_logprob(logits, targets[prompt], last[prompt]).float().cpu()
        correct[which.cpu(), prompt.cpu()] = top1_correct(logits, targets[prompt], last[prompt]).cpu()
    return logprob, correct


def _neuron_values(scores: Scores, model: Any) -> Tensor:
    """``scores.values`` as ``[n_layers, d_mlp]``, checked against the model."""
    if not isinstance(scores, Scores):
        raise TypeError(f"scores must be a mechedit Scores, got {type(scores).__name__}")
    if tuple(scores.axes) != ("layer", "neuron") or scores.site != "neuron":
        raise ValueError(
            f"need MLP neuron scores with axes ('layer', 'neuron') on site 'neuron' (neuron_attribution's), "
            f"got axes {scores.axes} on site {scores.site!r}"
        )
    shape = (model.cfg.n_layers, model.cfg.d_mlp)
    if tuple(scores.values.shape) != shape:
        raise ValueError(f"the scores are {tuple(scores.values.shape)} but the model has {shape} (layer x neuron): scores of another model?")
    return scores.values.float()


def _top_and_rest(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Flat indices of the ``k`` highest finite scores (best first) and of every other finite one."""
    flat = values.flatten()
    finite = (~flat.isnan()).nonzero().flatten()
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(finite):
        raise ValueError(f"k must be an int in 1..{len(finite)} (the number of scored neurons), got {k!r}")
    order = finite[flat[finite].argsort(descending=True, stable=True)]
    return order[:k], order[k:]


def _masks(sets: list[Tensor], shape: tuple[int, int]) -> Tensor:
    """``Bool[len(sets), *shape]`` from lists of flat neuron indices."""
    out = torch.zeros(len(sets), shape[0] * shape[1], dtype=torch.bool)
    for s, idx in enumerate(sets):  # a few dozen sets: building masks, not running the model
        out[s, idx] = True
    return out.view(len(sets), *shape)


# --------------------------------------------------------------------------------------------
# Predicted vs observed
# --------------------------------------------------------------------------------------------


def predicted_vs_observed(
    model: Any,
    scores: Scores,
    forget: Sequence[FactPrompt],
    retain: Sequence[FactPrompt] = (),
    *,
    k: int = 24,
    n_random: int = 24,
    seed: int = 0,
    retain_weight: float | None = None,
    batch_size: int = 512,
) -> pd.DataFrame:
    """The attribution's predicted effect of zeroing each neuron next to the observed one.

    For neuron ``(l, n)`` the observed value is the score's definition measured exactly:

        observed = mean_forget(lp - lp_zeroed) - retain_weight * mean_retain(lp - lp_zeroed)

    with ``lp`` each prompt's target log-probability (nats) and ``lp_zeroed`` the same with the
    neuron zeroed at every position. Positive: zeroing hurts the forget set more than the
    facts to keep. Measured for the top-``k`` neurons by score and ``n_random`` others drawn at
    random (seeded) from the remaining scored neurons, and for the top ``k`` zeroed together.

    Args:
        scores: ``neuron_attribution``'s ``Scores`` (``("layer", "neuron")``, nats); its
            ``positions="subject"`` variant predicts zeroing on the subject only, so it is
            compared here with an edit it did not predict (zeroing everywhere).
        forget, retain: the prompts the scores were computed on (retain may be empty).
        retain_weight: the weight of the retain term; ``None`` takes the scores' own
            (``scores.config["retain_weight"]``, else 1), and 0 when ``retain`` is empty.

    Returns:
        One row per measured neuron: ``group`` (``"selected"`` / ``"random"``), ``rank`` (the
        neuron's rank by score, 1 = top), ``layer``, ``neuron``, ``predicted`` and ``observed``
        (nats, as above), ``observed_forget`` and ``observed_retain`` (the two mean drops); then
        one row with ``group == "all selected"`` (``layer``/``neuron``/``rank`` -1): ``predicted``
        the sum of the selected predictions, ``observed`` the effect of zeroing all ``k``.

    Raises:
        ValueError: empty ``forget``, ``k`` larger than the number of scored neurons, scores of
            another shape or site, ``n_random < 0``.
    """
    values = _neuron_values(scores, model)
    if not forget:
        raise ValueError("forget is empty: give the prompts the scores were computed on")
    if not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random must be an int >= 0, got {n_random!r}")
    weight = float(scores.config.get("retain_weight", 1.0)) if retain_weight is None else float(retain_weight)
    if not retain:
        weight = 0.0
    top, rest = _top_and_rest(values, k)
    generator = torch.Generator().manual_seed(seed)
    sample = rest[torch.randperm(len(rest), generator=generator)[:n_random]]
    chosen = torch.cat([top, sample])
    shape = tuple(values.shape)
    # sets: the unedited model, each chosen neuron alone, then all selected together
    sets = [torch.tensor([], dtype=torch.long)] + [c[None] for c in chosen] + [top]
    zeroed = _masks(sets, shape)
    facts = list(forget) + list(retain)
    logprob, _ = zeroed_scores(model, facts, zeroed, batch_size=batch_size)
    drop = logprob[:1] - logprob[1:]  # [sets - 1, prompts], nats, positive = the target lost mass
    drop_forget = drop[:, : len(forget)].mean(1)
    drop_retain = drop[:, len(forget) :].mean(1) if retain else torch.zeros(len(drop))
    observed = drop_forget - weight * drop_retain
    flat = values.flatten()
    rank_of = {int(i): r + 1 for r, i in enumerate(torch.cat([top, rest[flat[rest].argsort(descending=True, stable=True)]]).tolist())}
    rows = []
    for j, idx in enumerate(chosen.tolist()):
        layer, neuron = divmod(idx, shape[1])
        rows.append({
            "group": "selected" if j < len(top) else "random", "rank": rank_of[idx], "layer": layer, "neuron": neuron,
            "predicted": float(flat[idx]), "observed": float(observed[j]),
            "observed_forget": float(drop_forget[j]), "observed_retain": float(drop_retain[j]),
        })
    rows.append({
        "group": "all selected", "rank": -1, "layer": -1, "neuron": -1,
        "predicted": float(flat[top].sum()), "observed": float(observed[-1]),
        "observed_forget": float(drop_forget[-1]), "observed_retain": float(drop_retain[-1]),
    })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# k sweep with a random-neuron control
# --------------------------------------------------------------------------------------------


def k_sweep(
    model: Any,
    scores: Scores,
    forget: Sequence[FactPrompt],
    neighbours: Sequence[FactPrompt] = (),
    *,
    ks: Sequence[int] = DEFAULT_KS,
    n_seeds: int = 5,
    seed: int = 0,
    batch_size: int = 512,
) -> pd.DataFrame:
    """Zero the top-k neurons by score vs k random scored neurons, for each k; score the prompts.

    Args:
        scores: MLP neuron ``Scores`` (``("layer", "neuron")``), highest = first to zero.
        forget: the prompts whose target should go; neighbours: prompts whose target should stay.
        ks: neuron counts, each in 1..(number of scored neurons).
        n_seeds: random draws per k, each k neurons drawn uniformly from all scored ones (the
            selected included: the null of "any k neurons"); draw ``i`` uses seed ``seed + i`` (the sets of
            one seed are not nested across k).

    Returns:
        One row per (selection, k, seed, suite): ``selection`` (``"none"`` - the unedited model,
        ``k`` 0 - then ``"top-k"`` and ``"random"``), ``k``, ``seed`` (-1 for none / top-k),
        ``suite`` (``"forget"`` / ``"neighbours"``), ``p_target`` (mean target probability, in
        [0, 1]), ``accuracy`` (fraction with the target top-1) and ``n`` (prompts).

    Raises:
        ValueError: empty ``forget``, an empty or out-of-range ``ks``, ``n_seeds < 1``.
    """
    values = _neuron_values(scores, model)
    if not forget:
        raise ValueError("forget is empty: give the prompts whose target the zeroing should remove")
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks:
        raise ValueError("ks is empty: give the neuron counts to sweep, e.g. (1, 2, 4, 8, 16, 24, 32)")
    if not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"n_seeds must be an int >= 1, got {n_seeds!r}")
    ranked = {k: _top_and_rest(values, k) for k in ks}  # validates every k first
    finite = (~values.flatten().isnan()).nonzero().flatten()
    labels = [("none", 0, -1)]
    sets = [torch.tensor([], dtype=torch.long)]
    for k in ks:
        labels.append(("top-k", k, -1))
        sets.append(ranked[k][0])
        for i in range(n_seeds):
            generator = torch.Generator().manual_seed(seed + i)
            labels.append(("random", k, seed + i))
            sets.append(finite[torch.randperm(len(finite), generator=generator)[:k]])
    facts = list(forget) + list(neighbours)
    logprob, correct = zeroed_scores(model, facts, _masks(sets, tuple(values.shape)), batch_size=batch_size)
    p = logprob.exp()
    parts = [("forget", slice(0, len(forget)))] + ([("neighbours", slice(len(forget), len(facts)))] if neighbours else [])
    rows = []
    for s, (selection, k, draw) in enumerate(labels):
        for suite, cols in parts:
            rows.append({
                "selection": selection, "k": k, "seed": draw, "suite": suite,
                "p_target": float(p[s, cols].mean()), "accuracy": float(correct[s, cols].float().mean()),
                "n": cols.stop - cols.start,
            })
    return pd.DataFrame(rows)
