"""The prompt types every stage shares: fact prompts, clean/corrupt pairs, and their tokenised
batches.

These are plain frozen dataclasses validated on construction; they know nothing about files
(``mechedit.data`` reads datasets into them) or tokenizers (``mechedit.tokens`` builds the
``Tokenized*`` batches from them for a given model).

Conventions
-----------
- A subject span is a **character** span ``(start, end)`` into ``FactPrompt.prompt``, half-open
  like a Python slice (``prompt[start:end] == subject``). Characters do not depend on the model;
  token positions do, so they are computed per model by ``mechedit.tokens.subject_token_positions``.
- Targets are stored as the data gives them (``"Paris"``, no leading space). Which token that is
  depends on the tokenizer and on the prompt it follows; ``mechedit.tokens`` resolves it in context.
- Tokenised batches are right-padded by default; each row's last real token index travels with
  the tokens (``last_positions``) so that metrics read the right position in every row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = [
    "FactPrompt",
    "facts_with_subjects",
    "PaddingSide",
    "PromptPair",
    "TokenizedContinuations",
    "TokenizedFacts",
    "TokenizedPairs",
    "TokenizedPrompts",
]


# --------------------------------------------------------------------------------------------
# Prompt types
# --------------------------------------------------------------------------------------------


def _require_text(value: Any, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class FactPrompt:
    """One factual prompt: ``prompt`` should be continued by ``target``.

    Attributes:
        prompt: the text the model continues, e.g. ``"The Eiffel Tower is located in"``. Leave
            no trailing space: BPE tokenizers attach the space to the next word.
        target: the true answer as text, e.g. ``"Paris"`` (a leading space is optional; the token
            is resolved in context by ``mechedit.tokens.answer_id``).
        subject: the entity the fact is about, e.g. ``"The Eiffel Tower"``; ``None`` for prompts
            whose subject is not recorded (CounterFact's neighbourhood prompts).
        subject_span: character span ``(start, end)`` of the subject in ``prompt``, half-open, so
            ``prompt[start:end] == subject``. Omitted -> the first occurrence of ``subject``.
        target_new: the answer an edit should install (CounterFact's ``target_new``), or ``None``.
        candidates: answers to choose among for candidate accuracy; must contain ``target`` (and
            ``target_new`` when given). ``None`` when there is no candidate set.
        relation_id: the relation, e.g. Wikidata ``"P17"``; ``None`` when unknown.
        record_id: the source record's id (``case_id`` / ``known_id``), for tracing results back.
    """

    prompt: str
    target: str
    subject: str | None = None
    subject_span: tuple[int, int] | None = None
    target_new: str | None = None
    candidates: tuple[str, ...] | None = None
    relation_id: str | None = None
    record_id: int | str | None = None

    def __post_init__(self) -> None:
        _require_text(self.prompt, "prompt")
        _require_text(self.target, "target")
        if self.target_new is not None:
            _require_text(self.target_new, "target_new")
            if self.target_new.strip() == self.target.strip():
                raise ValueError(
                    f"target_new equals target ({self.target!r}); an edit to the same answer is a "
                    "no-op. Pass a different target_new or leave it None."
                )
        if self.relation_id is not None and not isinstance(self.relation_id, str):
            raise ValueError(f"relation_id must be a string or None, got {self.relation_id!r}")
        self._check_subject()
        self._check_candidates()

    def _check_subject(self) -> None:
        if self.subject is None:
            if self.subject_span is not None:
                raise ValueError("subject_span was given without a subject; pass subject too")
            return
        _require_text(self.subject, "subject")
        if self.subject_span is None:
            start = self.prompt.find(self.subject)
            if start < 0:
                hint = (
                    " (it occurs with different letter case)"
                    if self.subject.lower() in self.prompt.lower()
                    else ""
                )
                raise ValueError(
                    f"subject {self.subject!r} does not occur in prompt {self.prompt!r}{hint}. "
                    "Matching is exact and case-sensitive: fix the subject, or pass "
                    "subject_span=(start, end) if the prompt spells it differently."
                )
            object.__setattr__(self, "subject_span", (start, start + len(self.subject)))
            return
        span = tuple(self.subject_span)
        if len(span) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in span):
            raise ValueError(
                f"subject_span must be two ints (start, end), got {self.subject_span!r}"
            )
        start, end = span
        if not 0 <= start < end <= len(self.prompt) or self.prompt[start:end] != self.subject:
            raise ValueError(
                f"subject_span {span} selects {self.prompt[max(start, 0) : max(end, 0)]!r} from "
                f"prompt {self.prompt!r}, not the subject {self.subject!r}; the span is in "
                "characters, half-open (prompt[start:end] == subject)."
            )
        object.__setattr__(self, "subject_span", (start, end))

    def _check_candidates(self) -> None:
        if self.candidates is None:
            return
        if isinstance(self.candidates, str):
            raise ValueError(
                f"candidates must be a sequence of answers, got the single string "
                f"{self.candidates!r}; wrap it, e.g. candidates=({self.candidates!r}, ...)"
            )
        cands = tuple(self.candidates)
        for c in cands:
            _require_text(c, "each candidate")
        if len(set(cands)) != len(cands):
            raise ValueError(f"candidates contain duplicates: {cands!r}")
        for name, answer in (("target", self.target), ("target_new", self.target_new)):
            if answer is not None and answer not in cands:
                raise ValueError(f"{name} {answer!r} is not among the candidates {cands!r}")
        object.__setattr__(self, "candidates", cands)

    @property
    def answer_index(self) -> int | None:
        """Index of ``target`` in ``candidates`` (``None`` without candidates)."""
        return None if self.candidates is None else self.candidates.index(self.target)


def facts_with_subjects(facts: Any, *, what: str = "facts", why: str = "") -> list[FactPrompt]:
    """``facts`` as a list, checked: a non-empty sequence of ``FactPrompt`` that all name a subject.

    For methods that read the subject's tokens (causal tracing corrupts them, a rank-one edit
    reads its key there). ``what`` names the argument in errors, ``why`` says why the subject is
    needed. Raises ``ValueError`` for a single fact or a string (wrap it: ``[fact]``), an empty
    sequence, a non-``FactPrompt`` item or a fact without ``subject``.
    """
    if isinstance(facts, (FactPrompt, str)) or not isinstance(facts, Sequence):
        raise ValueError(f"{what} must be a list of FactPrompt (wrap a single fact: [fact])")
    if not len(facts):
        raise ValueError(f"{what} is empty: give at least one FactPrompt with a subject")
    for i, fact in enumerate(facts):
        if not isinstance(fact, FactPrompt):
            raise ValueError(f"{what}[{i}] must be a FactPrompt, got {type(fact).__name__}")
        if fact.subject is None:
            raise ValueError(
                f"{what}[{i}] ({fact.prompt!r}) has no subject{': ' + why if why else ''}; "
                "pass FactPrompt(..., subject=...) as the prompt spells it"
            )
    return list(facts)


@dataclass(frozen=True, kw_only=True)
class PromptPair:
    """A clean/corrupt pair for patching: the two prompts differ only where the fact differs.

    ``answer`` is the clean prompt's correct continuation, ``wrong_answer`` the corrupt one's; both
    are resolved to one token each in the context of the clean prompt. ``clean`` and ``corrupt``
    must tokenise to the same length (checked by ``mechedit.tokens.tokenize_pairs``).
    """

    clean: str
    corrupt: str
    answer: str
    wrong_answer: str
    pair_id: int | str | None = None

    def __post_init__(self) -> None:
        for name in ("clean", "corrupt", "answer", "wrong_answer"):
            _require_text(getattr(self, name), name)
        if self.answer.strip() == self.wrong_answer.strip():
            raise ValueError(
                f"answer and wrong_answer are both {self.answer!r}: their logit difference is "
                "always 0. Use the corrupt prompt's answer as wrong_answer."
            )


# --------------------------------------------------------------------------------------------
# Tokenised batches (built by mechedit.tokens)
# --------------------------------------------------------------------------------------------

PaddingSide = Literal["right", "left"]


def _check_batch(
    fields: Mapping[str, Tensor | None], *, matrices: Iterable[str], padding_side: str
) -> int:
    """Check shapes, dtypes and devices shared by the tokenised batches; return the batch size.

    Value checks (index ranges) are skipped on the ``meta`` device, which has no values.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    matrices = list(matrices)
    ref = fields[matrices[0]]
    if not isinstance(ref, Tensor) or ref.ndim != 2:
        raise ValueError(f"{matrices[0]} must be a [batch, pos] tensor")
    batch, pos = ref.shape
    for name, value in fields.items():
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if name in matrices and tuple(value.shape) != (batch, pos):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {(batch, pos)}")
        if name not in matrices and value.shape[:1] != (batch,):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; its first axis must be {batch}"
            )
        if name != "attention_mask" and value.dtype != torch.long:
            raise ValueError(f"{name} must hold int64 token ids/indices, got {value.dtype}")
        if value.device != ref.device:
            raise ValueError(
                f"{name} is on {value.device} but {matrices[0]} on {ref.device}; move the whole "
                "batch with .to(device)"
            )
    mask = fields["attention_mask"]
    if mask.dtype != torch.bool:
        raise ValueError(f"attention_mask must be bool, got {mask.dtype}")
    last = fields.get("last_positions")
    if last is not None and batch and ref.device.type != "meta":
        if last.min() < 0 or last.max() >= pos:
            raise ValueError(f"last_positions must lie in [0, {pos}), got {last.tolist()}")
    return batch


_B = TypeVar("_B", bound="_Batch")


class _Batch:
    """What every tokenised batch can do: its length, and moving all its tensors at once."""

    def __len__(self) -> int:
        return next(
            v.shape[0]
            for f in dataclasses.fields(self)
            if isinstance(v := getattr(self, f.name), Tensor)
        )

    @property
    def device(self) -> torch.device:
        """The device all of the batch's tensors are on."""
        return next(
            v.device
            for f in dataclasses.fields(self)
            if isinstance(v := getattr(self, f.name), Tensor)
        )

    def to(self: _B, device: torch.device | str) -> _B:
        """The same batch with every tensor on ``device`` (a new object; this one is unchanged)."""
        moved = {
            f.name: v.to(device)
            for f in dataclasses.fields(self)
            if isinstance(v := getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)


@dataclass(frozen=True)
class TokenizedPrompts(_Batch):
    """A padded batch of prompts.

    Attributes:
        tokens: ``Int[batch, pos]`` token ids; BOS first where it was prepended.
        attention_mask: ``Bool[batch, pos]``, True at real tokens (BOS included), False at padding.
        last_positions: ``Int[batch]``, index of each row's last real token: the position whose
            logits predict the next token.
        padding_side: ``"right"`` (default: logits at real positions equal the unpadded run's, no
            mask needed) or ``"left"`` (pass ``attention_mask`` to the model's forward).
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"]
    last_positions: Int[Tensor, " batch"]
    padding_side: PaddingSide = "right"

    def __post_init__(self) -> None:
        _check_batch(
            {
                "tokens": self.tokens,
                "attention_mask": self.attention_mask,
                "last_positions": self.last_positions,
            },
            matrices=("tokens", "attention_mask"),
            padding_side=self.padding_side,
        )


@dataclass(frozen=True)
class TokenizedPairs(_Batch):
    """A batch of clean/corrupt pairs; row ``i`` of both token tensors has the same real length.

    Attributes:
        clean_tokens, corrupt_tokens: ``Int[batch, pos]``, padded the same way.
        answer_ids, wrong_ids: ``Int[batch]``, the answer and wrong-answer token ids.
        last_positions: ``Int[batch]``, last real token of each row (shared by clean and corrupt).
        attention_mask: ``Bool[batch, pos]``, True at real tokens.
        padding_side: ``"right"`` or ``"left"``, as in ``TokenizedPrompts``.
    """

    clean_tokens: Int[Tensor, "batch pos"]
    corrupt_tokens: Int[Tensor, "batch pos"]
    answer_ids: Int[Tensor, " batch"]
    wrong_ids: Int[Tensor, " batch"]
    last_positions: Int[Tensor, " batch"]
    attention_mask: Bool[Tensor, "batch pos"]
    padding_side: PaddingSide = "right"

    def __post_init__(self) -> None:
        _check_batch(
            {
                "clean_tokens": self.clean_tokens,
                "corrupt_tokens": self.corrupt_tokens,
                "answer_ids": self.answer_ids,
                "wrong_ids": self.wrong_ids,
                "last_positions": self.last_positions,
                "attention_mask": self.attention_mask,
            },
            matrices=("clean_tokens", "corrupt_tokens", "attention_mask"),
            padding_side=self.padding_side,
        )


@dataclass(frozen=True)
class TokenizedFacts(_Batch):
    """A batch of fact prompts with their answer token ids.

    Attributes:
        tokens, attention_mask, last_positions, padding_side: as in ``TokenizedPrompts``.
        target_ids: ``Int[batch]``, the true answer's token id in context.
        target_new_ids: ``Int[batch]`` or ``None`` when the facts carry no ``target_new``.
        candidate_ids: ``Int[batch, k]`` or ``None`` when the facts carry no candidates.
        answer_index: ``Int[batch]``, index of ``target`` within each row of ``candidate_ids``
            (``None`` with ``candidate_ids``).
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"]
    last_positions: Int[Tensor, " batch"]
    target_ids: Int[Tensor, " batch"]
    target_new_ids: Int[Tensor, " batch"] | None = None
    candidate_ids: Int[Tensor, "batch k"] | None = None
    answer_index: Int[Tensor, " batch"] | None = None
    padding_side: PaddingSide = "right"

    def __post_init__(self) -> None:
        if (self.candidate_ids is None) != (self.answer_index is None):
            raise ValueError("candidate_ids and answer_index come together: pass both or neither")
        _check_batch(
            {
                "tokens": self.tokens,
                "attention_mask": self.attention_mask,
                "last_positions": self.last_positions,
                "target_ids": self.target_ids,
                "target_new_ids": self.target_new_ids,
                "candidate_ids": self.candidate_ids,
                "answer_index": self.answer_index,
            },
            matrices=("tokens", "attention_mask"),
            padding_side=self.padding_side,
        )


@dataclass(frozen=True)
class TokenizedContinuations(_Batch):
    """A batch of prompts each followed by a continuation to score token by token.

    Row ``b`` holds ``[BOS] prompt_b continuation_b`` then padding. Continuation token ``j`` of
    row ``b`` sits at position ``continuation_starts[b] + j`` and is predicted by the logits at
    the position before it, so ``continuation_starts`` is always >= 1 (BOS or a prompt token
    comes first).

    Attributes:
        tokens: ``Int[batch, pos]`` token ids.
        attention_mask: ``Bool[batch, pos]``, True at real tokens (BOS included), False at padding.
        continuation_starts: ``Int[batch]``, position of each row's first continuation token.
        continuation_lengths: ``Int[batch]``, number of continuation tokens in each row (>= 1).
        padding_side: ``"right"`` or ``"left"``, as in ``TokenizedPrompts``.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"]
    continuation_starts: Int[Tensor, " batch"]
    continuation_lengths: Int[Tensor, " batch"]
    padding_side: PaddingSide = "right"

    def __post_init__(self) -> None:
        _check_batch(
            {
                "tokens": self.tokens,
                "attention_mask": self.attention_mask,
                "continuation_starts": self.continuation_starts,
                "continuation_lengths": self.continuation_lengths,
            },
            matrices=("tokens", "attention_mask"),
            padding_side=self.padding_side,
        )
        _check_spans(self.continuation_starts, self.continuation_lengths, self.tokens.shape[1])

    @property
    def last_positions(self) -> Int[Tensor, " batch"]:
        """``Int[batch]``, each row's last real token (the continuation's last token)."""
        return self.continuation_starts + self.continuation_lengths - 1


def _check_spans(starts: Tensor, lengths: Tensor, n_pos: int) -> None:
    """Continuation spans ``[start, start + length)`` must be non-empty, inside the row, and
    start at >= 1 (something must predict their first token)."""
    if not len(starts) or starts.device.type == "meta":
        return
    if starts.min() < 1:
        raise ValueError(
            f"continuation_starts must be >= 1 (a BOS or prompt token predicts the first "
            f"continuation token), got {starts.tolist()}"
        )
    if lengths.min() < 1:
        raise ValueError(f"continuation_lengths must be >= 1, got {lengths.tolist()}")
    if (starts + lengths).max() > n_pos:
        raise ValueError(
            f"continuations starting at {starts.tolist()} with lengths {lengths.tolist()} run "
            f"past the {n_pos} positions of the batch"
        )
