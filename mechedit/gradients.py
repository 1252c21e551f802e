"""Activations and gradients on a TransformerBridge, in one place for every method.

Three captures, each one batched pass:

- ``capture_activations``: forward only, under ``no_grad`` (clean runs, means, patching sources).
- ``activations_and_gradients``: activations at hooks and d metric / d activation, with no
  parameter gradients computed (attribution patching, neuron attribution, integrated gradients).
- ``parameter_gradients``: d metric / d parameter for selected plain-HF-named parameters (PCGU).

Why a forward hook that *returns* the tensor: at converted hook points (``attn.hook_z``,
``hook_q/k/v``, ...) the bridge hands a forward hook a reshaped view that its forward never uses,
so differentiating with respect to the handed tensor fails ("One of the differentiated Tensors
appears to not have been used in the graph") and ``retain_grad()`` leaves ``.grad`` None. A hook
that returns the tensor makes the bridge convert *that* tensor back and compute on with it, so
the captured tensor is the one in the graph and ``torch.autograd.grad`` reaches it exactly
(values unchanged: the conversion is a reshape). Where a hook only observes a tensor the forward
has already consumed (e.g. an attention pattern read back from the HF module's outputs), the
gradient comes back None and the error says so. Hooks are keyed by the name they were
registered under, never by ``hook.name`` (which can be an internal alias inside the bridge).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from mechedit.checks import require_eval_mode
from mechedit.components import check_hook_name, hook_site_problem
from mechedit.models import model_device

Metric = Callable[[Float[torch.Tensor, "batch pos vocab"]], torch.Tensor]


@dataclass(frozen=True)
class Activations:
    """A forward-only capture: the logits and the activation at each requested hook.

    ``logits`` is ``[batch, pos, d_vocab]``; ``activations[name]`` has the hook tensor's shape
    (e.g. ``[batch, pos, d_mlp]`` for ``mlp.hook_post``, ``[batch, pos, n_heads, d_head]`` for
    ``attn.hook_z``). All detached copies on the model's device.
    """

    logits: torch.Tensor
    activations: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Captured:
    """Activations and the gradient of a scalar metric with respect to them, per hook name.

    ``activations[name]`` and ``gradients[name]`` have the hook tensor's shape (e.g.
    ``[batch, pos, d_mlp]`` for ``mlp.hook_post``) and are detached, on the activations' device;
    ``gradients[name][b, p, i]`` is d metric / d activation (metric units per activation unit).
    ``value`` is the metric.
    """

    value: float
    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParameterGradients:
    """The gradient of a scalar metric with respect to selected parameters.

    ``gradients[name]`` has the shape and storage layout of the Hugging Face tensor ``name``
    (a GPT-2 ``Conv1D`` weight stays ``[in, out]``), detached, on the parameter's device. The
    metric is one scalar over the whole batch, so a metric that sums over rows gives gradients
    summed over the batch. A tied parameter (GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``) gets the gradient of all its uses under each name asked for.
    """

    value: float
    gradients: dict[str, torch.Tensor]


def _hook_names(model: Any, hook_names: Sequence[str]) -> list[str]:
    if isinstance(hook_names, str):
        raise ValueError(f"hook_names must be a list of hook names, got the string {hook_names!r}")
    names = list(dict.fromkeys(hook_names))
    if not names:
        raise ValueError("hook_names is empty: give at least one hook name (see components.hook_name)")
    for name in names:
        check_hook_name(model, name)
    return names


def _keeper(stored: dict[str, torch.Tensor], name: str, *, differentiable: bool):
    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor | None:  # noqa: ARG001 - TL hook signature
        if name in stored:
            raise RuntimeError(
                f"hook {name!r} fired twice in one forward pass, so 'its activation' is ambiguous; "
                "capture a hook that fires once per forward"
            )
        if not differentiable:
            stored[name] = activation.detach().clone()
            return None
        if not activation.is_floating_point():
            raise ValueError(
                f"hook {name!r} holds {activation.dtype} values (token ids?), which have no gradient"
            )
        if activation.requires_grad:
            # A new graph node, so the gradient covers only what flows through this hook: the
            # tensor handed over can also feed other paths (``ln1.hook_in`` is the residual).
            activation = activation.view_as(activation)
        else:
            # Nothing upstream needs a gradient (e.g. frozen parameters), so a fresh leaf here
            # loses nothing and lets the gradient with respect to this activation exist.
            activation = activation.detach().requires_grad_(True)
        stored[name] = activation
        return activation  # the bridge computes on with this very tensor (see module docstring)

    return hook


def _check_fired(model: Any, names: Sequence[str], stored: dict[str, torch.Tensor]) -> None:
    missing = [n for n in names if n not in stored]
    if missing:
        reasons = [hook_site_problem(model, n) for n in missing]
        why = "".join(f" {n}: {r}." for n, r in zip(missing, reasons) if r)
        raise RuntimeError(
            f"hooks {missing} are in the model's hook_dict but did not fire during the forward "
            f"pass, so they have no activation.{why} See "
            "mechedit.components.available_sites(model) for the sites this architecture computes."
        )


def _scalar(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"metric must return a scalar tensor (0-d), got {shape}; reduce it, e.g. "
            "metric(logits).sum() for a batch total or .mean() for a batch mean"
        )
    if not value.requires_grad:
        raise ValueError(
            "metric's output does not depend on the logits through autograd: it must be computed "
            "from the logits with torch operations (no .item(), .detach() or torch.tensor(...))"
        )
    return value


def capture_activations(
    model: Any, tokens: Int[torch.Tensor, "batch pos"], hook_names: Sequence[str]
) -> Activations:
    """One forward pass under ``no_grad``: the logits and the activations at ``hook_names``.

    ``tokens`` are moved to the model's device. The model's hooks and flags are left as they were.
    """
    require_eval_mode(model, what="capture_activations")
    names = _hook_names(model, hook_names)
    stored: dict[str, torch.Tensor] = {}
    hooks = [(n, _keeper(stored, n, differentiable=False)) for n in names]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens.to(model_device(model)))
    _check_fired(model, names, stored)
    return Activations(logits=logits.detach(), activations=stored)


def activations_and_gradients(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    hook_names: Sequence[str],
    metric: Metric,
    *,
    allow_unused: bool = False,
) -> Captured:
    """One forward and one backward pass: the hooks' activations and d metric / d activation.

    ``allow_unused=True`` returns zeros where the metric does not depend on a hook (e.g. when
    the caller blocks a gradient path on purpose) instead of raising.

    ``metric`` maps the logits ``[batch, pos, vocab]`` to a scalar (e.g. a summed target
    log-probability). Only the activations are differentiated: no parameter gradient is computed
    or stored (``.grad`` stays as it was), and frozen parameters (``requires_grad=False``) are
    fine. ``tokens`` are moved to the model's device. Works at every hook that feeds the logits,
    converted ones (``attn.hook_z``, ``attn.hook_q``) included. The gradient is that of an edit
    *at the hook*: where a hook feeds only part of what its name suggests, so does the gradient
    (on GPT-2 and Llama, ``hook_resid_mid`` feeds only the MLP; add the ``resid_post`` gradient
    for the total derivative; see ``components.edit_caveats``).

    Raises:
        RuntimeError: the model is in training mode, or this runs inside
            ``torch.inference_mode()``; a hook did not fire; a gradient came back None (the hook
            observes a tensor the logits do not depend on).
        ValueError: an unknown hook name, or a metric that is not a differentiable scalar.
    """
    require_eval_mode(model, what="activations_and_gradients", needs_grad=True)
    names = _hook_names(model, hook_names)
    stored: dict[str, torch.Tensor] = {}
    hooks = [(n, _keeper(stored, n, differentiable=True)) for n in names]
    with torch.enable_grad():
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens.to(model_device(model)))
        _check_fired(model, names, stored)
        value = _scalar(metric(logits))
        grads = torch.autograd.grad(value, [stored[n] for n in names], allow_unused=True)
    if allow_unused:
        grads = tuple(torch.zeros_like(stored[n]) if g is None else g for n, g in zip(names, grads))
    unused = [n for n, g in zip(names, grads) if g is None]
    if unused:
        raise RuntimeError(
            f"the gradient at {unused} came back None: the metric does not depend on what these "
            "hooks hold. Either the hook only observes a tensor the forward pass has already "
            "consumed (on this architecture the bridge reads e.g. the attention pattern back "
            "from the HF module's outputs), or it lies after the logits the metric reads. "
            "See mechedit.components.available_sites(model) for the sites with gradients."
        )
    return Captured(
        value=value.item(),
        activations={n: stored[n].detach().clone() for n in names},
        gradients={n: g.detach() for n, g in zip(names, grads)},
    )


def _selected_parameters(model: Any, param_names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    from mechedit.hf import hf_parameters, hf_state_dict

    if isinstance(param_names, str):
        raise ValueError(f"param_names must be a list of names, got the string {param_names!r}")
    names = list(dict.fromkeys(param_names))
    if not names:
        raise ValueError("param_names is empty: give plain HF parameter names (see hf_parameters)")
    bridge = hasattr(model, "original_model")
    available = hf_parameters(model, tied_aliases=True) if bridge else dict(model.named_parameters())
    selected = {}
    for name in names:
        if name in available:
            selected[name] = available[name]
            continue
        if bridge and name in hf_state_dict(model):
            # an HF tensor the bridge does not compute with (GPT-NeoX attention) or a buffer
            raise ValueError(
                f"parameter {name!r} gets no gradient through this bridge: the bridge computes "
                "with its own copies of this module's weights (or it is a buffer), so the HF "
                "tensor is not in the forward pass"
            )
        near = difflib.get_close_matches(name, list(available), n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(near)}" if near else ""
        raise ValueError(f"parameter {name!r} is not in this model{hint}")
    return selected


def parameter_gradients(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    param_names: Sequence[str],
    metric: Metric,
    *,
    attention_mask: torch.Tensor | None = None,
) -> ParameterGradients:
    """One forward and one backward pass: d metric / d parameter for ``param_names``.

    ``param_names`` are plain Hugging Face names (``transformer.h.0.mlp.c_fc.weight``; see
    ``mechedit.hf.hf_parameters``). Only these parameters are differentiated; their
    ``requires_grad`` flags are switched on for the pass and restored after, and no ``.grad``
    buffer is written. ``tokens`` are moved to the model's device. ``attention_mask``
    (``[batch, pos]``, 1/True at real tokens) is passed to the forward: needed for padded rows
    of a bidirectional model (BERT), where padding changes every position; right padding of a
    causal model does not need it.

    Raises:
        RuntimeError: training mode, ``torch.inference_mode()``, or a gradient that came back
            None (the metric does not depend on that parameter).
        ValueError: an unknown name, a name the bridge shadows with its own copy (GPT-NeoX
            attention: its gradient would not reach the HF tensor), or a non-scalar metric.
    """
    require_eval_mode(model, what="parameter_gradients", needs_grad=True)
    selected = _selected_parameters(model, param_names)
    targets = list({id(p): p for p in selected.values()}.values())
    leaves = _storage_sharers(model, targets)
    unique = list({id(p): p for group in leaves for p in group}.values())
    flags = [p.requires_grad for p in unique]
    try:
        for p in unique:
            p.requires_grad_(True)
        with torch.enable_grad():
            device = model_device(model)
            if attention_mask is None:
                logits = model(tokens.to(device))
            else:
                logits = model(tokens.to(device), attention_mask=attention_mask.to(device))
            value = _scalar(metric(logits))
            grads = torch.autograd.grad(value, unique, allow_unused=True)
    finally:
        for p, flag in zip(unique, flags):
            p.requires_grad_(flag)
    by_leaf = {id(p): g for p, g in zip(unique, grads)}
    by_target = {id(t): _assemble(t, group, by_leaf) for t, group in zip(targets, leaves)}
    unused = [n for n, p in selected.items() if by_target[id(p)] is None]
    if unused:
        raise RuntimeError(
            f"the gradient of {unused} came back None: the metric does not depend on these "
            "parameters in this forward pass (is the module used by this architecture's "
            "forward, and does the metric read the outputs it feeds?)"
        )
    return ParameterGradients(
        value=value.item(),
        gradients={n: by_target[id(p)] for n, p in selected.items()},
    )


def _storage_sharers(model: Any, targets: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per target tensor: every parameter of the bridge (or the HF model) viewing its memory.

    The bridge computes GPT-2 attention with its own ``q``/``k``/``v`` parameters, which are
    views into the HF ``c_attn`` tensors' memory but separate autograd leaves: the gradient
    with respect to ``c_attn`` is the sum of theirs, placed where they sit in its memory.
    """
    by_storage: dict[int, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for root in (model, getattr(model, "original_model", None)):
        if not isinstance(root, torch.nn.Module):
            continue
        for _, param in root.named_parameters(remove_duplicate=False):
            if id(param) not in seen:
                seen.add(id(param))
                by_storage.setdefault(param.untyped_storage().data_ptr(), []).append(param)
    return [
        by_storage.get(t.untyped_storage().data_ptr(), [t]) or [t]
        for t in targets
    ]


def _assemble(
    target: torch.Tensor, leaves: Sequence[torch.Tensor], grads: dict[int, torch.Tensor | None]
) -> torch.Tensor | None:
    """d metric / d ``target``: each leaf's gradient added where that leaf sits in target's memory."""
    if all(grads[id(leaf)] is None for leaf in leaves):
        return None
    total = torch.zeros(target.numel(), dtype=target.dtype, device=target.device)
    flat_target = total.as_strided(target.size(), target.stride(), 0) if target.is_contiguous() else None
    if flat_target is None:
        raise RuntimeError("parameter_gradients needs contiguous parameters; got a strided one")
    for leaf in leaves:
        grad = grads[id(leaf)]
        if grad is None:
            continue
        offset = leaf.storage_offset() - target.storage_offset()
        last = offset + sum((size - 1) * stride for size, stride in zip(leaf.size(), leaf.stride()))
        if offset < 0 or last >= target.numel():
            continue  # shares the storage but lies outside this tensor (another parameter's slice)
        total.as_strided(leaf.size(), leaf.stride(), offset).add_(grad.detach())
    return flat_target.detach()


def gradient_leaves(model: Any, params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per HF parameter in ``params``: the autograd leaves whose gradients make up its gradient.

    The bridge computes GPT-2 attention with its own ``q``/``k``/``v`` parameters, views into
    ``c_attn``'s memory but separate autograd leaves, so ``c_attn.weight.grad`` stays empty. A
    training loop over HF tensors switches ``requires_grad`` on for every leaf listed here, runs
    ``torch.autograd.grad(loss, leaves)`` and adds them up with ``assemble_gradient``.
    """
    return _storage_sharers(model, params)


def assemble_gradient(
    target: torch.Tensor, leaves: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> torch.Tensor | None:
    """d loss / d ``target`` (shape and layout of ``target``) from its leaves' gradients.

    ``leaves`` is ``gradient_leaves(model, [target])[0]`` and ``grads`` their gradients in the
    same order (``None`` where a leaf was unused); ``None`` when every one is ``None``.
    """
    return _assemble(target, leaves, {id(leaf): g for leaf, g in zip(leaves, grads, strict=True)})


__all__ = [
    "Activations",
    "Captured",
    "Metric",
    "ParameterGradients",
    "activations_and_gradients",
    "assemble_gradient",
    "capture_activations",
    "gradient_leaves",
    "parameter_gradients",
]
