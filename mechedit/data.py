"""Loaders for fact datasets at the boundary: ROME's CounterFact and known_1000 formats, read into
``mechedit.prompts.FactPrompt``s.

Loaders read JSON / JSON Lines / CSV / parquet through ``datasets`` (never pickle) and keep keys
they do not need out of the way: extra keys are ignored, never an error. A file or record that
cannot be read raises ``DataFormatError`` naming the record index, its id and the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from mechedit.prompts import FactPrompt

__all__ = [
    "DataFormatError",
    "load_counterfact",
    "load_known",
]


class DataFormatError(ValueError):
    """A data file or record that does not have the expected shape; the message names where."""


_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

Source = str | os.PathLike | Sequence[Mapping[str, Any]]


def _read_records(source: Source, *, split: str) -> tuple[list[dict[str, Any]], str]:
    """Records as plain dicts, plus a label naming the source for error messages.

    ``source`` is a local file (json / jsonl / csv / parquet), a hub dataset name (online), or an
    in-memory sequence of mappings (already-loaded records, e.g. a ``datasets.Dataset``).
    """
    if isinstance(source, Mapping):
        raise DataFormatError("pass a sequence of records (a list of dicts), not a single dict")
    if not isinstance(source, (str, os.PathLike)):
        return [dict(r) if isinstance(r, Mapping) else r for r in source], "records"

    import datasets  # late: importing datasets costs ~1 s and the types above do not need it

    text = os.fspath(source)
    path = Path(text).expanduser()
    builder = _BUILDERS.get(path.suffix.lower())
    if path.is_dir():
        raise DataFormatError(
            f"{text!r} is a directory; pass the data file itself ({', '.join(sorted(_BUILDERS))})."
        )
    if path.exists():
        if builder is None:
            raise DataFormatError(
                f"{text!r}: unsupported file type {path.suffix!r}; use one of "
                f"{', '.join(sorted(_BUILDERS))} (pickle-based formats are never read)."
            )
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except ValueError as err:
            if "corresponds to no data" in str(err):
                raise DataFormatError(f"{text!r} holds no records") from None
            raise DataFormatError(f"could not read {text!r} as {builder}: {err}") from err
        except Exception as err:  # datasets wraps parser errors in DatasetGenerationError
            cause = err.__cause__ or err
            raise DataFormatError(
                f"could not read {text!r} as {builder}: {type(cause).__name__}: {cause}"
            ) from err
        return [dict(r) for r in ds], text
    if builder is not None or text.startswith((".", "~", "/")) or "\\" in text:
        raise FileNotFoundError(
            f"No such data file: {text!r}. Pass an existing .json/.jsonl/.csv/.parquet file, "
            "or a Hugging Face hub dataset name when online."
        )
    try:
        ds = datasets.load_dataset(text, split=split)
    except Exception as err:
        raise FileNotFoundError(
            f"{text!r} is not a local file, and loading it as a hub dataset failed "
            f"({type(err).__name__}: {err}). Offline, pass a local file path instead."
        ) from err
    return [dict(r) for r in ds], text


class _Record:
    """One raw record and where it came from, so every error names the index, id and field."""

    def __init__(self, record: Any, index: int, source: str, id_key: str) -> None:
        self.where = f"{source}: record {index}"
        if not isinstance(record, Mapping):
            raise DataFormatError(
                f"{self.where}: expected an object (JSON dict), got {type(record).__name__}"
            )
        self.record = record
        self.id = record.get(id_key)
        if self.id is not None:
            self.where += f" ({id_key}={self.id!r})"

    def get(self, dotted: str, kind: type = str, *, required: bool = True) -> Any:
        value: Any = self.record
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is None:
            if required:
                raise DataFormatError(f"{self.where}: field '{dotted}' is missing (or null)")
            return None
        if kind is str and not (isinstance(value, str) and value.strip()):
            raise DataFormatError(
                f"{self.where}: field '{dotted}' must be a non-empty string, got {value!r:.80}"
            )
        if kind is list and not (
            isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        ):
            raise DataFormatError(
                f"{self.where}: field '{dotted}' must be a list of strings, got {value!r:.80}"
            )
        return value

    def fact(self, field: str, **kwargs: Any) -> FactPrompt:
        try:
            return FactPrompt(**kwargs)
        except ValueError as err:
            raise DataFormatError(f"{self.where}: field '{field}': {err}") from None


def _take(records: list[Any], limit: int | None) -> list[Any]:
    if limit is None:
        return records
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    return records[:limit]


def load_known(
    path_or_name: Source, *, split: str = "train", limit: int | None = None
) -> list[FactPrompt]:
    """Load ROME's known_1000 format: one ``FactPrompt`` per record, in file order.

    Each record needs ``subject``, ``attribute`` (the target), ``prompt`` (containing the subject)
    and ``relation_id``; ``known_id`` becomes ``record_id`` when present. Other keys (``template``,
    ``prediction``, per-model flags) are ignored.

    Args:
        path_or_name: a .json/.jsonl/.csv/.parquet file, a hub dataset name (online), or a
            sequence of record dicts.
        split: the split to read from a hub dataset (local files have one).
        limit: read only the first ``limit`` records.

    Raises:
        FileNotFoundError: a path that does not exist.
        DataFormatError: an unreadable file, or a record with a missing or malformed field (the
            message names the record index, its id and the field).
    """
    records, source = _read_records(path_or_name, split=split)
    facts = []
    for i, raw in enumerate(_take(records, limit)):
        rec = _Record(raw, i, source, "known_id")
        prompt = rec.get("prompt")
        facts.append(
            rec.fact(
                "subject",
                prompt=prompt,
                subject=rec.get("subject"),
                target=rec.get("attribute"),
                relation_id=rec.get("relation_id"),
                record_id=rec.id,
            )
        )
    return facts


CounterFactKind = Literal["rewrite", "paraphrase", "neighborhood"]
_KIND_ALIASES = {
    "rewrite": "rewrite",
    "paraphrase": "paraphrase",
    "neighborhood": "neighborhood",
    "neighbourhood": "neighborhood",
}


def load_counterfact(
    path_or_name: Source,
    *,
    kind: CounterFactKind = "rewrite",
    split: str = "train",
    limit: int | None = None,
) -> list[FactPrompt]:
    """Load ROME's CounterFact format as ``FactPrompt``s, in file order.

    Every record needs ``requested_rewrite`` with ``prompt`` (a template holding ``"{}"`` once,
    where the subject goes), ``subject``, ``relation_id``, ``target_true.str`` and
    ``target_new.str``; ``case_id`` becomes ``record_id``. Every prompt carries
    ``target`` = the true answer, ``target_new`` = the counterfactual one and
    ``candidates = (target_true, target_new)``.

    Args:
        path_or_name: a .json/.jsonl/.parquet file, a hub dataset name (online), or a sequence
            of record dicts.
        kind: which prompts to yield:
            ``"rewrite"``: the requested rewrite, one per record (subject span = where ``{}`` was);
            ``"paraphrase"``: each of ``paraphrase_prompts`` (the subject must occur in them);
            ``"neighborhood"`` (or ``"neighbourhood"``): each of ``neighborhood_prompts``, about
            other subjects sharing the true answer, so ``subject`` is ``None`` there.
        split: the split to read from a hub dataset.
        limit: read only the first ``limit`` records.

    Raises:
        FileNotFoundError: a path that does not exist.
        DataFormatError: an unreadable file, or a record with a missing or malformed field (the
            message names the record index, its ``case_id`` and the field).
    """
    if kind not in _KIND_ALIASES:
        raise ValueError(f"kind must be one of {sorted(_KIND_ALIASES)}, got {kind!r}")
    kind = _KIND_ALIASES[kind]
    records, source = _read_records(path_or_name, split=split)
    facts: list[FactPrompt] = []
    for i, raw in enumerate(_take(records, limit)):
        rec = _Record(raw, i, source, "case_id")
        template = rec.get("requested_rewrite.prompt")
        if template.count("{}") != 1:
            raise DataFormatError(
                f"{rec.where}: field 'requested_rewrite.prompt' must contain '{{}}' exactly once "
                f"(where the subject goes), got {template!r}"
            )
        subject = rec.get("requested_rewrite.subject")
        true, new = (
            rec.get("requested_rewrite.target_true.str"),
            rec.get("requested_rewrite.target_new.str"),
        )
        common = dict(
            target=true,
            target_new=new,
            candidates=(true, new),
            relation_id=rec.get("requested_rewrite.relation_id"),
            record_id=rec.id,
        )
        if kind == "rewrite":
            start = template.index("{}")
            facts.append(
                rec.fact(
                    "requested_rewrite",
                    prompt=template.replace("{}", subject, 1),
                    subject=subject,
                    subject_span=(start, start + len(subject)),
                    **common,
                )
            )
        elif kind == "paraphrase":
            for j, text in enumerate(rec.get("paraphrase_prompts", list)):
                facts.append(
                    rec.fact(f"paraphrase_prompts[{j}]", prompt=text, subject=subject, **common)
                )
        else:
            for j, text in enumerate(rec.get("neighborhood_prompts", list)):
                facts.append(rec.fact(f"neighborhood_prompts[{j}]", prompt=text, **common))
    return facts
