"""Circuit: a selected set of components, with where it came from, in a versioned JSON file.

The file format (``version`` 1) lists components compactly, grouped by site, one row per
component with the columns named in the file::

    {
      "format": "mechedit.circuit",
      "version": 1,
      "method": "neuron_ablation",
      "description": "top-10 neurons for (Ada, lives_in)",
      "config": {"k": 10},
      "provenance": {"model_name": "...", "weights_hash": "...", ...},
      "components": {
        "neuron":    {"columns": ["layer", "neuron"], "rows": [[1, 17], [0, 3]]},
        "resid_pre": {"columns": ["layer", "pos"], "rows": [[0, 4]]},
        "partition": {"columns": ["layer", "param", "unit"],
                      "rows": [[0, "transformer.h.0.mlp.c_fc.weight", 5]]}
      }
    }

Columns are ``layer``, the site's index field (``head`` / ``neuron`` / ``param`` + ``unit``), and
``pos`` when any component of that site is pinned to a position (``null`` for the others). The
loader checks everything — JSON syntax, format tag, version, required and unknown keys, types,
columns, every component — and raises ``CircuitFormatError`` naming the place; it never returns a
partly read circuit. A file from a newer mechedit (higher version) is refused with a message
saying so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechedit import components as comp
from mechedit.artifacts import (
    ArtifactError,
    check_header,
    check_json_able,
    check_keys,
    check_model,
    check_type,
    read_json,
    read_provenance,
    write_json_atomic,
)
from mechedit.components import Component
from mechedit.provenance import Provenance

CIRCUIT_FORMAT = "mechedit.circuit"
CIRCUIT_VERSION = 1


class CircuitFormatError(ArtifactError):
    """A circuit file or dict that does not follow the circuit format; the message says where."""


# ---------------------------------------------------------------------------------------------
# Rows: one component <-> one list of column values


def _columns(site: str, *, with_pos: bool) -> list[str]:
    spec = comp.SITES[site]
    if spec.kind == "weight":
        index = ["param", "unit"]
    else:
        index = [spec.index] if spec.index else []
    return ["layer", *index, *(["pos"] if with_pos else [])]


def _row_types(column: str, site: str) -> tuple[type, ...]:
    if column == "param":
        return (str,)
    if column == "pos" or (column == "layer" and comp.SITES[site].kind == "weight"):
        return (int, type(None))
    return (int,)


# ---------------------------------------------------------------------------------------------
# The circuit


@dataclass(frozen=True)
class Circuit:
    """A set of components selected by a method, with provenance.

    Args:
        components: the components; duplicates are an error. They are kept grouped by site (sites
            in order of first appearance), each site's components in the given order, e.g. rank
            order from a top-k, which is also the order of the saved file.
        method: the locating / selection method that produced the set (``"manual"`` by hand).
        config: the method's configuration and the selection rule, JSON-serialisable.
        provenance: model name and weights hash (and data hash, seed, version) it was computed
            on; ``None`` only for circuits written by hand without a model.
        description: free text.
    """

    components: tuple[Component, ...]
    method: str = "manual"
    config: Mapping[str, Any] = field(default_factory=dict)
    provenance: Provenance | None = None
    description: str = ""

    def __post_init__(self) -> None:
        items = tuple(self.components)
        bad = [c for c in items if not isinstance(c, Component)]
        if bad:
            raise ValueError(f"a Circuit holds Components, got {type(bad[0]).__name__}: {bad[0]!r}")
        seen: set[Component] = set()
        duplicates = [c for c in items if c in seen or seen.add(c)]
        if duplicates:
            raise ValueError(
                f"duplicate components in circuit: {', '.join(map(str, duplicates[:5]))}"
            )
        sites = list(dict.fromkeys(c.site for c in items))
        grouped = tuple(c for site in sites for c in items if c.site == site)
        object.__setattr__(self, "components", grouped)
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a non-empty string, got {self.method!r}")
        if not isinstance(self.config, Mapping):
            raise ValueError(f"config must be a dict, got {type(self.config).__name__}")
        object.__setattr__(self, "config", dict(self.config))
        check_json_able(self.config, "circuit config")
        if self.provenance is not None and not isinstance(self.provenance, Provenance):
            raise ValueError(
                f"provenance must be a Provenance or None, got {type(self.provenance).__name__}"
            )
        if not isinstance(self.description, str):
            raise ValueError(f"description must be a string, got {type(self.description).__name__}")

    @classmethod
    def of(
        cls,
        model: Any,
        components: Iterable[Component],
        *,
        method: str = "manual",
        config: Mapping[str, Any] | None = None,
        description: str = "",
        data: Iterable[str] | str | None = None,
        seed: int | None = None,
    ) -> Circuit:
        """A circuit on ``model``: validates every component and records the model's provenance."""
        circuit = cls(
            tuple(components),
            method=method,
            config=dict(config or {}),
            provenance=Provenance.of(model, data=data, seed=seed),
            description=description,
        )
        return circuit.validate(model, check_weights=False)  # provenance was just taken from it

    def __len__(self) -> int:
        return len(self.components)

    def __iter__(self) -> Iterator[Component]:
        return iter(self.components)

    def __contains__(self, component: object) -> bool:
        return component in self.components

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites present, in the circuit's order."""
        return tuple(dict.fromkeys(c.site for c in self.components))

    def by_site(self) -> dict[str, list[Component]]:
        """Components grouped by site."""
        return {site: [c for c in self.components if c.site == site] for site in self.sites}

    def by_hook(self) -> dict[str, list[Component]]:
        """Components grouped by the hook they live at (one entry per hook, first-seen order).

        Raises ``ValueError`` for weight partitions, which have no hook.
        """
        groups: dict[str, list[Component]] = {}
        for c in self.components:
            groups.setdefault(comp.hook_name(c), []).append(c)
        return groups

    def validate(
        self, model: Any, *, check_weights: bool = True, strict: bool = False
    ) -> Circuit:
        """Check every component fits ``model`` and (``check_weights``) that it is the same model.

        Raises ``ValueError`` listing the components out of range. With ``check_weights`` (the
        default) a model whose weights hash differs from the circuit's provenance gets a
        ``ModelMismatchWarning`` naming both models, or with ``strict`` a ``ModelMismatchError``
        (also raised when the circuit has no provenance to compare). Returns ``self``.
        """
        comp.validate_all(model, self.components)
        if check_weights:
            self.check_model(model, strict=strict)
        return self

    def check_model(self, model: Any, *, strict: bool = False) -> bool:
        """True if ``model`` has the weights this circuit was computed on (``artifacts.check_model``).

        A different model warns (``strict``: raises ``ModelMismatchError``) naming both models.
        """
        return check_model(self.provenance, model, strict=strict, what="this circuit")

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the circuit (see the module docstring for the layout)."""
        groups = {}
        for site, members in self.by_site().items():
            columns = _columns(site, with_pos=any(c.pos is not None for c in members))
            groups[site] = {
                "columns": columns,
                "rows": [[getattr(c, name) for name in columns] for c in members],
            }
        return {
            "format": CIRCUIT_FORMAT,
            "version": CIRCUIT_VERSION,
            "method": self.method,
            "description": self.description,
            "config": dict(self.config),
            "provenance": None if self.provenance is None else self.provenance.to_dict(),
            "components": groups,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "circuit") -> Circuit:
        """Rebuild a circuit from ``to_dict`` output, checking it fully; ``CircuitFormatError`` if bad."""
        err = CircuitFormatError
        if not isinstance(data, Mapping):
            raise err(f"{where}: expected a JSON object, got {type(data).__name__}")
        data = check_header(
            data, fmt=CIRCUIT_FORMAT, version=CIRCUIT_VERSION, error=err, where=where
        )
        check_keys(
            data,
            required=("format", "version", "method", "config", "provenance", "components"),
            optional=("description",),
            error=err,
            where=where,
        )
        check_type(data["method"], str, error=err, where=f"{where}: 'method'")
        check_type(data.get("description", ""), str, error=err, where=f"{where}: 'description'")
        check_type(data["config"], dict, error=err, where=f"{where}: 'config'")
        check_type(
            data["provenance"], (dict, type(None)), error=err, where=f"{where}: 'provenance'"
        )
        check_type(data["components"], dict, error=err, where=f"{where}: 'components'")
        provenance = read_provenance(data["provenance"], error=err, where=f"{where}: 'provenance'")
        components = [
            c
            for site, group in data["components"].items()
            for c in _read_group(site, group, where=f"{where}: components[{site!r}]")
        ]
        try:
            return cls(
                tuple(components),
                method=data["method"],
                config=data["config"],
                provenance=provenance,
                description=data.get("description", ""),
            )
        except ValueError as e:
            raise err(f"{where}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the circuit as JSON to ``path`` (atomically); returns the path."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        """Read a circuit file; ``CircuitFormatError`` for anything malformed (never a partial load).

        A missing path raises a ``CircuitFormatError`` that is also a ``FileNotFoundError``.
        """
        data = read_json(
            path,
            fmt=CIRCUIT_FORMAT,
            version=CIRCUIT_VERSION,
            error=CircuitFormatError,
            expected="a circuit JSON file written by Circuit.save",
        )
        return cls.from_dict(data, where=str(path))


def _read_group(site: Any, group: Any, *, where: str) -> list[Component]:
    err = CircuitFormatError
    try:
        comp.site_spec(site)
    except ValueError as e:
        raise err(f"{where}: {e}") from None
    check_type(group, dict, error=err, where=where)
    check_keys(group, required=("columns", "rows"), error=err, where=where)
    columns, rows = group["columns"], group["rows"]
    allowed = [_columns(site, with_pos=False), _columns(site, with_pos=True)]
    if columns not in allowed:
        raise err(
            f"{where}: columns {columns!r} do not fit site {site!r}; expected {allowed[0]} or {allowed[1]}"
        )
    check_type(rows, list, error=err, where=f"{where}['rows']")
    out = []
    for i, row in enumerate(rows):
        at = f"{where}['rows'][{i}]"
        check_type(row, list, error=err, where=at)
        if len(row) != len(columns):
            raise err(f"{at} has {len(row)} values, expected {len(columns)} ({', '.join(columns)})")
        for name, value in zip(columns, row, strict=True):
            check_type(value, _row_types(name, site), error=err, where=f"{at} {name!r}")
        try:
            out.append(Component(site, **dict(zip(columns, row, strict=True))))
        except ValueError as e:
            raise err(f"{at}: {e}") from None
    return out


__all__ = ["CIRCUIT_FORMAT", "CIRCUIT_VERSION", "Circuit", "CircuitFormatError"]
