"""Provenance: what a result was computed from, so a saved score or circuit can be traced back.

Hashes are SHA-256 hex digests truncated to 16 characters: short enough to read in a JSON file,
long enough that an accidental collision between two checkpoints is not a practical concern.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

HASH_CHARS = 16
# what a result's numbers depend on besides mechedit itself, reported with every run and report
LIBRARIES = ("torch", "transformer-lens", "transformers", "safetensors", "plotly")


def library_versions() -> dict[str, str]:
    """``{package: version}`` for mechedit, Python and ``LIBRARIES`` ("not installed" if absent)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from mechedit import __version__

    out = {"mechedit": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def invocation() -> str:
    """The command line that is running (``mechedit eval ...``), or the script / kernel it runs in."""
    import shlex
    import sys
    from pathlib import Path

    argv = list(sys.argv)
    if not argv or not argv[0]:
        return "python (interactive)"
    program = Path(argv[0]).name
    if "ipykernel" in program or "ipykernel" in " ".join(argv[1:2]):
        return "Jupyter kernel (Python API calls)"
    return shlex.join([program, *argv[1:]])


def _digest(chunks: Iterable[bytes | memoryview]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:HASH_CHARS]


def _tensor_chunks(tensor: torch.Tensor) -> Iterator[bytes | memoryview]:
    """``tensor_bytes`` as pieces, the data as a view of the tensor's memory (hashing a model
    must not hold a second copy of its weights)."""
    t = tensor.detach().to("cpu").contiguous()
    yield f"{t.dtype}:{tuple(t.shape)}:".encode()
    if t.numel():
        yield memoryview(t.view(torch.uint8).numpy())


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (contiguous, on the CPU), dtype and shape included."""
    return b"".join(bytes(chunk) for chunk in _tensor_chunks(tensor))


def state_dict_hash(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of named tensors, independent of dict order (names are sorted)."""
    return _digest(chunk for name in sorted(state) for chunk in (name.encode(), *_tensor_chunks(state[name])))


def weights_hash(model: torch.nn.Module) -> str:
    """Hash of a model's parameters by their storage, so views of one tensor count once.

    TransformerBridge exposes some HF tensors twice under different names (e.g. the fused
    ``c_attn`` weight and its q/k/v views); hashing each distinct storage once, in name order,
    makes the hash depend only on the weights, not on how the wrapper names them.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    h = hashlib.sha256()
    for _name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        key = (param.untyped_storage().data_ptr(), param.storage_offset(), tuple(param.shape))
        if key in seen:
            continue
        seen.add(key)
        for chunk in _tensor_chunks(param):
            h.update(chunk)
    return h.hexdigest()[:HASH_CHARS]


def text_hash(texts: Iterable[str] | str) -> str:
    """Hash of a prompt or a sequence of prompts (order matters)."""
    items = [texts] if isinstance(texts, str) else list(texts)
    return _digest([json.dumps(items, ensure_ascii=False).encode()])


def model_name(model: Any) -> str:
    """A readable name for a loaded model: its config's ``model_name`` or the class name."""
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or type(model).__name__)


@dataclass(frozen=True)
class Provenance:
    """Where a result came from: model name and weight hash, data hash, seed, mechedit version."""

    model_name: str
    weights_hash: str
    data_hash: str | None = None
    seed: int | None = None
    mechedit_version: str = field(default_factory=lambda: __import__("mechedit").__version__)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        *,
        data: Iterable[str] | str | None = None,
        seed: int | None = None,
        **extra: Any,
    ) -> Provenance:
        """Provenance of a result computed from ``model`` on prompts ``data`` with ``seed``."""
        return cls(
            model_name=model_name(model),
            weights_hash=weights_hash(model),
            data_hash=None if data is None else text_hash(data),
            seed=seed,
            extra=dict(extra),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        """Rebuild from ``to_dict`` output, checking every field's type.

        Raises ``ValueError`` naming missing or unknown keys, a field of the wrong type, or an
        ``extra`` that JSON cannot hold (NaN, infinities), so what loads can be saved again.
        """
        required = {"model_name", "weights_hash"}
        allowed = required | {"data_hash", "seed", "mechedit_version", "extra"}
        if not isinstance(data, Mapping):
            raise ValueError(f"provenance must be a JSON object, got {type(data).__name__}")
        missing, unknown = required - data.keys(), data.keys() - allowed
        if missing or unknown:
            raise ValueError(
                f"bad provenance: missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        for key, ok, expected in _FIELD_TYPES:
            if key in data and not ok(data[key]):
                raise ValueError(
                    f"bad provenance: {key!r} must be {expected}, got "
                    f"{type(data[key]).__name__} {data[key]!r:.60}"
                )
        try:
            json.dumps(data.get("extra", {}), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as err:
            raise ValueError(f"bad provenance: 'extra' must hold plain finite JSON values: {err}") from None
        return cls(**dict(data))


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_optional_int(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


# The JSON types of the fields (from_dict checks them; a list as weights_hash would otherwise load).
_FIELD_TYPES = (
    ("model_name", _is_str, "a string"),
    ("weights_hash", _is_str, "a string"),
    ("data_hash", _is_optional_str, "a string or null"),
    ("seed", _is_optional_int, "an integer or null"),
    ("mechedit_version", _is_str, "a string"),
    ("extra", lambda v: isinstance(v, dict), "an object"),
)
