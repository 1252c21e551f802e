"""Data for the commands: files of prompts, or a selection from a fact world.

``--data`` takes either

* a **file** (``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet``) whose records are one of
  - CounterFact (``requested_rewrite``; the rewrite prompts, ``target_new`` included),
  - known_1000 (``prompt``, ``subject``, ``attribute``, ``relation_id``),
  - plain facts (``prompt``, ``target``, optional ``subject``, ``target_new``, ``relation_id``, ``id``),
  - patching pairs (``clean``, ``corrupt``, ``answer``, ``wrong_answer``, optional ``id``),
  - secrets (``prefix``, ``secret``), or CrowS-Pairs rows (``sent_more``, ``sent_less``; CSV);
* or a **Hugging Face hub dataset name** (read through ``datasets``; needs the network or a warm
  cache): facts and secrets in the formats above, and for contrastive pairs CrowS-Pairs
  (``crows_pairs`` or ``nyu-mll/crows_pairs``, ``HUB_CONTRASTIVE``). WinoGender has no hub name
  here: the hub copies lack the occupation statistics that decide which side is advantaged, so
  it is read from the original folder (``all_sentences.tsv`` + ``occupations-stats.tsv``);
* or a **fact-world selection** ``WORLD:WHAT[:DETAIL]``, ``WORLD`` a zoo model with a recorded
  world (``factworld``, ``factworld-planted``):
  - ``factworld:P19`` every person's birth-city fact (``--limit N``: the first N people),
  - ``factworld:P19:NAME`` one person's fact (exact spelling; a letter-case slip gets a hint),
  - ``factworld-planted:planted`` the planted facts,
  - ``factworld:bias`` (or ``bias:train|dev|test``) the planted occupation-pronoun pairs,
  - ``factworld:secrets`` (or ``secrets:phone|email|canary``) the private records.

A selected fact becomes its prompts in every training template (``--template K``: only the K-th;
held-out templates are for evaluation); as patching pairs, one pair per fact in template 1 with a seeded partner of another
value (``mechedit.zoo.prompts.fact_pairs``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechedit.cli._common import UsageError

_WORLD_SPEC = re.compile(r"^(factworld[\w-]*):(.+)$")
_FACT_KINDS = ("facts", "pairs", "secrets", "contrastive")


@dataclass(frozen=True)
class WorldSpec:
    """A parsed ``WORLD:WHAT[:DETAIL]`` selection."""

    world: str
    what: str  # a relation id, "planted", "bias" or "secrets"
    detail: str | None

    @classmethod
    def parse(cls, text: str) -> WorldSpec | None:
        """The selection ``text`` names, or ``None`` when it names a file instead."""
        if Path(text).exists():
            return None
        m = _WORLD_SPEC.match(text)
        if m is None:
            return None
        what, _, detail = m.group(2).partition(":")
        return cls(m.group(1), what.strip(), detail.strip() or None)


def _world(name: str) -> Any:
    from mechedit import zoo

    if name not in zoo.NAMES:
        raise UsageError(f"unknown fact world {name!r} in --data; zoo models: {', '.join(zoo.NAMES)}")
    return zoo.load_world(name)


def world_facts(spec: WorldSpec, limit: int | None) -> tuple[Any, list[Any]]:
    """``(world, [Fact, ...])`` of a relation or planted selection."""
    from mechedit.zoo.world import facts_about

    world = _world(spec.world)
    if spec.what == "planted":
        facts = world.planted_facts
        if spec.detail is not None:
            facts = [f for f in facts if f.relation_id == spec.detail]
    elif spec.what in world.relation:
        facts = [f for f in world.facts if f.relation_id == spec.what]
        if spec.detail is not None:
            try:
                facts = facts_about(facts, spec.detail, where=spec.world)
            except ValueError as err:
                raise UsageError(str(err)) from None
    else:
        raise UsageError(
            f"--data {spec.world}:{spec.what}: expected a relation id ({', '.join(sorted(world.relation))}), "
            "'planted', 'bias' or 'secrets'"
        )
    if not facts:
        raise UsageError(f"--data {spec.world}:{spec.what} selects no facts")
    return world, facts[:limit] if limit is not None else facts


def _records(source: str, limit: int | None) -> tuple[list[dict[str, Any]], str]:
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    from mechedit.data import DataFormatError, _read_records

    # a local file reads in a moment; datasets' "Generating train split" bar would only be noise
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        records, label = _read_records(source, split="train")
    finally:
        if not was_disabled:
            enable_progress_bars()
    records = records[:limit] if limit is not None else records
    if not records:
        raise DataFormatError(f"{source!r} holds no records")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataFormatError(f"{label}: record {bad}: expected an object, got {type(records[bad]).__name__}")
    return records, label


def _each(records: list[dict[str, Any]], label: str, build: Any) -> list[Any]:
    """``build(record)`` for every record; a ValueError names the record (exit code 2)."""
    from mechedit.data import DataFormatError

    out = []
    for i, rec in enumerate(records):
        try:
            out.append(build(rec))
        except (ValueError, TypeError) as err:
            where = f" (id={rec['id']!r})" if rec.get("id") is not None else ""
            raise DataFormatError(f"{label}: record {i}{where}: {err}") from None
    return out


def _need(rec: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if rec.get(k) is None]
    if missing:
        raise ValueError(f"field {missing[0]!r} is missing (or null); the record has {sorted(rec)}")


def read_facts(data: str, *, limit: int | None = None, template: int | None = None) -> list[Any]:
    """``FactPrompt``s from a file or a fact-world selection (see the module docstring).

    ``template``: a fact-world selection's prompts in that training template only (prompts of
    one template line up position by position, which causal tracing needs); ``None``: all.
    """
    from mechedit.data import DataFormatError, load_counterfact, load_known
    from mechedit.prompts import FactPrompt

    spec = WorldSpec.parse(data)
    if spec is not None:
        from mechedit.zoo.prompts import fact_prompts

        world, facts = world_facts(spec, limit)
        prompts = [fact_prompts(world, f) for f in facts]
        if template is None:
            return [p for per_fact in prompts for p in per_fact]
        n = min(len(per_fact) for per_fact in prompts)
        if not 0 <= template < n:
            raise UsageError(f"--template must be in 0..{n - 1}, got {template}")
        return [per_fact[template] for per_fact in prompts]
    if template is not None:
        raise UsageError("--template selects fact-world templates; a file's prompts are used as they are")
    records, label = _records(data, limit)
    first = records[0]
    if "requested_rewrite" in first:
        return load_counterfact(records)
    if "attribute" in first:
        return load_known(records)
    if "prompt" in first and "target" in first:

        def build(rec: dict[str, Any]) -> Any:
            _need(rec, "prompt", "target")
            return FactPrompt(
                prompt=rec["prompt"], target=rec["target"], subject=rec.get("subject"),
                target_new=rec.get("target_new"), relation_id=rec.get("relation_id"), record_id=rec.get("id"),
            )

        return _each(records, label, build)
    raise DataFormatError(
        f"{label}: records are not facts: expected CounterFact ('requested_rewrite'), known_1000 "
        f"('attribute') or 'prompt' + 'target' fields; record 0 has {sorted(first)}"
    )


def read_pairs(data: str, *, limit: int | None = None, seed: int = 0, template: int | None = None) -> list[Any]:
    """Clean/corrupt ``PromptPair``s from a file or a fact-world selection (``template``: default 1)."""
    from mechedit.data import DataFormatError
    from mechedit.prompts import PromptPair

    spec = WorldSpec.parse(data)
    if spec is not None:
        from mechedit.zoo.prompts import fact_pairs

        world, facts = world_facts(spec, limit)
        return fact_pairs(world, facts, rng=seed, template=1 if template is None else template)
    records, label = _records(data, limit)
    keys = ("clean", "corrupt", "answer", "wrong_answer")
    if not all(k in records[0] for k in keys):
        raise DataFormatError(
            f"{label}: patching needs clean/corrupt pairs with fields {', '.join(keys)}; record 0 has "
            f"{sorted(records[0])} (or select from the fact world: --data factworld:P19)"
        )

    def build(rec: dict[str, Any]) -> Any:
        _need(rec, *keys)
        return PromptPair(**{k: rec[k] for k in keys}, pair_id=rec.get("id"))

    return _each(records, label, build)


def read_secrets(data: str, *, limit: int | None = None) -> list[Any]:
    """Secrets for DEPN: the world's private records, ``(prefix, secret)`` records, or facts."""
    spec = WorldSpec.parse(data)
    if spec is not None and spec.what == "secrets":
        world = _world(spec.world)
        records = [r for r in world.private if spec.detail is None or r.kind == spec.detail]
        if not records:
            kinds = sorted({r.kind for r in world.private})
            raise UsageError(f"--data {data}: no private records of kind {spec.detail!r}; kinds: {', '.join(kinds)}")
        return records[:limit] if limit is not None else records
    if spec is None:
        records, label = _records(data, limit)
        if "prefix" in records[0] and "secret" in records[0]:

            def build(rec: dict[str, Any]) -> Any:
                _need(rec, "prefix", "secret")
                return (str(rec["prefix"]), str(rec["secret"]))

            return _each(records, label, build)
    return read_facts(data, limit=limit)


def crows_pairs_from_hub(ds: Any, source: str) -> list[Any]:
    """CrowS-Pairs rows as the hub serves them (``bias_type`` and ``stereo_antistereo`` as class
    indices) -> ``ContrastivePair``s, as ``load_crows_pairs`` reads the CSV: ``sent_more`` is the
    advantaged side, ``group`` the bias type; ``meta`` keeps the scalar fields (label names)."""
    import datasets

    from mechedit.data import DataFormatError
    from mechedit.data_pairs import ContrastivePair

    classes = {k: f for k, f in (getattr(ds, "features", None) or {}).items() if isinstance(f, datasets.ClassLabel)}
    pairs = []
    for i, row in enumerate(ds):
        row = {k: classes[k].int2str(v) if k in classes and isinstance(v, int) else v for k, v in row.items()}
        missing = [k for k in ("sent_more", "sent_less", "bias_type") if not row.get(k)]
        if missing:
            raise DataFormatError(f"{source}: record {i}: {missing[0]!r} is missing or empty (CrowS-Pairs format); "
                                  f"the record has {sorted(row)}")
        meta = {k: v for k, v in row.items() if k not in ("sent_more", "sent_less") and isinstance(v, (str, int, float))}
        pairs.append(ContrastivePair(row["sent_more"], row["sent_less"], group=row["bias_type"], meta=meta))
    return pairs


#: hub dataset names read as contrastive pairs: name -> (hub id, split, converter of the loaded rows)
HUB_CONTRASTIVE: dict[str, tuple[str, str, Callable[[Any, str], list[Any]]]] = {
    "crows_pairs": ("nyu-mll/crows_pairs", "test", crows_pairs_from_hub),
    "nyu-mll/crows_pairs": ("nyu-mll/crows_pairs", "test", crows_pairs_from_hub),
}


def _hub_contrastive(name: str) -> list[Any]:
    import datasets  # late: only a hub name needs it

    hub_id, split, convert = HUB_CONTRASTIVE[name]
    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as err:
        raise FileNotFoundError(
            f"--data {name!r}: loading {hub_id} from the Hugging Face hub failed ({type(err).__name__}: "
            f"{' '.join(str(err).split())}); offline, pass the CrowS-Pairs CSV file instead"
        ) from err
    return convert(ds, hub_id)


def read_contrastive(data: str, *, limit: int | None = None) -> list[Any]:
    """``ContrastivePair``s: the world's bias pairs (``factworld:bias[:split]``), a CrowS-Pairs CSV,
    a WinoGender folder (``all_sentences.tsv`` + ``occupations-stats.tsv``; the folder or either file),
    or a hub name in ``HUB_CONTRASTIVE`` (CrowS-Pairs)."""
    from mechedit.data import DataFormatError
    from mechedit.data_pairs import load_crows_pairs, load_winogender_pairs, world_bias_splits

    spec = WorldSpec.parse(data)
    if spec is not None:
        if spec.what != "bias":
            raise UsageError(f"--data {data}: contrastive pairs come from 'WORLD:bias[:train|dev|test]'")
        splits = world_bias_splits(_world(spec.world))
        split = spec.detail or "train"
        if split not in splits:
            raise UsageError(f"--data {data}: no split {split!r}; splits: {', '.join(splits)}")
        pairs = splits[split]
    elif data in HUB_CONTRASTIVE and not Path(data).exists():
        pairs = _hub_contrastive(data)
    elif Path(data).is_dir() or Path(data).suffix.lower() == ".tsv":
        folder = Path(data) if Path(data).is_dir() else Path(data).parent
        if not (folder / "all_sentences.tsv").is_file():
            raise FileNotFoundError(f"{data!r}: no WinoGender all_sentences.tsv in {folder}")
        pairs = load_winogender_pairs(folder)
    else:
        if not Path(data).is_file():
            raise FileNotFoundError(f"No such data file: {data!r} (contrastive pairs: a CrowS-Pairs CSV, a WinoGender "
                                    f"folder, WORLD:bias, or a hub name: {', '.join(HUB_CONTRASTIVE)})")
        if Path(data).suffix.lower() != ".csv":
            raise DataFormatError(f"{data!r}: contrastive pairs are read from a CrowS-Pairs CSV (sent_more, sent_less) "
                                  "or a WinoGender folder")
        pairs = load_crows_pairs(data)
    return pairs[:limit] if limit is not None else pairs


READERS = {"facts": read_facts, "pairs": read_pairs, "secrets": read_secrets, "contrastive": read_contrastive}
