"""Activation edits: zero, mean-ablate or scale a circuit's components while a ``with`` block runs.

    with ablate(model, circuit, mode="zero"):
        logits = model(tokens)          # edited
    logits = model(tokens)              # exactly as before

An edit is a thin use of ``mechedit.interventions``: one ``Intervention`` (two when some
components are pinned to positions and the others are not) per hook point its components live
at, so 300 neurons of one layer cost one hook and one ``torch.where``. Hooks are added through
the bridge's own ``model.hooks`` context, which removes them on exit whatever happened inside,
so the model is left exactly as it was; the weights are never touched.

Like a ``WeightEdit``, an edit follows the ``mechedit.edit.Edit`` protocol: ``apply(model)``,
``revert(model)``, ``applied(model)`` (a context manager), ``save(dir)`` and ``load(dir)``. It
is built on a model (``ablate(model, circuit)``); ``apply()`` / ``revert()`` / ``with edit:``
without a model use that one. A loaded edit applies to a model with the weights it was built on
(checked by weights hash, as weight edits are; ``check_base=False`` to apply anyway).

Positions: a component pinned to a position (``Component.pos``) is edited there only; the others
at the edit's ``positions`` (``None``: every real token). Positions count each row's real tokens
from its first one (BOS included: the bridge prepends it), and negative ones from its last
(``-1``: each row's last real token, whatever the padding side). The rows' real tokens come from
an ``attention_mask`` given to ``apply`` / ``applied``, or per batch from a
``mechedit.interventions.real_tokens(batch)`` block around the forward pass; without either,
every row counts as unpadded.

Mean ablation replaces a unit's activation by its mean over a reference set, computed once when
the edit is built, on the unedited model:

- default (position-independent): the mean over every token position of every reference prompt,
  BOS included unless ``exclude_bos=True`` (which drops position 0); one value per unit, used at
  every edited position.
- ``per_position=True``: the mean over reference prompts at each position (all reference prompts
  must tokenise to the same length); prompt position ``p`` of an edited row gets the mean at ``p``.

Reference prompts given as strings are tokenised one by one with ``model.to_tokens`` (BOS
prepended as the bridge does by default) and batched by length, so no padding enters the mean.
Token tensors are used as given, every position counting.

On disk an edit is a folder: ``manifest.json`` (``{"format": "mechedit.activation_edit",
"version": 1, "mode", "scale", "positions", "per_position", "exclude_bos", "architecture",
"circuit": <Circuit.to_dict()>, "base": <Provenance>, "means": {hook: {"shape", "dtype"}}}``)
and, for ``mode="mean"``, ``means.safetensors`` (one tensor per hook name).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int

from mechedit import components as comp
from mechedit.artifacts import (
    check_keys,
    check_type,
    read_json,
    read_tensors,
    write_json_atomic,
    write_tensors,
)
from mechedit.checks import require_eval_mode
from mechedit.circuit import Circuit, CircuitFormatError
from mechedit.components import Component
from mechedit.edit.weights import BaseModelMismatchError, EditFormatError, EditStateError
from mechedit.hf import architecture
from mechedit.interventions import Intervention
from mechedit.models import model_device
from mechedit.provenance import Provenance, weights_hash

Mode = Literal["zero", "mean", "scale"]
MODES = ("zero", "mean", "scale")

FORMAT = "mechedit.activation_edit"
VERSION = 1
MANIFEST_FILE = "manifest.json"
MEANS_FILE = "means.safetensors"
_MANIFEST_FIELDS = (
    "format",
    "version",
    "mode",
    "scale",
    "positions",
    "per_position",
    "exclude_bos",
    "architecture",
    "circuit",
    "base",
    "means",
)


def _positions_tensor(positions: Any) -> torch.Tensor | None:
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor):
        if positions.is_floating_point() or positions.dtype == torch.bool or positions.ndim > 1:
            raise ValueError("positions must be an int, a sequence of ints or a 1-D integer tensor")
        return positions.detach().to("cpu", torch.long).flatten()
    items = [positions] if comp.is_int(positions) else list(positions)
    if not all(comp.is_int(p) for p in items):
        raise ValueError(
            f"positions must be ints (BOS is position 0; negative counts from the end), got {positions!r}"
        )
    return torch.tensor(items, dtype=torch.long)


def _long(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


def _hook_interventions(
    name: str,
    members: Sequence[Component],
    positions: torch.Tensor | None,
    *,
    op: str,
    source: Any,
    source_shape: str,
) -> list[Intervention]:
    """The interventions editing ``members`` (components at hook ``name``), cells never twice.

    Free components (no ``pos``) are edited at ``positions`` (``None``: every real token),
    pinned ones at their own position. With explicit positions, free and pinned cells go into
    one intervention (its cells are a set, so a cell named by both is edited once); with every
    position, a pinned component of a unit that is also free is already covered and dropped.
    """
    indexed = comp.SITES[members[0].site].index is not None
    free = [c.index if indexed else None for c in members if c.pos is None]
    pinned = [(c.pos, c.index if indexed else None) for c in members if c.pos is not None]
    kw = dict(op=op, source=source, source_shape=source_shape)
    out = []
    if positions is None:
        if free:
            out.append(Intervention(name, **kw, units=_long(free) if indexed else None))
            covered = set(free)
            pinned = [(p, u) for p, u in pinned if indexed and u not in covered]
        if pinned:
            pos = _long([p for p, _ in pinned])
            out.append(Intervention(name, **kw, positions=pos, units=_long([u for _, u in pinned]) if indexed else None))
        return out
    pos_list: list[torch.Tensor] = []
    unit_list: list[torch.Tensor] = []
    if free:
        if indexed:
            grid_p, grid_u = torch.broadcast_tensors(positions[:, None], _long(free)[None, :])
            pos_list.append(grid_p.flatten())
            unit_list.append(grid_u.flatten())
        else:
            pos_list.append(positions)
    if pinned:
        pos_list.append(_long([p for p, _ in pinned]))
        if indexed:
            unit_list.append(_long([u for _, u in pinned]))
    return [
        Intervention(
            name, **kw, positions=torch.cat(pos_list), units=torch.cat(unit_list) if indexed else None
        )
    ]


class ActivationEdit:
    """A reversible edit of a circuit's activations (the ``mechedit.edit.Edit`` protocol).

    Args:
        model: a TransformerBridge; the circuit is validated against it, means are computed on
            it, and ``apply()`` / ``revert()`` / ``with edit:`` without a model use it.
        circuit: a ``Circuit`` or components (no weight partitions).
        mode: ``"zero"`` sets the units to 0; ``"mean"`` to their mean over ``reference`` (see the
            module docstring for the convention); ``"scale"`` multiplies them by ``scale``.
        reference: prompts (strings) or tokens ``[batch, pos]`` for ``mode="mean"`` only.
        scale: the factor for ``mode="scale"`` only (``0`` equals zeroing, ``2`` doubles).
        positions: positions for components without their own ``pos``; ``None`` = every real token.
        per_position: mean per position instead of over all positions (``mode="mean"``).
        exclude_bos: leave position 0 out of the position-independent mean.

    ``means`` holds the reference means by hook name, shaped like one token's activation at that
    hook (``[pos, ...]`` with ``per_position``); see ``mean_activations``. ``base`` is the
    provenance (weights hash) of the model the edit was built on.
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
        self._setup(
            circuit,
            mode=mode,
            scale=scale,
            positions=positions,
            per_position=per_position,
            exclude_bos=exclude_bos,
        )
        comp.validate_all(model, self.circuit.components)
        self.model = model
        self.architecture = architecture(model)
        self._base: Provenance | None = None
        if mode == "mean":
            # the means belong to these weights: record them now, not when first saved
            self._base = Provenance.of(model)
            self.means = mean_activations(
                model, list(self._by_hook), reference, per_position=per_position, exclude_bos=exclude_bos
            )

    def _setup(
        self,
        circuit: Circuit | Iterable[Component],
        *,
        mode: str,
        scale: float | None,
        positions: Any,
        per_position: bool,
        exclude_bos: bool,
    ) -> None:
        """Validate and store everything that does not need a model."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not known; valid modes: {', '.join(MODES)}")
        if (scale is not None) != (mode == "scale"):
            raise ValueError("mode='scale' needs scale= a number; other modes take none")
        if scale is not None and not (
            isinstance(scale, int | float) and not isinstance(scale, bool) and math.isfinite(scale)
        ):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        if (per_position or exclude_bos) and mode != "mean":
            raise ValueError("per_position and exclude_bos apply to mode='mean' only")
        self.circuit = circuit if isinstance(circuit, Circuit) else Circuit(tuple(circuit))
        if not self.circuit.components:
            raise ValueError("the circuit is empty: nothing to edit")
        weights = [c for c in self.circuit if comp.SITES[c.site].kind == "weight"]
        if weights:
            raise ValueError(
                f"{weights[0]} is a weight partition, not an activation; edit weights with "
                "mechedit.edit.weights"
            )
        self.mode = mode
        self.scale = None if scale is None else float(scale)
        self.positions = _positions_tensor(positions)
        self.per_position = bool(per_position)
        self.exclude_bos = bool(exclude_bos)
        self._by_hook = self.circuit.by_hook()
        self.means: dict[str, torch.Tensor] = {}
        self.model: Any = None
        self._model: Any = None  # the model the hooks are on, while applied
        self._stack: contextlib.ExitStack | None = None

    # --- what the edit does -------------------------------------------------------------------

    @property
    def base(self) -> Provenance:
        """Provenance of the model the edit was built on (hashed on first use for zero/scale)."""
        if self._base is None:
            if self.model is None:
                raise EditStateError("this edit has no base model recorded")
            self._base = Provenance.of(self.model)
        return self._base

    @property
    def interventions(self) -> list[Intervention]:
        """The ``Intervention`` objects this edit hooks in, hook by hook."""
        out = []
        for name, members in self._by_hook.items():
            if self.mode == "zero":
                op, source, shape = "zero", None, "token"
            elif self.mode == "scale":
                op, source, shape = "scale", self.scale, "token"
            else:
                op, source = "replace", self.means[name]
                shape = "position" if self.per_position else "token"
            out += _hook_interventions(
                name, members, self.positions, op=op, source=source, source_shape=shape
            )
        return out

    @property
    def fwd_hooks(self) -> list[tuple[str, Any]]:
        """``(hook_name, fn)`` pairs, e.g. for ``model.run_with_hooks(tokens, fwd_hooks=...)``."""
        return [i.hook() for i in self.interventions]

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

    def __repr__(self) -> str:
        state = "applied" if self.is_applied else "not applied"
        return f"ActivationEdit(mode={self.mode!r}, components={len(self.circuit)}, {state})"

    # --- apply / revert -----------------------------------------------------------------------

    @property
    def is_applied(self) -> bool:
        return self._stack is not None

    def apply(
        self, model: Any = None, *, attention_mask: Any = None, check_base: bool = True
    ) -> ActivationEdit:
        """Hook the edit into ``model`` (default: the model it was built on) until ``revert``.

        ``attention_mask`` (``Bool[batch, pos]`` or a tokenised batch) fixes the rows' real
        tokens for every forward pass while applied; leave it out to take them per batch from
        ``mechedit.interventions.real_tokens`` (or to treat rows as unpadded). On a model other
        than the one it was built on, the circuit is validated and, with ``check_base``, the
        model's weights hash must equal ``self.base``'s. Raises ``EditStateError`` if applied.
        """
        if self._stack is not None:
            raise EditStateError("this edit is already applied; revert it first")
        model = self._target(model)
        if model is not self.model:
            self._check_model(model, check_base=check_base)
        stack = contextlib.ExitStack()
        stack.enter_context(model.hooks(fwd_hooks=[i.hook(attention_mask) for i in self.interventions]))
        self._stack, self._model = stack, model
        return self

    def revert(self, model: Any = None) -> None:
        """Remove exactly the hooks ``apply`` added (other hooks stay); a no-op if not applied."""
        if self._stack is None:
            return
        if model is not None and model is not self._model:
            raise EditStateError(
                "this edit is applied to a different model object; revert it on that model"
            )
        stack, self._stack, self._model = self._stack, None, None
        stack.close()

    @contextlib.contextmanager
    def applied(
        self, model: Any = None, *, attention_mask: Any = None, check_base: bool = True
    ) -> Iterator[Any]:
        """``with edit.applied(model): ...`` applies the edit for the block and reverts on exit."""
        self.apply(model, attention_mask=attention_mask, check_base=check_base)
        try:
            yield self._model
        finally:
            self.revert()

    def __enter__(self) -> ActivationEdit:
        return self.apply()

    def __exit__(self, *exc_info: Any) -> None:
        self.revert()

    def _target(self, model: Any) -> Any:
        if model is None:
            if self.model is None:
                raise EditStateError(
                    "this edit was loaded from a file and has no model: call apply(model)"
                )
            return self.model
        return model

    def _check_model(self, model: Any, *, check_base: bool) -> None:
        if architecture(model) != self.architecture:
            raise BaseModelMismatchError(
                f"this edit is for a {self.architecture}, not a {architecture(model)}"
            )
        comp.validate_all(model, self.circuit.components)
        if check_base:
            found = weights_hash(model)
            if found != self.base.weights_hash:
                raise BaseModelMismatchError(
                    f"this edit was built on weights {self.base.weights_hash} "
                    f"({self.base.model_name}) but the model's weights hash is {found}. Load the "
                    "model it was built on, or pass check_base=False to apply it anyway."
                )

    # --- files --------------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest describing this edit (see the module docstring)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "mode": self.mode,
            "scale": self.scale,
            "positions": None if self.positions is None else self.positions.tolist(),
            "per_position": self.per_position,
            "exclude_bos": self.exclude_bos,
            "architecture": self.architecture,
            "circuit": self.circuit.to_dict(),
            "base": self.base.to_dict(),
            "means": {
                name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                for name, t in self.means.items()
            },
        }

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``manifest.json`` (and ``means.safetensors`` for mean ablation) to ``out_dir``."""
        out = Path(out_dir)
        if (out / MANIFEST_FILE).exists() and not overwrite:
            raise FileExistsError(
                f"{out} already holds a saved edit; pass overwrite=True to replace it"
            )
        manifest = self.manifest()
        out.mkdir(parents=True, exist_ok=True)
        if self.means:
            _write_tensors(out / MEANS_FILE, self.means)
        else:
            (out / MEANS_FILE).unlink(missing_ok=True)
        _write_manifest(out / MANIFEST_FILE, manifest)
        return out

    @classmethod
    def load(cls, edit_dir: str | os.PathLike) -> ActivationEdit:
        """Read an edit saved by ``save``; ``EditFormatError`` says what is wrong.

        The loaded edit has no model: apply it with ``apply(model)`` / ``applied(model)``, which
        refuses a model whose weights differ from the one it was built on.
        """
        folder = Path(edit_dir)
        path = folder / MANIFEST_FILE
        data = _read_manifest(path)
        where = str(path)
        err = EditFormatError
        for key in ("mode", "architecture"):
            check_type(data[key], str, error=err, where=f"{where}: {key!r}")
        check_type(data["scale"], (int, float, type(None)), error=err, where=f"{where}: 'scale'")
        check_type(data["positions"], (list, type(None)), error=err, where=f"{where}: 'positions'")
        for key in ("per_position", "exclude_bos"):
            check_type(data[key], bool, error=err, where=f"{where}: {key!r}")
        check_type(data["means"], dict, error=err, where=f"{where}: 'means'")
        try:
            circuit = Circuit.from_dict(data["circuit"], where=f"{where}: 'circuit'")
            base = Provenance.from_dict(data["base"])
        except (CircuitFormatError, TypeError, ValueError) as e:
            raise err(f"{where}: {e}") from None
        edit = cls.__new__(cls)
        try:
            edit._setup(
                circuit,
                mode=data["mode"],
                scale=data["scale"],
                positions=data["positions"],
                per_position=data["per_position"],
                exclude_bos=data["exclude_bos"],
            )
        except ValueError as e:
            raise err(f"{where}: {e}") from None
        hooks = set(edit._by_hook)
        expected = hooks if edit.mode == "mean" else set()
        if set(data["means"]) != expected:
            raise err(
                f"{where}: 'means' must list exactly the hooks of a mean ablation's circuit "
                f"{sorted(expected)}, got {sorted(data['means'])}"
            )
        edit.means = _read_tensors(folder / MEANS_FILE, data["means"]) if expected else {}
        edit.architecture = data["architecture"]
        edit._base = base
        return edit


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


# --- files -----------------------------------------------------------------------------------


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    write_json_atomic(path, dict(manifest))


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    write_tensors(path, tensors, metadata={"format": FORMAT})


def _read_manifest(path: Path) -> dict[str, Any]:
    data = read_json(
        path,
        fmt=FORMAT,
        version=VERSION,
        error=EditFormatError,
        expected="the folder written by ActivationEdit.save (manifest.json)",
    )
    check_keys(data, required=_MANIFEST_FIELDS, error=EditFormatError, where=str(path))
    return data


def _read_tensors(path: Path, specs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(specs, Mapping) or not all(
        isinstance(s, Mapping) and set(s) == {"shape", "dtype"} for s in specs.values()
    ):
        raise EditFormatError(f"{path}: the manifest's 'means' must map names to {{shape, dtype}}")
    tensors = read_tensors(
        path,
        error=EditFormatError,
        expected="a complete edit folder: ActivationEdit.save writes means.safetensors beside manifest.json (the folder is incomplete)",
        specs={n: (s["shape"], s["dtype"]) for n, s in specs.items()},
        described_in="the manifest",
    )
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise EditFormatError(f"{path}: means {bad} hold NaN or infinite values")
    return tensors


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
    on the activations' device and returned in their dtype; runs the model as it is (hooks
    already applied count).
    """
    # dropout in train mode would make the means random (measured: ~0.07 apart on a GPT-2)
    require_eval_mode(model, what="mean_activations")
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

    device = model_device(model)
    for tokens in batches:
        with model.hooks(fwd_hooks=[(name, accumulate(name)) for name in names]):
            model(tokens.to(device))
        count += tokens.shape[0] * (1 if per_position else tokens.shape[1] - start)
    return {name: (sums[name] / count).to(dtypes[name]) for name in names}


__all__ = ["FORMAT", "MODES", "VERSION", "ActivationEdit", "ablate", "mean_activations"]
