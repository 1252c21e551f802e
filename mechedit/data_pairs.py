"""Contrastive sentence pairs for bias location and unlearning (PCGU) and their loaders.

A ``ContrastivePair`` is two sentences that differ in one span of words (the pronoun of a
WinoGender sentence, the group word of a CrowS-Pairs pair), with the **advantaged** side (the
stereotypical one, the one a biased model prefers) and the **disadvantaged** side recorded. The
span is found by comparing the two sides word by word (longest common prefix and suffix); a pair
may also *declare* its span (``span=(advantaged_words, disadvantaged_words)``), which is then
checked: ``pair_problem`` names what is wrong with a pair (identical sides, a difference outside
the declared span), and the locators skip such pairs with one counted warning.

Loaders (files are read as text; nothing here needs the network):

* ``load_winogender_sentences`` / ``load_winogender_pairs``: WinoGender's ``all_sentences.tsv``
  (720 sentences: 60 occupations x 2 participants x 2 answers x male / female / neutral) and its
  ``occupations-stats.tsv``. One pair per (occupation, participant, answer): male vs female
  sentence; the **disadvantaged** gender is the one under 50 % in the occupation statistics
  (Bergsma's text statistics by default, as PCGU), so the advantaged side is the majority gender.
  The neutral sentence only locates the pronoun (the declared span is where it differs).
* ``load_crows_pairs``: CrowS-Pairs CSV (1,508 pairs; ``sent_more`` is the advantaged side), and
  the fact world's ``bias_pairs.csv`` export (same columns plus ``occupation``, ``p_more``,
  ``split``, kept in ``meta``).
* ``load_stereoset_intrasentence``: StereoSet's JSON (``data.intrasentence``) as
  ``StereoSetTriple`` s (stereotype / anti-stereotype / unrelated sentence of one context);
  ``triple.pair`` is the stereotype-vs-anti-stereotype ``ContrastivePair``.
* ``world_bias_pairs``: the fact world's planted occupation pairs straight from a ``World``.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mechedit.data import DataFormatError

__all__ = [
    "ContrastivePair",
    "SkippedPairsWarning",
    "StereoSetTriple",
    "differing_span",
    "WinoGenderSentence",
    "load_crows_pairs",
    "load_stereoset_intrasentence",
    "load_winogender_pairs",
    "load_winogender_sentences",
    "pair_problem",
    "valid_pairs",
    "world_bias_pairs",
    "world_bias_splits",
]


class SkippedPairsWarning(UserWarning):
    """Some pairs were skipped (identical sides, a difference outside the span, ...); counts in the text."""


def differing_span(a: Sequence[Any], d: Sequence[Any]) -> tuple[int, int, int]:
    """``(start, end_a, end_d)``: items ``start .. end_x - 1`` of each sequence are where they
    differ; the items before ``start`` and after the ends are shared (words or token ids)."""
    start = 0
    while start < min(len(a), len(d)) and a[start] == d[start]:
        start += 1
    tail = 0
    while tail < min(len(a), len(d)) - start and a[-1 - tail] == d[-1 - tail]:
        tail += 1
    return start, len(a) - tail, len(d) - tail


@dataclass(frozen=True)
class ContrastivePair:
    """Two sentences differing in one span: the advantaged (stereotypical) and disadvantaged side.

    Attributes:
        advantaged: the sentence a biased model prefers (CrowS-Pairs ``sent_more``; WinoGender's
            majority-gender sentence; the fact world's planted pronoun).
        disadvantaged: the same sentence with the group word(s) swapped.
        span: optionally the declared differing words ``(advantaged_words, disadvantaged_words)``
            (each a space-separated string); ``pair_problem`` checks the sides differ exactly
            there. ``None``: whatever differs is the span.
        group: a free label for aggregation (``"gender"``, an occupation, a CrowS bias type).
        meta: any further fields of the source record (strings, numbers).
    """

    advantaged: str
    disadvantaged: str
    span: tuple[str, str] | None = None
    group: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("advantaged", "disadvantaged"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if self.span is not None:
            span = tuple(self.span)
            if len(span) != 2 or not all(isinstance(s, str) for s in span):
                raise ValueError(
                    f"span must be (advantaged_words, disadvantaged_words), two strings; got {self.span!r}"
                )
            object.__setattr__(self, "span", span)
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def word_span(self) -> tuple[int, int, int]:
        """``(start, end_advantaged, end_disadvantaged)``: the differing words by position.

        Words ``start .. end_x - 1`` of each side (split on whitespace) are its differing span;
        the words before ``start`` and after the ends are shared. Identical sides give an empty
        span (``start == end``).
        """
        return differing_span(self.advantaged.split(), self.disadvantaged.split())


def pair_problem(pair: ContrastivePair) -> str | None:
    """Why ``pair`` cannot be used (a short reason, the key of the skip count), or ``None``.

    ``"identical sides"``; ``"differs outside the declared span"`` (the differing words are not
    exactly the declared ``span``, e.g. a second edit elsewhere in the sentence).
    """
    if not isinstance(pair, ContrastivePair):
        raise ValueError(f"pairs must be ContrastivePair objects, got {type(pair).__name__}")
    if pair.advantaged.split() == pair.disadvantaged.split():
        return "identical sides"
    if pair.span is not None:
        start, end_a, end_d = pair.word_span()
        found = (
            " ".join(pair.advantaged.split()[start:end_a]),
            " ".join(pair.disadvantaged.split()[start:end_d]),
        )
        if found != tuple(" ".join(s.split()) for s in pair.span):
            return "differs outside the declared span"
    return None


def warn_skipped(counts: Mapping[str, int], *, total: int, what: str = "pairs") -> None:
    """One ``SkippedPairsWarning`` giving the count per reason (nothing when nothing was skipped)."""
    skipped = sum(counts.values())
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        warnings.warn(
            f"skipped {skipped} of {total} {what}: {reasons}", SkippedPairsWarning, stacklevel=3
        )


def valid_pairs(pairs: Iterable[ContrastivePair]) -> tuple[list[ContrastivePair], dict[str, int]]:
    """The usable pairs and the number skipped per reason (see ``pair_problem``); warns once."""
    if isinstance(pairs, ContrastivePair):
        raise ValueError("pass a list of ContrastivePair, not one pair: [pair]")
    pairs = list(pairs)
    kept, counts = [], Counter()
    for pair in pairs:
        problem = pair_problem(pair)
        if problem is None:
            kept.append(pair)
        else:
            counts[problem] += 1
    warn_skipped(counts, total=len(pairs))
    return kept, dict(counts)


# --- WinoGender ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WinoGenderSentence:
    """One row of WinoGender's ``all_sentences.tsv``.

    ``sentid`` is ``occupation.participant.answer.gender.txt``; ``answer`` is 0 (the pronoun
    refers to the occupation) or 1 (to the participant); ``gender`` is male, female or neutral.
    """

    sentid: str
    occupation: str
    participant: str
    answer: int
    gender: str
    sentence: str


def _file(path: str | os.PathLike, default_name: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise DataFormatError(f"{p} not found: pass the {default_name} file or the folder holding it")
    return p


def load_winogender_sentences(path: str | os.PathLike) -> list[WinoGenderSentence]:
    """All sentences of WinoGender's ``all_sentences.tsv`` (``path``: the file or its folder).

    Raises ``DataFormatError`` naming the line for a row that is not ``sentid<TAB>sentence`` with
    a five-part ``sentid``.
    """
    src = _file(path, "all_sentences.tsv")
    rows = []
    with open(src, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if header[:2] != ["sentid", "sentence"]:
            raise DataFormatError(f"{src}: expected columns 'sentid', 'sentence', got {header}")
        for n, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            parts = cols[0].split(".")
            if len(cols) != 2 or len(parts) != 5 or parts[4] != "txt" or not parts[2].isdigit():
                raise DataFormatError(
                    f"{src}, line {n}: expected 'occupation.participant.answer.gender.txt<TAB>"
                    f"sentence', got {line.strip()!r:.100}"
                )
            if parts[3] not in ("male", "female", "neutral"):
                raise DataFormatError(f"{src}, line {n}: unknown gender {parts[3]!r}")
            rows.append(WinoGenderSentence(cols[0], parts[0], parts[1], int(parts[2]), parts[3], cols[1]))
    return rows


def _occupation_stats(path: Path, column: str) -> dict[str, float]:
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if "occupation" not in header or column not in header:
            raise DataFormatError(f"{path}: expected columns 'occupation' and {column!r}, got {header}")
        i_occ, i_pct = header.index("occupation"), header.index(column)
        stats = {}
        for n, line in enumerate(fh, start=2):
            if line.strip():
                cols = line.rstrip("\n").split("\t")
                try:
                    stats[cols[i_occ]] = float(cols[i_pct])
                except (IndexError, ValueError):
                    raise DataFormatError(f"{path}, line {n}: bad row {line.strip()!r}") from None
    return stats


def load_winogender_pairs(
    folder: str | os.PathLike, *, statistics: str = "bergsma_pct_female"
) -> list[ContrastivePair]:
    """PCGU's training pairs from a WinoGender folder (``all_sentences.tsv`` + ``occupations-stats.tsv``).

    One pair per (occupation, participant, answer): the male and the female sentence. The side
    whose gender is under 50 % female (or male) in ``statistics`` (``"bergsma_pct_female"``, as
    PCGU; or ``"bls_pct_female"``) is the disadvantaged one; occupations at exactly 50 % have no
    disadvantaged gender and are left out. The declared span is the pronoun, located where the
    neutral sentence differs from the male one. ``group`` is the occupation; ``meta`` holds
    ``participant``, ``answer``, ``pct_female`` and ``advantaged_gender``.
    """
    folder = Path(folder).expanduser()
    sentences = load_winogender_sentences(folder)
    stats = _occupation_stats(_file(folder, "occupations-stats.tsv"), statistics)
    by_key: dict[tuple[str, str, int], dict[str, WinoGenderSentence]] = {}
    for s in sentences:
        by_key.setdefault((s.occupation, s.participant, s.answer), {})[s.gender] = s
    pairs = []
    for (occupation, participant, answer), genders in by_key.items():
        if set(genders) != {"male", "female", "neutral"}:
            raise DataFormatError(
                f"WinoGender {occupation}.{participant}.{answer}: expected male, female and "
                f"neutral sentences, found {sorted(genders)}"
            )
        if occupation not in stats:
            raise DataFormatError(f"occupation {occupation!r} is not in occupations-stats.tsv")
        pct = stats[occupation]
        if pct == 50.0:
            continue
        male, female, neutral = (genders[g].sentence for g in ("male", "female", "neutral"))
        # The neutral sentence pins down the pronoun: the first word where it differs from the
        # male one (it may differ after that too: "they were" against "he was").
        start, _, _ = ContrastivePair(male, neutral).word_span()
        male_span, female_span = male.split()[start], female.split()[start]
        advantaged = "female" if pct > 50.0 else "male"
        sides = (female, male) if advantaged == "female" else (male, female)
        span = (female_span, male_span) if advantaged == "female" else (male_span, female_span)
        pairs.append(
            ContrastivePair(
                *sides,
                span=span,
                group=occupation,
                meta={
                    "participant": participant,
                    "answer": answer,
                    "pct_female": pct,
                    "advantaged_gender": advantaged,
                },
            )
        )
    return pairs


# --- CrowS-Pairs and the fact world's export ---------------------------------------------------------


def load_crows_pairs(path: str | os.PathLike) -> list[ContrastivePair]:
    """CrowS-Pairs CSV rows as pairs: ``sent_more`` (the more stereotypical) is the advantaged side.

    ``path`` is ``crows_pairs_anonymized.csv`` (or its folder), or the fact world's
    ``bias_pairs.csv`` export (same columns). ``group`` is ``bias_type``; ``meta`` keeps
    ``stereo_antistereo`` and every other column but the two sentences.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        names = [n for n in ("crows_pairs_anonymized.csv", "bias_pairs.csv") if (p / n).is_file()]
        if not names:
            raise DataFormatError(f"{p} holds neither crows_pairs_anonymized.csv nor bias_pairs.csv")
        p = p / names[0]
    src = _file(p, "crows_pairs_anonymized.csv")
    with open(src, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        needed = {"sent_more", "sent_less", "stereo_antistereo", "bias_type"}
        missing = needed - set(reader.fieldnames or ())
        if missing:
            raise DataFormatError(f"{src}: missing columns {sorted(missing)} (CrowS-Pairs format)")
        pairs = []
        for n, row in enumerate(reader, start=2):
            if not row["sent_more"] or not row["sent_less"]:
                raise DataFormatError(f"{src}, record on line {n}: empty sent_more / sent_less")
            meta = {k: v for k, v in row.items() if k not in ("sent_more", "sent_less") and k}
            pairs.append(ContrastivePair(row["sent_more"], row["sent_less"], group=row["bias_type"], meta=meta))
    return pairs


def world_bias_pairs(world: Any, templates: Sequence[str]) -> list[ContrastivePair]:
    """The fact world's planted pairs: each occupation x template, favoured pronoun advantaged.

    ``templates`` are bias templates with ``{occ}`` and ``{pron}`` (``zoo.world.BIAS_TEMPLATES_*``).
    The declared span is the pronoun; ``group`` the occupation; ``meta`` the planted ``p_more``.
    """
    return [
        ContrastivePair(
            more,
            less,
            span=(bias.pronoun_more, bias.pronoun_less),
            group=bias.occupation,
            meta={"p_more": bias.p_more},
        )
        for more, less, bias in world.bias_pairs(templates=tuple(templates))
    ]


def world_bias_splits(world: Any) -> dict[str, list[ContrastivePair]]:
    """The fact world's planted pairs split for unlearning: ``train``, ``dev`` and ``test``.

    ``train``: the first three training templates (3 x 60 occupations); ``dev`` (checkpoint
    selection): the other three training templates; ``test``: the two held-out templates, which
    the model never saw. Every split covers every occupation.
    """
    from mechedit.zoo.world import BIAS_TEMPLATES_HELDOUT, BIAS_TEMPLATES_TRAIN

    return {
        "train": world_bias_pairs(world, BIAS_TEMPLATES_TRAIN[:3]),
        "dev": world_bias_pairs(world, BIAS_TEMPLATES_TRAIN[3:]),
        "test": world_bias_pairs(world, BIAS_TEMPLATES_HELDOUT),
    }


# --- StereoSet -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StereoSetTriple:
    """One StereoSet intrasentence item: the three completions of one context.

    ``stereotype`` / ``anti_stereotype`` / ``unrelated`` are full sentences; ``pair`` compares the
    first two (stereotype advantaged).
    """

    id: str
    target: str
    bias_type: str
    context: str
    stereotype: str
    anti_stereotype: str
    unrelated: str

    @property
    def pair(self) -> ContrastivePair:
        return ContrastivePair(self.stereotype, self.anti_stereotype, group=self.bias_type, meta={"id": self.id})


def load_stereoset_intrasentence(path: str | os.PathLike) -> list[StereoSetTriple]:
    """StereoSet's JSON (``{"data": {"intrasentence": [...]}}``, e.g. ``dev.json``) as triples.

    Each item needs ``id``, ``target``, ``bias_type``, ``context`` and three ``sentences`` with
    ``gold_label`` stereotype / anti-stereotype / unrelated; a malformed item raises
    ``DataFormatError`` naming its index and id.
    """
    src = _file(path, "dev.json")
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
        items = data["data"]["intrasentence"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataFormatError(f"{src}: not StereoSet JSON with data.intrasentence ({err})") from None
    triples = []
    for i, item in enumerate(items):
        where = f"{src}: intrasentence[{i}] (id {item.get('id') if isinstance(item, dict) else None!r})"
        try:
            by_label = {s["gold_label"]: s["sentence"] for s in item["sentences"]}
            triples.append(
                StereoSetTriple(
                    str(item["id"]),
                    item["target"],
                    item["bias_type"],
                    item["context"],
                    by_label["stereotype"],
                    by_label["anti-stereotype"],
                    by_label["unrelated"],
                )
            )
        except (KeyError, TypeError) as err:
            raise DataFormatError(f"{where}: missing field {err}") from None
    return triples
