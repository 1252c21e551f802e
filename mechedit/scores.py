"""Scores: what every locator returns — a tensor with named axes and what it was computed from.

A ``Scores`` is a float tensor whose axes carry names such as ``("layer", "neuron")``,
``("layer", "pos")`` or ``("layer", "head")``, plus the site the cells refer to, the method and
its configuration, provenance, and optional labels per axis (e.g. token strings for ``"pos"``).

Axis conventions, so that a cell maps to exactly one ``Component``:

- ``layer`` index ``i`` is block ``i``; ``pos`` index ``i`` is token position ``i`` (BOS
  included); ``head`` / ``neuron`` index ``i`` is that head / neuron. A method that scores only some
  layers or positions fills the others with NaN; selection skips NaN cells.
- ``partition`` is one flat axis over weight units, described by a ``PartitionTable`` of
  ``(param, offset, size)`` rows: entries ``offset .. offset + size - 1`` are units
  ``0 .. size - 1`` of ``param`` (build it with ``PartitionTable.from_sizes(
  components.partition_sizes(model))``). Small hand-made axes may instead carry one
  ``components.partition_key(param, unit)`` label per entry (the only form of version 1 files).
- Any other axis (``"prompt"``, ``"step"``, ...) is allowed for storage and plotting; reduce it away
  with ``reduce`` before selecting components.

The sign and units of the values are the method's (its docstring states them); selection ranks by
value or by absolute value, highest first. Files: the tensor in ``<stem>.safetensors`` and a JSON
sidecar ``<stem>.json`` with everything else, checked against each other on load (shape, dtype and
a hash of the tensor). Sidecar version 2 adds ``"partitions"`` (the table as
``{"columns": ["param", "offset", "size"], "rows": [[param, offset, size], ...]}`` or ``null``);
version 1 files (labels only) still load.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float

from mechedit import components as comp
from mechedit.artifacts import (
    ArtifactError,
    check_json_able,
    check_keys,
    check_model,
    check_type,
    dtype_name,
    read_json,
    read_provenance,
    read_tensors,
    tensors_hash,
    write_json_atomic,
    write_tensors,
)
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.provenance import Provenance

SCORES_FORMAT = "mechedit.scores"
SCORES_VERSION = 2  # 2 added "partitions" (the partition axis as a table); 1 is still read

# Axes that name a Component field; "partition" maps to (param, unit) through its labels.
COMPONENT_AXES = ("layer", "pos", "head", "neuron", "partition")
# Index axes are tied to one site each: a "head" axis on neuron scores is a mistake.
_INDEX_AXES = ("head", "neuron", "partition")

Ranking = Literal["value", "abs"]
_REDUCERS = {"mean": torch.mean, "sum": torch.sum, "max": torch.amax, "min": torch.amin}


class ScoresFormatError(ArtifactError):
    """A scores file pair that does not follow the format; the message says what and where."""


@dataclass(frozen=True)
class PartitionTable:
    """The entries of a ``partition`` axis as ``(param, offset, size)`` rows.

    Entry ``offset + u`` of the axis is unit ``u`` (``0 <= u < size``) of parameter ``param``
    (its plain HF name; units as ``components.partition_sizes`` counts them). Rows are in axis
    order, contiguous from 0 (each offset is the previous offset plus size), every param once,
    every size >= 1, so the axis has ``sum(sizes)`` entries and a lookup is one binary search.

    Args:
        rows: ``((param, offset, size), ...)``; ``from_sizes`` builds them from ``{param: size}``.
    """

    rows: tuple[tuple[str, int, int], ...]

    def __post_init__(self) -> None:
        rows = tuple(tuple(r) if isinstance(r, Sequence) else r for r in self.rows)
        expected_offset, seen = 0, set()
        for i, row in enumerate(rows):
            if not (
                isinstance(row, tuple)
                and len(row) == 3
                and isinstance(row[0], str)
                and row[0]
                and comp.is_int(row[1])
                and comp.is_int(row[2])
            ):
                raise ValueError(
                    f"partition row {i} must be (param name, offset int, size int), got {row!r:.80}"
                )
            param, offset, size = row
            if param in seen:
                raise ValueError(f"partition row {i}: parameter {param!r} is listed twice")
            if size < 1:
                raise ValueError(f"partition row {i} ({param}): size must be >= 1, got {size}")
            if offset != expected_offset:
                raise ValueError(
                    f"partition row {i} ({param}): offset must be {expected_offset} (the previous "
                    f"rows' sizes summed), got {offset}"
                )
            seen.add(param)
            expected_offset += size
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "_starts", [r[1] for r in rows])

    @classmethod
    def from_sizes(cls, sizes: Mapping[str, int]) -> PartitionTable:
        """The table of ``{param: n_units}`` in the mapping's order (e.g. ``partition_sizes(model)``)."""
        rows, offset = [], 0
        for param, size in sizes.items():
            rows.append((param, offset, size))
            offset += size if comp.is_int(size) else 0
        return cls(tuple(rows))

    def __len__(self) -> int:
        return self.rows[-1][1] + self.rows[-1][2] if self.rows else 0

    @property
    def sizes(self) -> dict[str, int]:
        """``{param: n_units}`` in axis order."""
        return {param: size for param, _, size in self.rows}

    def locate(self, index: int) -> tuple[str, int]:
        """``(param, unit)`` of axis entry ``index`` (``0 <= index < len(self)``)."""
        if not 0 <= index < len(self):
            raise ValueError(f"partition index {index} out of range for {len(self)} entries")
        param, offset, _ = self.rows[bisect.bisect_right(self._starts, index) - 1]
        return param, index - offset

    def labels(self) -> tuple[str, ...]:
        """One ``partition_key(param, unit)`` per entry (for plots; millions of strings on big models)."""
        return tuple(comp.partition_key(p, u) for p, _, size in self.rows for u in range(size))

    def to_json(self) -> dict[str, Any]:
        """``{"columns": ["param", "offset", "size"], "rows": [[param, offset, size], ...]}``."""
        return {"columns": ["param", "offset", "size"], "rows": [list(r) for r in self.rows]}

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> PartitionTable:
        """Inverse of ``to_json``; ``ScoresFormatError`` naming ``where`` if malformed."""
        err = ScoresFormatError
        check_type(data, dict, error=err, where=where)
        check_keys(data, required=("columns", "rows"), error=err, where=where)
        if data["columns"] != ["param", "offset", "size"]:
            raise err(f"{where}: 'columns' must be ['param', 'offset', 'size'], got {data['columns']!r:.80}")
        check_type(data["rows"], list, error=err, where=f"{where}['rows']")
        try:
            return cls(tuple(tuple(r) if isinstance(r, list) else r for r in data["rows"]))
        except ValueError as e:
            raise err(f"{where}: {e}") from None


@dataclass(frozen=True, eq=False)
class Scores:
    """A locator's output: ``values`` with named ``axes`` on ``site``, and where it came from.

    Args:
        values: float tensor, one dimension per axis (detached on construction).
        axes: unique axis names, ``len(axes) == values.ndim`` (see the module docstring).
        site: the ``components.SITES`` key the cells refer to.
        method: the locating method's name.
        config: the method's configuration, JSON-serialisable.
        provenance: model, weights hash, data hash, seed, version; ``None`` only for hand-made
            scores.
        labels: optional names for the entries of an axis, ``{axis: (label, ...)}`` with one
            label per entry (e.g. token strings for ``"pos"``).
        partitions: what a ``"partition"`` axis's entries are: a ``PartitionTable`` or a
            ``{param: n_units}`` mapping (turned into one). Required for a partition axis unless
            ``labels["partition"]`` gives one ``partition_key`` per entry instead.
    """

    values: Float[torch.Tensor, "..."]
    axes: tuple[str, ...]
    site: str
    method: str
    config: Mapping[str, Any] = field(default_factory=dict)
    provenance: Provenance | None = None
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    partitions: PartitionTable | None = None

    def __post_init__(self) -> None:
        values = self.values
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"Scores.values must be a floating-point tensor, got {got}")
        object.__setattr__(self, "values", values.detach())
        axes = tuple(self.axes) if not isinstance(self.axes, str) else (self.axes,)
        if not all(isinstance(a, str) and a for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"axes must be unique non-empty strings, got {self.axes!r}")
        if len(axes) != values.ndim:
            raise ValueError(
                f"{len(axes)} axes {axes} for a tensor with {values.ndim} dimensions "
                f"{tuple(values.shape)}; give one name per dimension"
            )
        object.__setattr__(self, "axes", axes)
        allowed_index = comp.site_axes(self.site)  # also rejects an unknown site
        for axis in axes:
            if axis in _INDEX_AXES and axis not in allowed_index:
                raise ValueError(
                    f"axis {axis!r} does not fit site {self.site!r}, whose axes are {allowed_index}"
                )
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a non-empty string, got {self.method!r}")
        if not isinstance(self.config, Mapping):
            raise ValueError(f"config must be a dict, got {type(self.config).__name__}")
        object.__setattr__(self, "config", dict(self.config))
        check_json_able(self.config, "Scores.config")
        if self.provenance is not None and not isinstance(self.provenance, Provenance):
            raise ValueError(
                f"provenance must be a Provenance or None, got {type(self.provenance).__name__}"
            )
        object.__setattr__(self, "labels", self._checked_labels(self.labels))
        object.__setattr__(self, "partitions", self._checked_partitions(self.partitions))

    def _checked_partitions(self, partitions: Any) -> PartitionTable | None:
        if partitions is None:
            if "partition" in self.axes and "partition" not in self.labels:
                raise ValueError(
                    "a 'partition' axis needs partitions=PartitionTable.from_sizes("
                    "components.partition_sizes(model)) (or labels={'partition': [partition_key"
                    "(param, unit), ...]})"
                )
            return None
        if isinstance(partitions, Mapping):
            partitions = PartitionTable.from_sizes(partitions)
        if not isinstance(partitions, PartitionTable):
            raise ValueError(
                f"partitions must be a PartitionTable or {{param: size}}, got {type(partitions).__name__}"
            )
        if "partition" not in self.axes:
            raise ValueError(f"partitions given but there is no 'partition' axis in {self.axes}")
        if "partition" in self.labels:
            raise ValueError("give the partition axis as partitions= or as labels, not both")
        size = self.values.shape[self.axes.index("partition")]
        if len(partitions) != size:
            raise ValueError(
                f"the partition table covers {len(partitions)} units but the 'partition' axis has "
                f"{size} entries"
            )
        return partitions

    def _checked_labels(self, labels: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        if not isinstance(labels, Mapping):
            raise ValueError(
                f"labels must be a dict {{axis: [label, ...]}}, got {type(labels).__name__}"
            )
        out = {}
        for axis, names in labels.items():
            if axis not in self.axes:
                raise ValueError(
                    f"labels for axis {axis!r}, which is not one of the axes {self.axes}"
                )
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise ValueError(
                    f"labels for axis {axis!r} must be a list of strings, got {type(names).__name__}"
                )
            names = tuple(names)
            size = self.values.shape[self.axes.index(axis)]
            if len(names) != size or not all(isinstance(n, str) for n in names):
                raise ValueError(
                    f"axis {axis!r} has {size} entries; its labels must be {size} strings, got {len(names)}"
                )
            out[axis] = names
        for key in out.get("partition", ()):
            comp.parse_partition_key(key)
        return out

    def __repr__(self) -> str:
        return (
            f"Scores(method={self.method!r}, site={self.site!r}, axes={self.axes}, "
            f"shape={tuple(self.values.shape)})"
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    # -- cells and components ------------------------------------------------------------------

    def _check_selectable(self) -> None:
        extra = [a for a in self.axes if a not in COMPONENT_AXES]
        if extra:
            raise ValueError(
                f"axes {extra} do not name a component; reduce them first, e.g. "
                f"scores.reduce({extra[0]!r}, op='mean')"
            )
        missing = [a for a in comp.site_axes(self.site) if a not in self.axes]
        if missing:
            raise ValueError(
                f"{self.site!r} scores need axes {comp.site_axes(self.site)} to name components; "
                f"missing {missing}"
            )

    def component_at(self, *index: int) -> Component:
        """The component that cell ``values[index]`` scores (one int per axis)."""
        self._check_selectable()
        if len(index) != len(self.axes):
            raise ValueError(f"give one index per axis {self.axes}, got {index}")
        fields: dict[str, Any] = {"layer": None}
        for axis, i in zip(self.axes, index, strict=True):
            i = int(i)
            if not 0 <= i < self.values.shape[self.axes.index(axis)]:
                raise ValueError(
                    f"index {i} out of range for axis {axis!r} of size {self.values.shape[self.axes.index(axis)]}"
                )
            if axis == "partition":
                fields["param"], fields["unit"] = (
                    self.partitions.locate(i)
                    if self.partitions is not None
                    else comp.parse_partition_key(self.labels["partition"][i])
                )
            else:
                fields[axis] = i
        return Component(self.site, **fields)

    def _ranked(self, key: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Flat indices of cells where ``keep`` and the key is not NaN, highest key first.

        Ties keep tensor (row-major) order, so selection is deterministic.
        """
        flat, keep = key.flatten(), keep.flatten() & ~torch.isnan(key.flatten())
        chosen = torch.nonzero(keep).squeeze(1)
        order = torch.sort(flat[chosen], descending=True, stable=True).indices
        return chosen[order]

    def _key(self, by: Ranking, largest: bool) -> torch.Tensor:
        if by not in ("value", "abs"):
            raise ValueError(f"by must be 'value' or 'abs', got {by!r}")
        key = self.values.abs() if by == "abs" else self.values
        return key if largest else -key

    def _circuit(self, flat: torch.Tensor, selection: dict[str, Any], description: str) -> Circuit:
        self._check_selectable()
        coords = torch.unravel_index(flat, self.values.shape) if flat.numel() else ()
        cells = zip(*(c.tolist() for c in coords), strict=True) if flat.numel() else ()
        return Circuit(
            tuple(self.component_at(*cell) for cell in cells),
            method=self.method,
            config={"scores": dict(self.config), "selection": selection},
            provenance=self.provenance,
            description=description,
        )

    # -- selection -----------------------------------------------------------------------------

    def top_k(
        self, k: int, *, by: Ranking = "value", largest: bool = True, description: str = ""
    ) -> Circuit:
        """The ``k`` highest-scoring components (fewer if fewer non-NaN cells), best first.

        ``by="abs"`` ranks by magnitude; ``largest=False`` takes the lowest instead.
        """
        if not comp.is_int(k) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        self._check_selectable()
        key = self._key(by, largest)
        flat = self._ranked(key, torch.ones_like(key, dtype=torch.bool))[:k]
        return self._circuit(
            flat, {"rule": "top_k", "k": k, "by": by, "largest": largest}, description
        )

    def threshold(
        self, t: float, *, by: Ranking = "value", above: bool = True, description: str = ""
    ) -> Circuit:
        """Components whose score (or |score|) is ``>= t`` (``above``) or ``<= t``, best first."""
        self._check_selectable()
        t = float(t)
        key = self._key(by, True)
        keep = key >= t if above else key <= t
        flat = self._ranked(key if above else -key, keep)
        return self._circuit(
            flat, {"rule": "threshold", "t": t, "by": by, "above": above}, description
        )

    def top_k_per_layer(
        self, k: int, *, by: Ranking = "value", largest: bool = True, description: str = ""
    ) -> Circuit:
        """The ``k`` best components in each layer (layer by layer, best first within a layer)."""
        if not comp.is_int(k) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        self._check_selectable()
        if "layer" not in self.axes:
            raise ValueError(f"per-layer selection needs a 'layer' axis; axes are {self.axes}")
        key = self._key(by, largest)
        dim = self.axes.index("layer")
        shape = [1] * key.ndim
        shape[dim] = -1
        layer_of = torch.arange(key.shape[dim], device=key.device).reshape(shape).expand_as(key)
        flat = (
            torch.cat([self._ranked(key, layer_of == layer)[:k] for layer in range(key.shape[dim])])
            if key.shape[dim]
            else torch.zeros(0, dtype=torch.long)
        )
        return self._circuit(
            flat, {"rule": "top_k_per_layer", "k": k, "by": by, "largest": largest}, description
        )

    def reduce(self, axis: str, *, op: Literal["mean", "sum", "max", "min"] = "mean") -> Scores:
        """Scores with ``axis`` reduced by ``op`` (recorded in the config under ``"reduced"``)."""
        if axis not in self.axes:
            raise ValueError(f"no axis {axis!r}; axes are {self.axes}")
        if op not in _REDUCERS:
            raise ValueError(f"op must be one of {sorted(_REDUCERS)}, got {op!r}")
        dim = self.axes.index(axis)
        reduced = [*self.config.get("reduced", []), {"axis": axis, "op": op}]
        return Scores(
            _REDUCERS[op](self.values, dim=dim),
            self.axes[:dim] + self.axes[dim + 1 :],
            self.site,
            self.method,
            config={**self.config, "reduced": reduced},
            provenance=self.provenance,
            labels={a: v for a, v in self.labels.items() if a != axis},
            partitions=None if axis == "partition" else self.partitions,
        )

    def check_model(self, model: Any, *, strict: bool = False) -> bool:
        """True if ``model`` has the weights these scores were computed on (``artifacts.check_model``).

        Call it before selecting components for a model: a different model warns
        (``ModelMismatchWarning``, naming both models) or with ``strict`` raises
        ``ModelMismatchError``.
        """
        return check_model(self.provenance, model, strict=strict, what="these scores")

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<stem>.safetensors`` (the tensor) and ``<stem>.json``; return the JSON path.

        ``path`` may be the stem or either file name. Both files are written atomically, the JSON
        last, so its presence means the pair is complete.
        """
        tensor_path, json_path = _paths(path)
        values = self.values.to("cpu").contiguous()
        write_tensors(tensor_path, {"values": values}, metadata={"format": SCORES_FORMAT})
        sidecar = {
            "format": SCORES_FORMAT,
            "version": SCORES_VERSION,
            "values_file": tensor_path.name,
            "values_hash": tensors_hash({"values": values}),
            "shape": list(values.shape),
            "dtype": dtype_name(values.dtype),
            "axes": list(self.axes),
            "site": self.site,
            "method": self.method,
            "config": dict(self.config),
            "provenance": None if self.provenance is None else self.provenance.to_dict(),
            "labels": {axis: list(names) for axis, names in self.labels.items()},
            "partitions": None if self.partitions is None else self.partitions.to_json(),
        }
        return write_json_atomic(json_path, sidecar)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        """Read a pair written by ``save``; ``ScoresFormatError`` if anything is missing or disagrees.

        ``path`` is the stem or either file name. Reads versions 1 and 2. A missing file raises a
        ``ScoresFormatError`` that is also a ``FileNotFoundError``.
        """
        err = ScoresFormatError
        _, json_path = _paths(path)
        data = read_json(
            json_path,
            fmt=SCORES_FORMAT,
            version=SCORES_VERSION,
            reads=(1,),
            error=err,
            expected="the stem or either file of a pair written by Scores.save",
        )
        where = str(json_path)
        fields = {
            "format": str,
            "version": int,
            "values_file": str,
            "values_hash": str,
            "shape": list,
            "dtype": str,
            "axes": list,
            "site": str,
            "method": str,
            "config": dict,
            "provenance": (dict, type(None)),
            "labels": dict,
        }
        if data["version"] >= 2:
            fields["partitions"] = (dict, type(None))
        check_keys(data, required=fields, error=err, where=where)
        for key, types in fields.items():
            check_type(data[key], types, error=err, where=f"{where}: {key!r}")
        name = data["values_file"]
        if Path(name).name != name or name in ("", ".", ".."):
            raise err(f"{where}: 'values_file' must be a file name beside the JSON, got {name!r}")
        tensor_path = json_path.parent / name
        if not tensor_path.is_file():
            raise err(
                f"{where}: cannot read the scores tensor: {tensor_path} not found (it must sit "
                "beside the JSON)"
            )
        values = read_tensors(
            tensor_path,
            error=err,
            expected="the safetensors file beside the JSON",
            names=("values",),
            specs={"values": (data["shape"], data["dtype"])},
            hash=data["values_hash"],
            described_in=json_path.name,
        )["values"]
        partitions = data.get("partitions")
        if partitions is not None:
            partitions = PartitionTable.from_json(partitions, where=f"{where}: 'partitions'")
        provenance = read_provenance(data["provenance"], error=err, where=f"{where}: 'provenance'")
        try:
            return cls(
                values,
                tuple(data["axes"]),
                data["site"],
                data["method"],
                config=data["config"],
                provenance=provenance,
                labels=data["labels"],
                partitions=partitions,
            )
        except (TypeError, ValueError) as e:
            raise err(f"{where}: {e}") from None


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(<stem>.safetensors, <stem>.json)`` for a stem or either file name."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.parent / f"{p.name}.safetensors", p.parent / f"{p.name}.json"


__all__ = [
    "COMPONENT_AXES",
    "SCORES_FORMAT",
    "SCORES_VERSION",
    "PartitionTable",
    "Scores",
    "ScoresFormatError",
]
