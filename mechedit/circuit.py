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

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechedit import components as comp
from mechedit.components import Component
from mechedit.provenance import Provenance, weights_hash

CIRCUIT_FORMAT = "mechedit.circuit"
CIRCUIT_VERSION = 1


class CircuitFormatError(ValueError):
    """A circuit file or dict that does not follow the circuit format; the message says where."""


# ---------------------------------------------------------------------------------------------
# Versioned JSON documents (shared with mechedit.scores)


def check_json_able(value: Any, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` survives ``json.dumps`` (no NaN, tensors, objects)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} must be JSON-serialisable (plain dicts, lists, str, numbers): {err}"
        ) from None


def read_versioned_json(
    path: str | os.PathLike, *, fmt: str, version: int, error: type[ValueError]
) -> dict[str, Any]:
    """Read a JSON object tagged ``{"format": fmt, "version": version}``; raise ``error`` if not.

    Distinguishes a file that is not JSON (bad syntax, truncated, not UTF-8), a JSON value that is
    not an object, the wrong format tag, and a version this code cannot read (newer or unknown).
    ``FileNotFoundError`` is left as is.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path} is not a UTF-8 text file, so not a {fmt} file: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(
            f"{path} is not valid JSON (truncated or corrupted?): {err.msg} at line {err.lineno} "
            f"column {err.colno}"
        ) from None
    if not isinstance(data, dict):
        raise error(
            f"{path} holds a JSON {type(data).__name__}, expected an object with format {fmt!r}"
        )
    return check_header(data, fmt=fmt, version=version, error=error, where=str(path))


def check_header(
    data: Mapping[str, Any], *, fmt: str, version: int, error: type[ValueError], where: str
) -> dict[str, Any]:
    """Check the ``format`` tag and ``version`` of a parsed document; return it as a dict."""
    found = data.get("format")
    if found != fmt:
        raise error(f"{where}: 'format' is {found!r}, expected {fmt!r}")
    got = data.get("version")
    if not comp.is_int(got):
        raise error(f"{where}: 'version' must be an integer, got {got!r}")
    if got > version:
        raise error(
            f"{where}: {fmt} version {got} was written by a newer mechedit; this one reads "
            f"version {version}. Upgrade mechedit to read it."
        )
    if got != version:
        raise error(f"{where}: unknown {fmt} version {got}; this mechedit reads version {version}")
    return dict(data)


def check_keys(
    data: Mapping[str, Any],
    *,
    required: Iterable[str],
    optional: Iterable[str] = (),
    error: type[ValueError],
    where: str,
) -> None:
    """Raise ``error`` listing missing required keys and keys the format does not define."""
    required, optional = set(required), set(optional)
    missing = sorted(required - data.keys())
    unknown = sorted(data.keys() - required - optional)
    if missing or unknown:
        parts = ([f"missing {missing}"] if missing else []) + (
            [f"unknown {unknown}"] if unknown else []
        )
        raise error(f"{where}: {'; '.join(parts)} (expected keys: {sorted(required | optional)})")


def check_type(
    value: Any, types: type | tuple[type, ...], *, error: type[ValueError], where: str
) -> None:
    """Raise ``error`` unless ``value`` is one of ``types`` (bools are not ints here)."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise error(f"{where} must be {names}, got {type(value).__name__} {value!r:.60}")


def dumps_readable(value: Any, *, level: int = 0) -> str:
    """Indented JSON in which a list of plain values stays on one line.

    So a circuit's ``rows`` read one component per line (``[1, 17]``) instead of one number per
    line, which keeps files of thousands of neurons short and diffable.
    """
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = (
            f"{inner}{json.dumps(k)}: {dumps_readable(v, level=level + 1)}"
            for k, v in value.items()
        )
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list | tuple) and any(isinstance(v, dict | list | tuple) for v in value):
        items = (inner + dumps_readable(v, level=level + 1) for v in value)
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, allow_nan=False, ensure_ascii=False)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON via a temporary file and rename, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(dumps_readable(data) + "\n")
        # mkstemp makes the file owner-only; give it the permissions an ordinary write would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        return circuit.validate(model)

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

    def validate(self, model: Any, *, check_weights: bool = False) -> Circuit:
        """Check every component fits ``model``; with ``check_weights`` also that it is the same model.

        Raises ``ValueError`` listing the components out of range, or (``check_weights``) saying
        the model's weights hash differs from the circuit's provenance. Returns ``self``.
        """
        comp.validate_all(model, self.components)
        if check_weights:
            if self.provenance is None:
                raise ValueError("this circuit has no provenance, so its model cannot be checked")
            actual = weights_hash(model)
            if actual != self.provenance.weights_hash:
                raise ValueError(
                    f"circuit was computed on weights {self.provenance.weights_hash} "
                    f"({self.provenance.model_name}); this model's weights hash is {actual}"
                )
        return self

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
        try:
            provenance = (
                None if data["provenance"] is None else Provenance.from_dict(data["provenance"])
            )
        except (TypeError, ValueError) as e:
            raise err(f"{where}: 'provenance': {e}") from None
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
        """Read a circuit file; ``CircuitFormatError`` for anything malformed (never a partial load)."""
        data = read_versioned_json(
            path, fmt=CIRCUIT_FORMAT, version=CIRCUIT_VERSION, error=CircuitFormatError
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
