"""Artifacts: versioned JSON documents and safetensors files, written atomically, read strictly.

Every file mechedit writes (circuits, scores, weight edits, edit reports, zoo metadata) is a JSON
document tagged ``{"format": "mechedit.<kind>", "version": <int>}``, optionally beside a
safetensors file whose contents the JSON pins by hash. This module is the one place that

- writes them atomically (a temporary file in the same folder, then a rename, so a reader never
  sees half a file) with ordinary permissions (``0o666 & ~umask``; safetensors' ``save_file``
  and ``tempfile.mkstemp`` both create owner-only files);
- reads them strictly: a missing path, a folder, bad UTF-8, bad or truncated JSON, ``NaN`` /
  ``Infinity`` / overflowing numbers, nesting deeper than ``MAX_DEPTH``, lone surrogates, a
  foreign format tag or an unknown version all raise the caller's format error (a subclass of
  ``ArtifactError``) naming the file; the readers of each format then check keys and types with
  ``check_keys`` / ``check_type``, so only format errors ever leave a loader;
- checks that a result is used on the model it was computed on (``check_model``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mechedit.components import is_int
from mechedit.provenance import Provenance, model_name, state_dict_hash, weights_hash

# Deeper documents are refused before any recursive code (json.dumps, dataclass checks) sees them;
# no mechedit format nests beyond a handful of levels.
MAX_DEPTH = 64


class ArtifactError(ValueError):
    """A mechedit file that is missing, malformed, of a foreign format or an unknown version.

    Each format has its own subclass (``CircuitFormatError``, ``ScoresFormatError``,
    ``EditFormatError``, ``ReportFormatError``, ``MetadataError``); the message names the file
    and the place in it.
    """


class ModelMismatchError(ValueError):
    """A result (circuit, scores, edit) used on a model whose weights are not the ones it was made on."""


class ModelMismatchWarning(UserWarning):
    """The warning form of ``ModelMismatchError`` (the default outside ``strict=True``)."""


@cache
def _missing_class(error: type[ArtifactError]) -> type[ArtifactError]:
    # One subclass per format error that is also a FileNotFoundError, so callers may catch either.
    return type(f"Missing{error.__name__}", (error, FileNotFoundError), {"__module__": __name__})


# ---------------------------------------------------------------------------------------------
# Checks shared by every reader


def existing_file(
    path: str | os.PathLike, *, error: type[ArtifactError], expected: str
) -> Path:
    """``path`` as a ``Path`` if it is a readable file; otherwise ``error`` saying what to pass.

    ``expected`` describes what belongs there (e.g. ``"a circuit JSON written by Circuit.save"``).
    A missing path raises a subclass of both ``error`` and ``FileNotFoundError``.
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a folder; pass {expected}")
    if not path.is_file():
        raise _missing_class(error)(f"{path} not found; pass {expected}")
    return path


def check_header(
    data: Mapping[str, Any],
    *,
    fmt: str,
    version: int,
    error: type[ArtifactError],
    where: str,
    reads: Iterable[int] = (),
) -> dict[str, Any]:
    """Check a parsed document's ``format`` tag and ``version``; return it as a dict.

    ``version`` is the one this code writes; ``reads`` lists older versions it still reads (the
    caller dispatches on ``data["version"]``). A higher version is refused as "written by a newer
    mechedit".
    """
    found = data.get("format")
    if found != fmt:
        raise error(f"{where}: 'format' is {found!r:.80}, expected {fmt!r}")
    got = data.get("version")
    if not is_int(got):
        raise error(f"{where}: 'version' must be an integer, got {got!r:.80}")
    if got > version:
        raise error(
            f"{where}: unsupported version {got} of {fmt}: it was written by a newer mechedit, and "
            f"this one reads version {version}. Upgrade mechedit to read it."
        )
    if got != version and got not in set(reads):
        readable = sorted({version, *reads})
        raise error(
            f"{where}: unsupported version {got} of {fmt}; this mechedit reads versions {readable}"
        )
    return dict(data)


def check_keys(
    data: Mapping[str, Any],
    *,
    required: Iterable[str],
    optional: Iterable[str] = (),
    error: type[ArtifactError],
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
    value: Any, types: type | tuple[type, ...], *, error: type[ArtifactError], where: str
) -> None:
    """Raise ``error`` unless ``value`` is one of ``types`` (bools are not ints here)."""
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise error(f"{where} must be {names}, got {type(value).__name__} {value!r:.60}")


def check_json_able(value: Any, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` survives ``json.dumps`` (no NaN, tensors, objects)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(
            f"{what} must be JSON-serialisable (plain dicts, lists, str, finite numbers): {err}"
        ) from None


# ---------------------------------------------------------------------------------------------
# JSON


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a number JSON allows (mechedit files hold finite numbers)")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"{token} overflows a float (mechedit files hold finite numbers)")
    return value


def _check_tree(data: Any) -> str | None:
    """What is wrong with a parsed JSON value (too deep, a string UTF-8 cannot encode), or None."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth) for k in value)
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"a string holds a lone surrogate ({value!r:.40}), which UTF-8 cannot store"
    return None


def parse_json(text: str, *, error: type[ArtifactError], where: str) -> Any:
    """Parse JSON text strictly; ``error`` for syntax, NaN/Infinity, huge numbers, deep nesting."""
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise error(
            f"{where} is not valid JSON (truncated or corrupted?): {err.msg} at line {err.lineno} "
            f"column {err.colno}"
        ) from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to be a mechedit file") from None
    except ValueError as err:  # NaN/Infinity, float overflow, integers beyond Python's digit limit
        raise error(f"{where}: not a valid mechedit JSON value: {err}") from None
    problem = _check_tree(data)
    if problem:
        raise error(f"{where}: {problem}")
    return data


def read_json(
    path: str | os.PathLike,
    *,
    fmt: str,
    version: int,
    error: type[ArtifactError],
    expected: str,
    reads: Iterable[int] = (),
) -> dict[str, Any]:
    """Read a JSON object tagged ``{"format": fmt, "version": version}`` (or one of ``reads``).

    Raises ``error`` (never anything else) for a missing path or a folder (``expected`` says what
    to pass instead), a file that is not UTF-8 or not JSON, a JSON value that is not an object,
    the wrong format tag, and a version this code cannot read.
    """
    path = existing_file(path, error=error, expected=expected)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path} is not a UTF-8 text file, so not a {fmt} file: {err}") from None
    except OSError as err:
        raise error(f"{path} cannot be read: {err}") from None
    data = parse_json(text, error=error, where=str(path))
    if not isinstance(data, dict):
        raise error(
            f"{path} holds a JSON {type(data).__name__}, expected an object with format {fmt!r}"
        )
    return check_header(data, fmt=fmt, version=version, error=error, where=str(path), reads=reads)


def dumps_readable(value: Any, *, level: int = 0, sort_keys: bool = False) -> str:
    """Indented JSON in which a list of plain values stays on one line.

    So a circuit's ``rows`` read one component per line (``[1, 17]``) instead of one number per
    line, which keeps files of thousands of neurons short and diffable. NaN and infinities are
    refused (``ValueError``), as every mechedit reader refuses them.
    """
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict) and value:
        keys = sorted(value) if sort_keys else value
        items = (
            f"{inner}{json.dumps(k)}: {dumps_readable(value[k], level=level + 1, sort_keys=sort_keys)}"
            for k in keys
        )
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list | tuple) and any(isinstance(v, dict | list | tuple) for v in value):
        items = (inner + dumps_readable(v, level=level + 1, sort_keys=sort_keys) for v in value)
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, allow_nan=False, ensure_ascii=False)


def _ordinary_permissions(path: str | os.PathLike) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, give the file ordinary permissions, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temporary file beside ``path`` and rename it over ``path``.

    A crash mid-write leaves ``path`` as it was (absent or the old file), never half-written.
    """
    return _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, *, sort_keys: bool = False) -> Path:
    """Write ``data`` as readable JSON (``dumps_readable``) atomically; returns the path.

    The text is built before any file is touched, so a value JSON cannot hold (NaN, a tensor)
    raises ``ValueError`` / ``TypeError`` and leaves an existing file as it was.
    """
    text = dumps_readable(data, sort_keys=sort_keys) + "\n"
    return _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write ``rows`` as JSON Lines (one compact object a line) atomically; returns the path.

    Strict JSON like ``write_json_atomic``: NaN or infinities raise ``ValueError`` before any
    file is touched.
    """
    text = "".join(json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n" for row in rows)
    return _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Tensors


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hash of named tensors (dtype, shape and bytes; order-independent), as stored beside them."""
    return state_dict_hash(tensors)


def write_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save named tensors (moved to the CPU, made contiguous) as safetensors, atomically.

    Returns the path. Pair it with a JSON that records ``tensors_hash(tensors)`` and write the JSON
    last, so its presence means the pair is complete.
    """
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta = dict(metadata) if metadata else None
    return _write_atomic(path, lambda tmp: save_file(cpu, tmp, metadata=meta))


def read_tensors(
    path: str | os.PathLike,
    *,
    error: type[ArtifactError],
    expected: str,
    names: Iterable[str] | None = None,
    specs: Mapping[str, tuple[list[int], str]] | None = None,
    hash: str | None = None,
    described_in: str = "the JSON",
) -> dict[str, torch.Tensor]:
    """Read a safetensors file and check it against what its JSON says; ``error`` if anything differs.

    Args:
        names: the tensor names the file must hold exactly (defaults to ``specs``' keys).
        specs: ``{name: (shape, dtype_name)}`` each tensor must have (``"float32"``, no
            ``torch.`` prefix).
        hash: the expected ``tensors_hash`` of the whole file's tensors.
        described_in: how messages name the JSON that describes the file.
    """
    path = existing_file(path, error=error, expected=expected)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise error(f"{path} is not a readable safetensors file ({err})") from None
    wanted = set(names) if names is not None else (set(specs) if specs is not None else None)
    if wanted is not None and set(tensors) != wanted:
        raise error(
            f"{path} and {described_in} disagree: only in the file {sorted(set(tensors) - wanted)}, "
            f"only in {described_in} {sorted(wanted - set(tensors))}"
        )
    if specs is not None:
        wrong = {
            n: f"file {list(t.shape)} {dtype_name(t.dtype)}, {described_in} {list(specs[n][0])} {specs[n][1]}"
            for n, t in tensors.items()
            if list(t.shape) != list(specs[n][0]) or dtype_name(t.dtype) != specs[n][1]
        }
        if wrong:
            raise error(f"{path}: tensors differ from {described_in}: {wrong}")
    if hash is not None and tensors_hash(tensors) != hash:
        raise error(
            f"{path}: tensor contents do not match the hash in {described_in} (modified or from "
            "another save?)"
        )
    return tensors


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, as files record dtypes."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any, *, error: type[ArtifactError], where: str) -> torch.dtype:
    """The ``torch.dtype`` named ``name`` (``"float32"``); ``error`` for anything else."""
    dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise error(f"{where} must name a torch dtype such as 'float32', got {name!r:.60}")
    return dtype


# ---------------------------------------------------------------------------------------------
# Provenance and the model a result is used on


def read_provenance(value: Any, *, error: type[ArtifactError], where: str) -> Provenance | None:
    """``Provenance.from_dict(value)`` (``None`` for JSON null), with its errors as ``error``."""
    if value is None:
        return None
    try:
        return Provenance.from_dict(value)
    except (TypeError, ValueError) as err:
        raise error(f"{where}: {err}") from None


def check_model(
    provenance: Provenance | None,
    model: torch.nn.Module,
    *,
    strict: bool = False,
    what: str = "this result",
) -> bool:
    """Check that ``model`` has the weights ``provenance`` records; return True if it does.

    On a mismatch, warns (``ModelMismatchWarning``) naming both models and weight hashes, or with
    ``strict`` raises ``ModelMismatchError``. Without provenance (a hand-made result) there is
    nothing to compare: returns False, or raises with ``strict``. ``what`` names the result in the
    message (``"this circuit"``). Costs one hash of the model's weights (about a second for
    GPT-2 small on a CPU).
    """
    if provenance is None:
        if strict:
            raise ModelMismatchError(
                f"{what} has no provenance, so the model it was made on cannot be checked"
            )
        return False
    found = weights_hash(model)
    if found == provenance.weights_hash:
        return True
    message = (
        f"{what} came from {provenance.model_name} (weights {provenance.weights_hash}); the model "
        f"given here is {model_name(model)} (weights {found}), where its components and values "
        "may not mean the same. Load the model it was made on, or recompute it on this one."
    )
    if strict:
        raise ModelMismatchError(message)
    warnings.warn(message, ModelMismatchWarning, stacklevel=3)
    return False


__all__ = [
    "MAX_DEPTH",
    "ArtifactError",
    "ModelMismatchError",
    "ModelMismatchWarning",
    "check_header",
    "check_json_able",
    "check_keys",
    "check_model",
    "check_type",
    "dtype_name",
    "dumps_readable",
    "existing_file",
    "parse_dtype",
    "parse_json",
    "read_json",
    "read_provenance",
    "read_tensors",
    "tensors_hash",
    "write_json_atomic",
    "write_text_atomic",
    "write_tensors",
]
