"""Gradient capture on a TransformerBridge, in one place for every gradient-based method.

``retain_grad()`` on a bridge hook tensor can leave ``.grad`` as None, so activations are captured
by forward hooks that keep a reference to the tensor in the graph, and gradients come from
``torch.autograd.grad`` on those references. Hooks are keyed by the name they were registered
under, never by ``hook.name`` (which can be an internal alias inside the bridge).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from mechedit.components import check_hook_name


@dataclass(frozen=True)
class Captured:
    """Activations and the gradient of a scalar metric with respect to them, per hook name.

    ``activations[name]`` and ``gradients[name]`` have the hook tensor's shape (e.g.
    ``[batch, pos, d_mlp]`` for ``mlp.hook_post``) and are detached; ``value`` is the metric.
    """

    value: float
    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]


def activations_and_gradients(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    hook_names: Sequence[str],
    metric: Callable[[Float[torch.Tensor, "batch pos vocab"]], torch.Tensor],
) -> Captured:
    """One forward and one backward pass: the hooks' activations and d metric / d activation.

    ``metric`` maps the logits to a scalar (e.g. a mean target log-probability). Parameters get no
    ``.grad`` (only the activations are differentiated), and the model's ``requires_grad`` flags
    and hooks are left as they were.
    """
    names = list(dict.fromkeys(hook_names))
    for name in names:
        check_hook_name(model, name)
    stored: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(activation: torch.Tensor, hook: Any) -> None:  # noqa: ARG001 - TL hook signature
            stored[name] = activation

        return hook

    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, keep(name)) for name in names]):
        logits = model(tokens)
        value = metric(logits)
        if value.ndim != 0:
            raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
        missing = [n for n in names if n not in stored]
        if missing:
            raise RuntimeError(f"hooks {missing} did not fire during the forward pass")
        if not all(stored[n].requires_grad for n in names):
            raise RuntimeError(
                "captured activations carry no gradient: the model's parameters have "
                "requires_grad=False; enable it (model.requires_grad_(True)) for gradient methods"
            )
        grads = torch.autograd.grad(value, [stored[n] for n in names])
    return Captured(
        value=value.item(),
        activations={n: stored[n].detach() for n in names},
        gradients={n: g.detach() for n, g in zip(names, grads)},
    )
