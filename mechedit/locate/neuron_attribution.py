"""Gradient x activation attribution of MLP neurons to a fact, contrasted with facts to keep.

For neuron ``n`` of layer ``l`` with post-activation ``a[b, p]`` and metric
``M = mean_b log P(target_b | prompt_b)``, zeroing the neuron at every position changes M by
approximately (first-order Taylor expansion around the current activations)

    effect[l, n] = - sum_p a[b, p] * dM/da[b, p]      (averaged over prompts b)

so ``-effect`` is the predicted *drop* in target log-probability. The score is

    score[l, n] = drop_forget[l, n] - retain_weight * drop_retain[l, n]

in nats: positive where removing the neuron is predicted to hurt the facts to forget more than the
facts to keep. One forward and one backward pass per prompt set (batched), for all layers at once;
the exact effect of the selected neurons is what the evaluation then measures. Zeroing a neuron at
every position is what ``mechedit.edit.zero_neurons`` does in the weights, so the scores rank
exactly the edit that follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from einops import einsum

from mechedit.checks import require_eval_mode
from mechedit.components import hook_name
from mechedit.gradients import activations_and_gradients
from mechedit.metrics import target_logprob
from mechedit.models import model_device
from mechedit.progress import tqdm
from mechedit.prompts import FactPrompt
from mechedit.provenance import Provenance
from mechedit.scores import Scores
from mechedit.tokens import subject_token_positions, tokenize_facts


@dataclass(frozen=True)
class NeuronAttributionConfig:
    """Settings of ``neuron_attribution``.

    Attributes:
        retain_weight: weight of the retain set's predicted drop (0 ignores it).
        positions: ``"all"`` sums the effect over every position (the effect of zeroing the
            neuron everywhere); ``"subject"`` only over each prompt's subject tokens, which ranks
            the neurons that *look the subject up* above those that write the answer for every
            subject (the edit may still zero them everywhere). ``"subject"`` needs prompts with a
            ``subject``.
        batch_size: prompts per forward/backward pass.
        layers: layers to score (``None``: all); unscored layers are NaN.
    """

    retain_weight: float = 1.0
    positions: str = "all"
    batch_size: int = 64
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.positions not in ("all", "subject"):
            raise ValueError(f"positions must be 'all' or 'subject', got {self.positions!r}")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight must be >= 0, got {self.retain_weight}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _subject_mask(
    model: Any, facts: Sequence[FactPrompt], shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """``[batch, pos]`` float: 1 at each prompt's subject tokens (built on ``device``)."""
    mask = torch.zeros(shape, device=device)
    for row, fact in enumerate(facts):
        if fact.subject is None:
            raise ValueError(f"positions='subject' needs a subject on every prompt; {fact.prompt!r} has none")
        mask[row, list(subject_token_positions(model, fact))] = 1.0
    return mask


def _predicted_drop(model: Any, facts: Sequence[FactPrompt], layers: list[int], cfg: NeuronAttributionConfig) -> torch.Tensor:
    """``[len(layers), d_mlp]`` (CPU): mean over ``facts`` of the first-order drop in target log-prob."""
    names = [hook_name("neuron", layer) for layer in layers]
    device = model_device(model)
    total = torch.zeros(len(layers), model.cfg.d_mlp, device=device)
    for start in range(0, len(facts), cfg.batch_size):
        chunk = list(facts[start : start + cfg.batch_size])
        batch = tokenize_facts(model, chunk)
        tokens = batch.tokens.to(device)
        shape = tuple(tokens.shape)
        where = _subject_mask(model, chunk, shape, device) if cfg.positions == "subject" else torch.ones(shape, device=device)

        def metric(logits, batch=batch):
            return target_logprob(logits, batch.target_ids, batch.last_positions).sum()

        cap = activations_and_gradients(model, tokens, names, metric)
        for i, name in enumerate(names):
            # effect of zeroing = (0 - a) * grad, summed over batch and positions
            acts, grads = cap.activations[name], cap.gradients[name]
            total[i] -= einsum(acts, grads, where.to(acts), "b p n, b p n, b p -> n").to(total)
    return (-total / len(facts)).cpu()


def neuron_attribution(
    model: Any,
    forget: Sequence[FactPrompt],
    retain: Sequence[FactPrompt] = (),
    *,
    config: NeuronAttributionConfig | None = None,
    progress: bool = True,
) -> Scores:
    """Score every MLP neuron by how much zeroing it is predicted to remove ``forget`` but not ``retain``.

    Returns ``Scores`` with axes ``("layer", "neuron")`` on site ``"neuron"``, values in nats
    (see the module docstring for the formula and sign); select with ``scores.top_k(k)``.
    """
    cfg = config or NeuronAttributionConfig()
    require_eval_mode(model, what="neuron_attribution", needs_grad=True)
    if not forget:
        raise ValueError("forget is empty: give the fact prompts whose target should be removed")
    layers = list(range(model.cfg.n_layers)) if cfg.layers is None else list(cfg.layers)
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {model.cfg.n_layers} layers (0..{model.cfg.n_layers - 1})")
    values = torch.full((model.cfg.n_layers, model.cfg.d_mlp), float("nan"))
    sets = [("forget", forget, 1.0)] + ([("retain", retain, -cfg.retain_weight)] if retain and cfg.retain_weight else [])
    score = torch.zeros(len(layers), model.cfg.d_mlp)
    for _, facts, sign in tqdm(sets, desc="neuron attribution", disable=not progress):
        score += sign * _predicted_drop(model, facts, layers, cfg)
    values[layers] = score
    prompts = [f.prompt for f in forget] + [f.prompt for f in retain]
    return Scores(
        values,
        ("layer", "neuron"),
        "neuron",
        "neuron_attribution",
        config={**asdict(cfg), "layers": layers, "n_forget": len(forget), "n_retain": len(retain)},
        provenance=Provenance.of(model, data=prompts),
    )
