"""Activation edits: zero, mean-ablate or scale a circuit's components while a ``with`` block runs.

    with ablate(model, circuit, mode="zero"):
        logits = model(tokens)          # edited
    logits = model(tokens)              # exactly as before

An edit registers one forward hook per hook point its components live at (so 300 neurons of one
layer cost one hook) and applies them with a boolean ``[pos, unit]`` mask built from index
tensors, never a Python loop over units inside the forward. Hooks are added through the bridge's
own ``model.hooks`` context, which removes them on exit whatever happened inside, so the model is
left exactly as it was; the weights are never touched.

Positions: a component pinned to a position (``Component.pos``) is edited there only; the others
at the edit's ``positions`` (``None``: every position). Positions count BOS (the bridge prepends
it) and may be negative (``-1``: the last token of each sequence); they apply to every sequence of
the batch.

Mean ablation replaces a unit's activation by its mean over a reference set, computed once when
the edit is built, on the unedited model:

- default (position-independent): the mean over every token position of every reference prompt,
  BOS included unless ``exclude_bos=True`` (which drops position 0); one value per unit, used at
  every edited position.
- ``per_position=True``: the mean over reference prompts at each position (all reference prompts
  must tokenise to the same length); position ``p`` of the edited sequence gets the mean at ``p``.

Reference prompts given as strings are tokenised one by one with ``model.to_tokens`` (BOS
prepended as the bridge does by default) and batched by length, so no padding enters the mean.
Token tensors are used as given, every position counting.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int

from mechedit import components as comp
from mechedit.circuit import Circuit
from mechedit.components import Component

Mode = Literal["zero", "mean", "scale"]
MODES = ("zero", "mean", "scale")


def _as_units(activation: torch.Tensor, indexed: bool) -> torch.Tensor:
    """View a hook tensor as ``[batch, pos, unit, feature]``.

    Heads (``hook_z``) already are; neurons ``[b, p, d_mlp]`` get a feature axis of 1; whole-vector
    sites ``[b, p, d_model]`` become one unit of ``d_model`` features.
    """
    if activation.ndim == 4:
        return activation
    if activation.ndim != 3:
        raise ValueError(
            f"expected a [batch, pos, ...] activation, got shape {tuple(activation.shape)}"
        )
    return activation.unsqueeze(-1) if indexed else activation.unsqueeze(2)


def _resolve_positions(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    bad = (positions >= seq_len) | (positions < -seq_len)
    if bool(bad.any()):
        raise ValueError(
            f"positions {positions[bad].tolist()} out of range for a sequence of {seq_len} tokens "
            f"(valid: 0..{seq_len - 1} or -{seq_len}..-1)"
        )
    return positions % seq_len


def _positions_tensor(positions: Any) -> torch.Tensor | None:
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor):
        if positions.is_floating_point() or positions.dtype == torch.bool or positions.ndim > 1:
            raise ValueError("positions must be an int, a sequence of ints or a 1-D integer tensor")
        return positions.to(torch.long).flatten()
    items = [positions] if comp.is_int(positions) else list(positions)
    if not all(comp.is_int(p) for p in items):
        raise ValueError(
            f"positions must be ints (BOS is position 0; negative counts from the end), got {positions!r}"
        )
    return torch.tensor(items, dtype=torch.long)


@dataclass(frozen=True)
class _HookGroup:
    """The components at one hook: units edited at the edit's positions, and pinned (pos, unit) pairs."""

    indexed: bool
    free_units: torch.Tensor
    pinned_pos: torch.Tensor
    pinned_units: torch.Tensor

    @classmethod
    def of(cls, members: Sequence[Component]) -> _HookGroup:
        indexed = comp.SITES[members[0].site].index is not None
        unit = [c.index if indexed else 0 for c in members]
        free = [u for c, u in zip(members, unit, strict=True) if c.pos is None]
        pinned = [(c.pos, u) for c, u in zip(members, unit, strict=True) if c.pos is not None]
        return cls(
            indexed=indexed,
            free_units=torch.tensor(free, dtype=torch.long),
            pinned_pos=torch.tensor([p for p, _ in pinned], dtype=torch.long),
            pinned_units=torch.tensor([u for _, u in pinned], dtype=torch.long),
        )

    def mask(self, seq_len: int, n_units: int, positions: torch.Tensor | None) -> torch.Tensor:
        """Boolean ``[pos, unit]``: True where this group edits a sequence of ``seq_len`` tokens."""
        mask = torch.zeros(seq_len, n_units, dtype=torch.bool)
        if self.free_units.numel():
            rows = (
                torch.arange(seq_len)
                if positions is None
                else _resolve_positions(positions, seq_len)
            )
            mask[rows[:, None], self.free_units[None, :]] = True
        if self.pinned_units.numel():
            mask[_resolve_positions(self.pinned_pos, seq_len), self.pinned_units] = True
        return mask


class ActivationEdit:
    """A reversible edit of a circuit's activations; ``apply``/``revert`` or use it in ``with``.

    Args:
        model: a TransformerBridge.
        circuit: a ``Circuit`` or components (no weight partitions), validated against ``model``.
        mode: ``"zero"`` sets the units to 0; ``"mean"`` to their mean over ``reference`` (see the
            module docstring for the convention); ``"scale"`` multiplies them by ``scale``.
        reference: prompts (strings) or tokens ``[batch, pos]`` for ``mode="mean"`` only.
        scale: the factor for ``mode="scale"`` only (``0`` equals zeroing, ``2`` doubles).
        positions: positions for components without their own ``pos``; ``None`` = all.
        per_position: mean per position instead of over all positions (``mode="mean"``).
        exclude_bos: leave position 0 out of the position-independent mean.

    ``means`` holds the reference means by hook name, shaped like one token's activation at that
    hook (``[pos, ...]`` with ``per_position``); see ``mean_activations``.
    """

    def __init__(
        self,
        model: Any,
        circuit: Circuit | Iterable[Component],
        *,
        mode: Mode = "zero",
        reference: Sequence[str] | str | Int[torch.Tensor, "batch pos"] | None = None,
        scale: float | None = None,
        positions: int | Sequence[int] | Int[torch.Tensor, " n"] | None = None,
        per_position: bool = False,
        exclude_bos: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not known; valid modes: {', '.join(MODES)}")
        if (reference is not None) != (mode == "mean"):
            raise ValueError(
                "mode='mean' needs reference= prompts or tokens; other modes take none"
            )
        if (scale is not None) != (mode == "scale"):
            raise ValueError("mode='scale' needs scale= a number; other modes take none")
        if scale is not None and not (isinstance(scale, int | float) and math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        if (per_position or exclude_bos) and mode != "mean":
            raise ValueError("per_position and exclude_bos apply to mode='mean' only")
        self.circuit = circuit if isinstance(circuit, Circuit) else Circuit(tuple(circuit))
        if not self.circuit.components:
            raise ValueError("the circuit is empty: nothing to edit")
        comp.validate_all(model, self.circuit.components)
        weights = [c for c in self.circuit if comp.SITES[c.site].kind == "weight"]
        if weights:
            raise ValueError(
                f"{weights[0]} is a weight partition, not an activation; edit weights with "
                "mechedit.edit.weights"
            )

        self.model = model
        self.mode = mode
        self.scale = None if scale is None else float(scale)
        self.positions = _positions_tensor(positions)
        self.per_position = per_position
        self.exclude_bos = exclude_bos
        self.groups = {name: _HookGroup.of(group) for name, group in self.circuit.by_hook().items()}
        self.means: dict[str, torch.Tensor] = (
            mean_activations(
                model, self.groups, reference, per_position=per_position, exclude_bos=exclude_bos
            )
            if mode == "mean"
            else {}
        )
        self._stack: contextlib.ExitStack | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description of the edit (the circuit included; the means are not)."""
        return {
            "kind": "activation",
            "mode": self.mode,
            "scale": self.scale,
            "positions": None if self.positions is None else self.positions.tolist(),
            "per_position": self.per_position,
            "exclude_bos": self.exclude_bos,
            "circuit": self.circuit.to_dict(),
        }

    @property
    def fwd_hooks(self) -> list[tuple[str, Any]]:
        """``(hook_name, fn)`` pairs, e.g. for ``model.run_with_hooks(tokens, fwd_hooks=...)``."""
        return [(name, self._hook(name, group)) for name, group in self.groups.items()]

    def _hook(self, name: str, group: _HookGroup):
        masks: dict[tuple[int, int], torch.Tensor] = {}

        # `name` is closed over: inside a bridge hook, hook.name may be an internal alias.
        def edit(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
            units = _as_units(activation, group.indexed)
            seq_len, n_units = units.shape[1], units.shape[2]
            if (seq_len, n_units) not in masks:
                masks[seq_len, n_units] = group.mask(seq_len, n_units, self.positions)
            where = masks[seq_len, n_units].to(units.device)[None, :, :, None]
            if self.mode == "zero":
                edited = units.masked_fill(where, 0.0)
            elif self.mode == "scale":
                edited = torch.where(where, units * self.scale, units)
            else:
                mean = self._mean_for(name, seq_len).to(units)
                edited = torch.where(where, mean, units)
            return edited.reshape(activation.shape)

        return edit

    def _mean_for(self, name: str, seq_len: int) -> torch.Tensor:
        """The mean as ``[1, 1 or pos, unit, feature]``, broadcastable against the activation."""
        mean = self.means[name]
        if not self.per_position:
            return _as_units(mean[None, None], self.groups[name].indexed)
        if seq_len > mean.shape[0]:
            raise ValueError(
                f"per-position mean covers {mean.shape[0]} positions but the input has {seq_len}; "
                "use reference prompts at least as long as the edited ones"
            )
        return _as_units(mean[None, :seq_len], self.groups[name].indexed)

    def apply(self) -> ActivationEdit:
        """Register the hooks (until ``revert``). Raises ``RuntimeError`` if already applied."""
        if self._stack is not None:
            raise RuntimeError("this edit is already applied; revert it first")
        stack = contextlib.ExitStack()
        stack.enter_context(self.model.hooks(fwd_hooks=self.fwd_hooks))
        self._stack = stack
        return self

    def revert(self) -> None:
        """Remove exactly the hooks ``apply`` added (other hooks stay); a no-op if not applied."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    @property
    def applied(self) -> bool:
        return self._stack is not None

    def __enter__(self) -> ActivationEdit:
        return self.apply()

    def __exit__(self, *exc_info: Any) -> None:
        self.revert()


def ablate(
    model: Any,
    circuit: Circuit | Iterable[Component],
    *,
    mode: Mode = "zero",
    reference: Sequence[str] | str | Int[torch.Tensor, "batch pos"] | None = None,
    scale: float | None = None,
    positions: int | Sequence[int] | Int[torch.Tensor, " n"] | None = None,
    per_position: bool = False,
    exclude_bos: bool = False,
) -> ActivationEdit:
    """An ``ActivationEdit`` of ``circuit`` on ``model``, to use as ``with ablate(...):``.

    See ``ActivationEdit`` for the arguments and the module docstring for positions and the
    mean-ablation convention. The mean (``mode="mean"``) is computed here, once.
    """
    return ActivationEdit(
        model,
        circuit,
        mode=mode,
        reference=reference,
        scale=scale,
        positions=positions,
        per_position=per_position,
        exclude_bos=exclude_bos,
    )


def _reference_batches(
    model: Any, reference: Sequence[str] | str | torch.Tensor
) -> list[torch.Tensor]:
    """Reference tokens as ``[batch, pos]`` batches of equal length (no padding)."""
    if isinstance(reference, torch.Tensor):
        if reference.is_floating_point() or reference.ndim not in (1, 2) or reference.numel() == 0:
            raise ValueError(
                "reference tokens must be a non-empty integer tensor [batch, pos] or [pos]"
            )
        return [reference.reshape(-1, reference.shape[-1]).to(torch.long)]
    prompts = [reference] if isinstance(reference, str) else list(reference)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            "reference must be prompts (a non-empty list of strings) or a token tensor"
        )
    by_length: dict[int, list[torch.Tensor]] = {}
    for prompt in prompts:
        tokens = model.to_tokens(prompt)
        by_length.setdefault(tokens.shape[-1], []).append(tokens)
    return [torch.cat(batch) for batch in by_length.values()]


@torch.no_grad()
def mean_activations(
    model: Any,
    hook_names: Iterable[str],
    reference: Sequence[str] | str | Int[torch.Tensor, "batch pos"],
    *,
    per_position: bool = False,
    exclude_bos: bool = False,
) -> dict[str, Float[torch.Tensor, "..."]]:
    """Mean activation at each hook over ``reference`` prompts or tokens, by hook name.

    Default: the mean over every (prompt, position) pair (position 0 left out with
    ``exclude_bos``), shaped like one token's activation, e.g. ``[d_mlp]`` for ``mlp.hook_post``
    or ``[n_heads, d_head]`` for ``attn.hook_z``. With ``per_position``: the mean over prompts at
    each position, ``[pos, ...]`` (all prompts must have one token length). Accumulated in float64
    and returned in the activations' dtype; runs the model as it is (hooks already applied count).
    """
    names = [comp.check_hook_name(model, name) for name in hook_names]
    batches = _reference_batches(model, reference)
    if per_position and len({b.shape[1] for b in batches}) > 1:
        raise ValueError(
            "per_position means need reference prompts of one token length; got lengths "
            f"{sorted({b.shape[1] for b in batches})}"
        )
    start = 1 if exclude_bos and not per_position else 0
    if all(b.shape[1] <= start for b in batches):
        raise ValueError(
            "exclude_bos leaves no positions: the reference prompts are one token long"
        )
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    count = 0

    def accumulate(name: str):
        # `name` is closed over: inside a bridge hook, hook.name may be an internal alias.
        def fn(activation: torch.Tensor, hook: Any = None) -> None:
            dtypes[name] = activation.dtype
            wide = activation.detach().to(torch.float64)
            part = wide.sum(0) if per_position else wide[:, start:].sum((0, 1))
            sums[name] = part if name not in sums else sums[name] + part

        return fn

    for tokens in batches:
        with model.hooks(fwd_hooks=[(name, accumulate(name)) for name in names]):
            model(tokens)
        count += tokens.shape[0] * (1 if per_position else tokens.shape[1] - start)
    return {name: (sums[name] / count).to(dtypes[name]) for name in names}


__all__ = ["MODES", "ActivationEdit", "ablate", "mean_activations"]
