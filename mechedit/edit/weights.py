"""Weight edits: "these HF tensors now hold these values", applied, reverted, saved and loaded.

A ``WeightEdit`` stores the full new value of every tensor it changes, under plain Hugging Face
parameter names, together with the weights hash of the model it was built for (the base) and of the
edited result. Every edit kind is a thin constructor over that one form:

* ``zero_neurons(model, neurons=[(layer, j), ...])`` zeroes MLP neurons in the weights;
* ``WeightEdit.from_new_tensors(model, {hf_name: tensor})`` for any computed update (a PCGU
  partition step, a masked fine-tune's result);
* ``WeightEdit.from_diff(before, after)`` for whatever differs between two models;
* ``with WeightEdit.recording(model, names) as rec: <train>`` then ``rec.edit`` for whatever a
  training loop did to the named parameters (already applied; ``rec.edit.revert(model)``
  restores the snapshot bit-exactly).

New values must be finite: an edit holding NaN or infinity is refused when it is built.

On disk an edit is a folder: ``tensors.safetensors`` (only the changed tensors, HF names) and
``manifest.json``::

    {"format": "mechedit.weight_edit", "version": 1,
     "kind": "zero_neurons", "params": {"neurons": [[0, 3], [1, 17]]},
     "architecture": "GPT2LMHeadModel",
     "tensors": {"transformer.h.0.mlp.c_fc.weight": {"shape": [64, 256], "dtype": "float32"}, ...},
     "tensors_hash": "<artifacts.tensors_hash of the file's tensors>",
     "base": {<Provenance of the model before>}, "result": {<Provenance of the model after>}}

Both files are written atomically, the manifest last. ``tensors_hash`` was added within version 1:
manifests without it still load (their tensors are checked by name, shape and dtype only).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechedit.artifacts import (
    ArtifactError,
    ModelMismatchError,
    check_keys,
    check_type,
    parse_dtype,
    read_json,
    read_provenance,
    read_tensors,
    tensors_hash,
    write_json_atomic,
    write_tensors,
)
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.hf import architecture, circuit_parameters, hf_parameters
from mechedit.provenance import Provenance, weights_hash

FORMAT = "mechedit.weight_edit"
VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"
_MANIFEST_FIELDS = (
    "format",
    "version",
    "kind",
    "params",
    "architecture",
    "tensors",
    "base",
    "result",
)


class EditFormatError(ArtifactError):
    """A saved edit folder that is missing, malformed, from another format version, or inconsistent."""


class BaseModelMismatchError(ModelMismatchError):
    """An edit applied to a model whose weights are not the ones the edit was built for."""


class EditStateError(RuntimeError):
    """apply/revert called out of order (applied twice, reverted before apply, another model)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class WeightEdit:
    """New values for some HF parameters of one model, with the base and result weight hashes.

    ``new_tensors`` maps HF parameter names (``hf_state_dict(model).keys()``) to the full tensor
    each parameter holds after the edit; parameters not named are untouched. Tied names (GPT-2's
    ``lm_head.weight`` / ``transformer.wte.weight``) are one tensor: give either, or both equal.

    The edit itself is immutable; it tracks only which model it is currently applied to and that
    model's original values, so ``revert`` restores them bit-exactly. Build one with a constructor
    (``zero_neurons``, ``from_new_tensors``, ``from_diff``) or ``WeightEdit.load``.
    """

    def __init__(
        self,
        *,
        kind: str,
        params: Mapping[str, Any],
        architecture: str,
        new_tensors: Mapping[str, Tensor],
        base: Provenance,
        result: Provenance,
    ) -> None:
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string naming the edit kind, got {kind!r}")
        try:
            params = json.loads(json.dumps(dict(params), allow_nan=False))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"params must be JSON-serialisable (lists, numbers, strings): {err}"
            ) from None
        if not new_tensors:
            raise ValueError("an edit needs at least one changed tensor")
        bad = [
            n for n, t in new_tensors.items() if not isinstance(n, str) or not isinstance(t, Tensor)
        ]
        if bad:
            raise TypeError(
                f"new_tensors must map HF parameter names to tensors; bad entries: {bad}"
            )
        if not isinstance(base, Provenance) or not isinstance(result, Provenance):
            raise TypeError("base and result must be mechedit.provenance.Provenance objects")
        _check_finite(new_tensors)
        self.kind = kind
        self.params: Mapping[str, Any] = MappingProxyType(params)
        self.architecture = architecture
        self._new = {n: t.detach().to("cpu").clone().contiguous() for n, t in new_tensors.items()}
        self.base = base
        self.result = result
        self._model: torch.nn.Module | None = None
        self._originals: dict[str, Tensor] | None = None

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def from_new_tensors(
        cls,
        model: torch.nn.Module,
        new_tensors: Mapping[str, Tensor],
        *,
        kind: str = "new_tensors",
        params: Mapping[str, Any] | None = None,
    ) -> WeightEdit:
        """An edit setting each named HF parameter of ``model`` to the given tensor.

        ``model`` is not changed: the result hash is measured by writing the tensors in, hashing,
        and restoring the originals. Shapes and dtypes must equal the parameters'.
        """
        live = hf_parameters(model, tied_aliases=True)
        _check_tensors(live, new_tensors, where="new_tensors")
        _check_ties(live, new_tensors)
        base = Provenance.of(model)
        originals = {n: live[n].detach().clone() for n in new_tensors}
        try:
            _write(live, new_tensors)
            result = Provenance.of(model)
        finally:
            _write(live, originals)
        return cls(
            kind=kind,
            params=params or {},
            architecture=architecture(model),
            new_tensors=new_tensors,
            base=base,
            result=result,
        )

    @classmethod
    def from_diff(
        cls,
        before: torch.nn.Module,
        after: torch.nn.Module,
        *,
        kind: str = "diff",
        params: Mapping[str, Any] | None = None,
    ) -> WeightEdit:
        """The edit turning ``before`` into ``after`` (two models of one architecture and shape).

        Only parameters whose values differ are stored; of tied names, the first in HF order.
        """
        if architecture(before) != architecture(after):
            raise ValueError(
                f"cannot diff a {architecture(before)} against a {architecture(after)}"
            )
        old = {n: p.detach() for n, p in hf_parameters(before).items()}
        live_after = hf_parameters(after)
        _check_tensors(live_after, old, where="the 'before' model")
        changed: dict[str, Tensor] = {}
        seen: set[int] = set()
        for name, param in live_after.items():
            if id(param) in seen or bitwise_equal(param.detach(), old[name].to(param.device)):
                continue
            seen.add(id(param))
            changed[name] = param.detach()
        if not changed:
            raise ValueError("the two models have identical weights: there is no edit to make")
        return cls(
            kind=kind,
            params=params or {},
            architecture=architecture(after),
            new_tensors=changed,
            base=Provenance.of(before),
            result=Provenance.of(after),
        )

    @classmethod
    @contextmanager
    def recording(
        cls,
        model: torch.nn.Module,
        params: Iterable[str] | Circuit,
        *,
        kind: str = "recorded",
        params_meta: Mapping[str, Any] | None = None,
    ) -> Iterator[Recording]:
        """Snapshot parameters, let any training run in the block, and record what it changed.

        ``params`` names HF parameters (``hf_parameters(model)`` keys) or is a ``Circuit``, whose
        parameters ``mechedit.hf.circuit_parameters(model, circuit)`` lists (its masks are kept
        on the handle as ``masks``). Inside the block, change those parameters in place however
        you like (an optimiser over them, ``copy_``); the snapshot is taken on entry. On a clean
        exit the handle's ``edit`` is a ``WeightEdit`` (``kind``, ``params_meta`` as its params)
        holding the new values of every recorded parameter that changed, with ``base`` = the
        snapshot and ``result`` = the model now; it is **already applied** to ``model``, so the
        model stays trained until ``handle.edit.revert(model)`` restores the snapshot
        bit-exactly. Nothing is restored on exit; after an exception ``handle.restore()`` puts
        the snapshot back. Changing other parameters in the block is not recorded (and makes
        ``result`` describe them too): keep training to the recorded ones.
        """
        masks: dict[str, Tensor] | None = None
        if isinstance(params, Circuit):
            from mechedit.hf import circuit_parameters  # late: added to mechedit.hf in parallel

            masks = dict(circuit_parameters(model, params))
            names = list(masks)
        elif isinstance(params, str):
            raise ValueError(f"params must be a list of parameter names, not one string: [{params!r}]")
        else:
            names = list(dict.fromkeys(params))
        if not names:
            raise ValueError("nothing to record: params names no parameter")
        live = hf_parameters(model)
        unknown = [n for n in names if n not in live]
        if unknown:
            raise KeyError(
                f"params names {unknown}, which are not editable HF parameters of this model; "
                "see mechedit.hf.hf_parameters(model).keys()"
            )
        handle = Recording(
            model=model,
            snapshot={n: live[n].detach().clone() for n in names},
            base=Provenance.of(model),
            masks=masks,
        )
        yield handle
        handle._finish(cls, kind=kind, params=params_meta or {})

    # --- what the edit holds ------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """HF names of the tensors this edit writes."""
        return tuple(self._new)

    @property
    def new_tensors(self) -> Mapping[str, Tensor]:
        """HF name -> new value (CPU, read-only view; do not modify the tensors in place)."""
        return MappingProxyType(self._new)

    @property
    def is_applied(self) -> bool:
        return self._model is not None

    def __repr__(self) -> str:
        state = "applied" if self.is_applied else "not applied"
        return (
            f"WeightEdit(kind={self.kind!r}, tensors={len(self._new)}, "
            f"base={self.base.weights_hash}, result={self.result.weights_hash}, {state})"
        )

    # --- apply / revert -----------------------------------------------------------------------

    def apply(self, model: torch.nn.Module, *, check_base: bool = True) -> WeightEdit:
        """Write the new tensors into ``model`` in place; returns ``self``.

        With ``check_base`` (the default) the model's weights hash must equal ``self.base``'s, so
        an edit cannot land on a different checkpoint or on top of another edit unnoticed; pass
        ``check_base=False`` to apply anyway (shapes are still checked).
        """
        if self._model is not None:
            raise EditStateError(
                "this edit is already applied to a model; revert it first (edit.revert(model)), "
                "or load a second copy (WeightEdit.load) to apply it to another model"
            )
        self._check_architecture(model)
        live = hf_parameters(model, tied_aliases=True)
        absent = [n for n in self._new if n not in live]
        if absent:
            # same architecture, other shape (e.g. fewer layers): not the model the edit is for
            raise BaseModelMismatchError(
                f"this edit writes {absent[:3]}{' ...' if len(absent) > 3 else ''}, which this "
                f"{architecture(model)} does not have: it was built for another model "
                f"({self.base.model_name}, weights {self.base.weights_hash})"
            )
        _check_tensors(live, self._new, where="this edit")
        if check_base:
            found = weights_hash(model)
            if found != self.base.weights_hash:
                raise BaseModelMismatchError(
                    f"this edit was built for weights {self.base.weights_hash} "
                    f"({self.base.model_name}) but the model's weights hash is {found}"
                    + (" (it already holds this edit)" if found == self.result.weights_hash else "")
                    + ". Load the base model it was made from, or pass check_base=False to apply it anyway."
                )
        originals = {n: live[n].detach().clone() for n in self._new}
        _write(live, self._new)
        self._model, self._originals = model, originals
        return self

    def revert(self, model: torch.nn.Module) -> None:
        """Restore the parameters this edit changed, bit-exactly, on the model it was applied to."""
        if self._model is None or self._originals is None:
            raise EditStateError(
                "this edit is not applied, so there is nothing to revert; call apply(model) first"
            )
        if model is not self._model:
            raise EditStateError(
                "this edit was applied to a different model object; revert it on that model"
            )
        live = hf_parameters(model, tied_aliases=True)
        # Restoring over later changes would silently undo them too, so refuse.
        moved = [n for n in self._new if not bitwise_equal(live[n].detach().cpu(), self._new[n])]
        if moved:
            raise EditStateError(
                f"parameters {moved} changed after this edit was applied (another edit or training "
                "on top?); revert the later change first, or reload the model"
            )
        _write(live, self._originals)
        self._model, self._originals = None, None

    @contextmanager
    def applied(
        self, model: torch.nn.Module, *, check_base: bool = True
    ) -> Iterator[torch.nn.Module]:
        """``with edit.applied(model): ...`` applies the edit for the block and reverts on exit."""
        self.apply(model, check_base=check_base)
        try:
            yield model
        finally:
            self.revert(model)

    def _check_architecture(self, model: torch.nn.Module) -> None:
        if architecture(model) != self.architecture:
            raise BaseModelMismatchError(
                f"this edit is for a {self.architecture}, not a {architecture(model)}"
            )

    # --- files --------------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest describing this edit (see the module docstring)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "params": dict(self.params),
            "architecture": self.architecture,
            "tensors": {
                n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
                for n, t in self._new.items()
            },
            "base": self.base.to_dict(),
            "result": self.result.to_dict(),
        }

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``manifest.json`` and ``tensors.safetensors`` (changed tensors only) to ``out_dir``.

        Both atomically, the manifest last (with the tensors' hash), so a folder with a manifest
        holds a complete edit. Refuses to replace a saved edit unless ``overwrite``.
        """
        out = Path(out_dir)
        if (out / MANIFEST_FILE).exists() and not overwrite:
            raise FileExistsError(
                f"{out} already holds a saved edit; pass overwrite=True to replace it"
            )
        manifest = {**self.manifest(), "tensors_hash": tensors_hash(self._new)}
        write_tensors(out / TENSORS_FILE, self._new, metadata={"format": FORMAT})
        write_json_atomic(out / MANIFEST_FILE, manifest)
        return out

    @classmethod
    def load(cls, edit_dir: str | Path) -> WeightEdit:
        """Read an edit saved by ``save``; raises ``EditFormatError`` (only) saying what is wrong."""
        folder = Path(edit_dir)
        if folder.is_file():
            raise EditFormatError(
                f"{folder} is a file; pass the folder written by WeightEdit.save "
                f"({MANIFEST_FILE} + {TENSORS_FILE})"
            )
        manifest = _read_manifest(folder / MANIFEST_FILE)
        tensors = _read_tensors(
            folder / TENSORS_FILE, manifest["tensors"], manifest.get("tensors_hash")
        )
        try:
            return cls(
                kind=manifest["kind"],
                params=manifest["params"],
                architecture=manifest["architecture"],
                new_tensors=tensors,
                base=manifest["base"],
                result=manifest["result"],
            )
        except (TypeError, ValueError) as err:  # e.g. the constructor's own checks of the values
            raise EditFormatError(f"{folder}: {err}") from None


class Recording:
    """What ``WeightEdit.recording`` yields: the snapshot, and ``edit`` once the block has ended.

    Attributes:
        model: the recorded model.
        snapshot: HF name -> the parameter's value on entry (a clone, on the model's device).
        base: provenance of the model on entry.
        masks: for a recorded ``Circuit``, HF name -> boolean mask of the entries it covers
            (``mechedit.hf.circuit_parameters``); ``None`` for names.
        edit: the resulting ``WeightEdit`` (applied to ``model``), ``None`` until a clean exit.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        snapshot: dict[str, Tensor],
        base: Provenance,
        masks: dict[str, Tensor] | None,
    ) -> None:
        self.model = model
        self.snapshot = snapshot
        self.base = base
        self.masks = masks
        self.edit: WeightEdit | None = None

    def restore(self) -> None:
        """Write the snapshot back into the model, bit-exactly (also after an exception)."""
        if self.edit is not None and self.edit.is_applied:
            self.edit.revert(self.model)
            return
        _write(hf_parameters(self.model), self.snapshot)

    def _finish(self, cls: type[WeightEdit], *, kind: str, params: Mapping[str, Any]) -> None:
        live = hf_parameters(self.model)
        changed: dict[str, Tensor] = {}
        seen: set[int] = set()
        for name, old in self.snapshot.items():
            param = live[name]
            if id(param) in seen or bitwise_equal(param.detach(), old):
                continue
            seen.add(id(param))
            changed[name] = param.detach()
        if not changed:
            raise ValueError(
                f"the block changed none of the {len(self.snapshot)} recorded parameters: there "
                "is no edit to record (did the optimiser get these parameters?)"
            )
        try:
            edit = cls(
                kind=kind,
                params=params,
                architecture=architecture(self.model),
                new_tensors=changed,
                base=self.base,
                result=Provenance.of(self.model),
            )
        except ValueError as err:
            raise ValueError(
                f"{err}. The model still holds the trained values; handle.restore() puts the "
                "snapshot back"
            ) from None
        # The model already holds the result: mark it applied, with the snapshot to revert to.
        edit._model = self.model
        edit._originals = {n: self.snapshot[n] for n in changed}
        self.edit = edit


def zero_neurons(
    model: torch.nn.Module,
    neurons: Iterable[Sequence[int]] | Int[Tensor, "n 2"] | Circuit,
) -> WeightEdit:
    """An edit zeroing MLP neurons ``[(layer, j), ...]`` in the weights (kind ``"zero_neurons"``).

    ``neurons`` may also be a ``Circuit`` of ``neuron`` components without pinned positions.

    For each neuron it zeroes every slice ``mechedit.hf.NEURON_LAYOUTS`` lists for the model's
    architecture (the masks ``mechedit.hf.circuit_parameters`` gives for the neurons). For GPT-2
    (``Conv1D``, weights ``[in, out]``): column ``j`` of
    ``transformer.h.{layer}.mlp.c_fc.weight`` ``[d_model, d_mlp]``, entry ``j`` of ``c_fc.bias``
    ``[d_mlp]`` and row ``j`` of ``mlp.c_proj.weight`` ``[d_mlp, d_model]``; ``c_proj.bias`` is
    shared and kept. The effect equals zeroing ``blocks.{layer}.mlp.hook_post[..., j]``.
    Duplicates are dropped; the manifest lists the neurons sorted, as ``[[layer, j], ...]``.
    """
    pairs = _neuron_pairs(neurons)
    cfg = model.cfg
    out_of_range = [
        (layer, j)
        for layer, j in pairs.tolist()
        if not (0 <= layer < cfg.n_layers and 0 <= j < cfg.d_mlp)
    ]
    if out_of_range:
        raise ValueError(
            f"neurons {out_of_range} are outside this model: layers are 0..{cfg.n_layers - 1} "
            f"and neuron indices 0..{cfg.d_mlp - 1}"
        )
    masks = circuit_parameters(
        model, [Component("neuron", layer, neuron=j) for layer, j in pairs.tolist()]
    )
    live = hf_parameters(model)
    new = {name: live[name].detach().masked_fill(mask, 0.0) for name, mask in masks.items()}
    return WeightEdit.from_new_tensors(
        model, new, kind="zero_neurons", params={"neurons": pairs.tolist()}
    )


# --- helpers ------------------------------------------------------------------------------------


def _neuron_pairs(neurons: Iterable[Sequence[int]] | Tensor | Circuit) -> Tensor:
    """Sorted unique ``[n, 2]`` long tensor of (layer, index) from pairs, a tensor or a circuit."""
    if isinstance(neurons, Circuit):
        others = [c for c in neurons if c.site != "neuron" or c.pos is not None]
        if others:
            raise ValueError(
                "a weight edit zeroes whole neurons at every position; the circuit also holds "
                f"{others[:3]} (other sites or pinned positions): use an activation edit "
                "(mechedit.edit.ablate) for those"
            )
        neurons = [(c.layer, c.neuron) for c in neurons]
    try:
        pairs = torch.as_tensor(neurons if isinstance(neurons, Tensor) else list(neurons))
    except (TypeError, ValueError) as err:
        raise ValueError(f"neurons must be (layer, index) pairs of ints: {err}") from None
    if pairs.numel() == 0:
        raise ValueError("neurons is empty: give at least one (layer, index) pair")
    if (
        pairs.dim() != 2
        or pairs.shape[1] != 2
        or pairs.is_floating_point()
        or pairs.dtype == torch.bool
    ):
        raise ValueError(
            f"neurons must be (layer, index) pairs of ints, e.g. [(0, 3), (1, 17)]; got shape "
            f"{tuple(pairs.shape)} of {pairs.dtype}"
        )
    return torch.unique(pairs.long(), dim=0)  # unique(dim=0) also sorts by layer, then index


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """True when two tensors have one shape and dtype and identical bits (NaN equals itself).

    ``torch.equal`` says NaN != NaN and 0.0 == -0.0; restoring or comparing weights needs the
    stored bits, so floating tensors are compared as integers of the same width.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
            width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.to(a.device).contiguous().view(width))
    return torch.equal(a, b.to(a.device))


def _check_finite(tensors: Mapping[str, Tensor]) -> None:
    bad = {
        n: int((~torch.isfinite(t)).sum())
        for n, t in tensors.items()
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    }
    if bad:
        raise ValueError(
            "an edit must hold finite values; NaN or infinite entries (count per tensor): "
            f"{bad}. Check the update that produced them (a diverged training step?)"
        )


def _check_tensors(live: Mapping[str, Tensor], new: Mapping[str, Tensor], *, where: str) -> None:
    unknown = [n for n in new if n not in live]
    if unknown:
        raise KeyError(
            f"{where} names {unknown}, which are not editable HF parameters of this model; "
            "see mechedit.hf.hf_parameters(model).keys()"
        )
    wrong = {
        n: f"{tuple(t.shape)} {_dtype_name(t.dtype)} vs model {tuple(live[n].shape)} {_dtype_name(live[n].dtype)}"
        for n, t in new.items()
        if t.shape != live[n].shape or t.dtype != live[n].dtype
    }
    if wrong:
        raise ValueError(f"{where} does not fit this model (shape/dtype): {wrong}")


def _check_ties(live: Mapping[str, torch.nn.Parameter], new: Mapping[str, Tensor]) -> None:
    by_param: dict[int, str] = {}
    for name, tensor in new.items():
        other = by_param.setdefault(id(live[name]), name)
        if other != name and not bitwise_equal(new[other], tensor):
            raise ValueError(
                f"{other!r} and {name!r} are one tied parameter but were given different values; "
                "give only one of them"
            )


@torch.no_grad()
def _write(live: Mapping[str, torch.nn.Parameter], values: Mapping[str, Tensor]) -> None:
    # In place, so the bridge's views of these tensors (attn.q/k/v ...) see the new values.
    for name, value in values.items():
        live[name].copy_(value)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest, with ``base`` / ``result`` as ``Provenance`` and dtypes as names."""
    err = EditFormatError
    data = read_json(
        path,
        fmt=FORMAT,
        version=VERSION,
        error=err,
        expected=f"the folder written by WeightEdit.save ({MANIFEST_FILE} + {TENSORS_FILE})",
    )
    check_keys(data, required=_MANIFEST_FIELDS, optional=("tensors_hash",), error=err, where=str(path))
    for key in ("kind", "architecture"):
        if not isinstance(data[key], str) or not data[key]:
            raise err(f"{path}: {key!r} must be a non-empty string, got {data[key]!r:.60}")
    check_type(data["params"], dict, error=err, where=f"{path}: 'params'")
    check_type(data.get("tensors_hash", ""), str, error=err, where=f"{path}: 'tensors_hash'")
    if data["kind"] == "zero_neurons":
        neurons = data["params"].get("neurons")
        if not (
            isinstance(neurons, list)
            and neurons
            and all(
                isinstance(p, list) and len(p) == 2 and all(type(v) is int and v >= 0 for v in p)
                for p in neurons
            )
        ):
            raise err(
                f"{path}: params.neurons must be a non-empty list of [layer, index] pairs of "
                f"non-negative integers, got {neurons!r:.80}"
            )
    tensors = data["tensors"]
    if not isinstance(tensors, dict) or not tensors:
        raise err(f"{path}: 'tensors' must be a non-empty object of name -> {{shape, dtype}}")
    for name, spec in tensors.items():
        ok = (
            isinstance(spec, dict)
            and set(spec) == {"shape", "dtype"}
            and isinstance(spec["shape"], list)
            and all(type(d) is int and d >= 0 for d in spec["shape"])
        )
        if not ok:
            raise err(
                f"{path}: tensors[{name!r}] must be {{'shape': [ints], 'dtype': 'float32'|...}}, "
                f"got {spec!r:.80}"
            )
        parse_dtype(spec["dtype"], error=err, where=f"{path}: tensors[{name!r}]['dtype']")
    for key in ("base", "result"):
        check_type(data[key], dict, error=err, where=f"{path}: {key!r} provenance")
        data[key] = read_provenance(data[key], error=err, where=f"{path}: bad {key!r} provenance")
    return data


def _read_tensors(
    path: Path, specs: Mapping[str, Mapping[str, Any]], expected_hash: str | None = None
) -> dict[str, Tensor]:
    """The edit's tensors, checked against the manifest's names, shapes, dtypes and hash."""
    if not path.is_file():
        raise EditFormatError(
            f"{path} not found: the edit folder is incomplete (it needs {MANIFEST_FILE} and "
            f"{TENSORS_FILE}, as WeightEdit.save writes them)"
        )
    return read_tensors(
        path,
        error=EditFormatError,
        expected="a folder written by WeightEdit.save",
        specs={n: (s["shape"], s["dtype"]) for n, s in specs.items()},
        hash=expected_hash,
        described_in="the manifest",
    )


__all__ = [
    "FORMAT",
    "VERSION",
    "BaseModelMismatchError",
    "EditFormatError",
    "EditStateError",
    "Recording",
    "WeightEdit",
    "bitwise_equal",
    "zero_neurons",
]
