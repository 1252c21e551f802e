"""The fact-edit report: efficacy, generalisation, specificity and fluency, before vs after.

One call, ``evaluate_fact_edit``, measures the model as it is and with an edit applied, and
returns an ``EditReport`` (rows of suite x metric, before and after; JSON and a DataFrame).

Forget and edit cases
---------------------
A **forget** case asks the old (true) answer to go; an **edit** case asks a new answer to come
(and the old one, usually, to go). ``fact_edit_suites(world, facts, new_values=None)`` builds
the prompts of one case from fact-world facts (``FactEditSuites``); any other data source can
fill a ``FactEditSuites`` by hand. Its suites, each measured before and after:

* ``efficacy`` - the edited facts in their training templates (the prompts an editor trains on);
* ``paraphrase`` - the same facts in the relation's held-out templates (never trained);
* ``multiple_choice`` - the fact as a four-option question (``World.mc_questions``' format),
  the answer a letter; an edit case's options hold both the old and the new value;
* ``neighbourhood`` - other people's facts of the same relation and value (ROME's neighbourhood),
  which should keep their answer (and, in an edit case, not move to the new one);
* ``same_subject`` - the edited people's other relations, which should be untouched;
* ``fluency`` - perplexity on held-out general text.

Teacher-forced and generated measurements
-----------------------------------------
An answer ``a = (a_1, ..., a_m)`` is the tokens it adds after its prompt ``x`` (resolved in
context, ``mechedit.tokens.answer_ids``). Both measurements run the same forward passes a
generation would: the input ends at the position that predicts the next token, so an activation
edit at "the last token" (``pos=-1``) acts where it would act while generating. (The usual
single pass over ``x a`` gives the same teacher-forced numbers for weight edits, but moves such
an activation edit onto the answer's last token.)

* **Teacher-forced** (``measure="teacher_forced"``): step ``j`` is fed the *true* prefix
  ``x a_<j``. Per item: ``logprob = sum_j log p(a_j | x, a_<j)`` (nats, <= 0; multi-token answers
  summed), ``p = exp(logprob)`` (the probability of the whole answer), ``token_accuracy`` = the
  fraction of steps whose argmax over the vocabulary is ``a_j`` (partial credit; EasyEdit's
  "teacher-forced accuracy"), ``rank`` = the worst step's rank of ``a_j`` (1 + the number of tokens
  with a strictly higher logit; 1 = every token top-1). Reported: the means of ``p``,
  ``logprob`` and ``token_accuracy``, the **median** ``rank`` and ``mrr`` (the mean of
  ``1 / rank``, in (0, 1]; it moves when the median hides a minority) over items, suffixed ``_true``
  (the world's answer) or ``_new`` (the edit's). In an edit case also ``new_beats_true``, the
  fraction with ``logprob_new > logprob_true`` (CounterFact's efficacy score; on neighbours, the
  complement of its neighbourhood score). Where a suite's prompts list ``candidates`` (multiple
  choice: the option letters; ``fact_edit_suites``' other suites: the relation's values) also
  ``choice_accuracy_*``, the fraction whose answer has the highest logit among the candidates'
  tokens (accuracy renormalised over the candidates: the usual MC score; candidates must be one
  token each).
* **Generated** (``measure="generated"``): step ``j`` is fed the model's *own* greedy tokens.
  ``exact_*`` is the fraction of items whose greedy continuation of exactly ``m`` tokens equals
  ``a``.

Why they disagree. For a one-token answer, ``token_accuracy`` and ``exact`` are the same event
(the answer is the argmax after the prompt), and for any answer "every teacher-forced step
top-1" is the same event as an exact greedy match: once the first token matches, generation
feeds the true prefix. They part where teacher forcing gives credit generation cannot: (1)
partial credit - a forgotten first token leaves later tokens top-1 given the true prefix, so
``token_accuracy`` stays at ``(m-1)/m`` while nothing of the answer is generated; (2) the true
prefix - after one wrong token generation never sees the true context again, teacher forcing
always does; (3) probabilities are not decisions - ``p_new`` can rise, or beat ``p_true``
(``new_beats_true``), while a third token is still the argmax, so generation says neither.
Teacher-forced numbers therefore overstate both efficacy (an edit case) and retention (a
neighbour); generated exact match is what a user of the edited model sees.

Legacy suites
-------------
``evaluate_fact_edit(model, edit=..., edited=..., paraphrases=..., neighbours=...,
fluency_texts=..., extra=...)`` still reports CounterFact's single-token suites (``efficacy``,
``generalisation``, ``specificity``, ``fluency`` and named ``extra`` suites) with ``p_target``
(mean probability of the true target), ``accuracy`` (fraction with the target top-1) and, when
the prompts carry a ``target_new``, ``p_new`` and ``new_beats_true``. Those rows have ``case``
and ``measure`` ``""``. Both kinds of rows can come from one call.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.nn.utils.rnn import pad_sequence

from mechedit.artifacts import (
    ArtifactError,
    check_json_able,
    check_keys,
    check_type,
    read_json,
    write_json_atomic,
)
from mechedit.checks import require_eval_mode
from mechedit.edit import Edit
from mechedit.edit.protocol import applied_edit
from mechedit.generation import greedy_continuations
from mechedit.interventions import real_tokens
from mechedit.metrics import perplexity, target_logprob, top1_correct
from mechedit.models import is_masked_lm, model_device
from mechedit.prompts import FactPrompt
from mechedit.tokens import tokenize_continuations, tokenize_facts
from mechedit.zoo.world import MC_LETTERS, Fact, MCQuestion, World, fill

REPORT_FORMAT = "mechedit.edit_report"
#: Version 2 added each row's ``case`` and ``measure``; version 1 files still load (both "").
REPORT_VERSION = 2
_READS = (1,)
#: The suites of a ``FactEditSuites`` case, in report order (``fluency`` comes last).
SUITES = ("efficacy", "paraphrase", "multiple_choice", "neighbourhood", "same_subject")
MEASURES = ("teacher_forced", "generated")
# JSON has no NaN or infinities; a metric can be either (perplexity of an impossible text), so the
# report stores those as these strings.
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class ReportFormatError(ArtifactError):
    """A saved edit report that is missing, malformed, or of another format or version."""


def _number_to_json(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _number_from_json(value: object, *, where: str) -> float:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    check_type(value, (int, float), error=ReportFormatError, where=where)
    return float(value)


# --------------------------------------------------------------------------------------------
# Single-token scores (the legacy suites)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def fact_item_scores(model: Any, facts: Sequence[FactPrompt], *, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-fact ``[n]`` tensors: ``p_target``, ``accuracy`` (and ``p_new``, ``new_beats_true``).

    Each batch runs inside ``real_tokens(batch)``, so an applied activation edit at ``pos=-1``
    edits every prompt's own last token. Tensors are on the model's device.
    """
    if not facts:
        raise ValueError("no facts to score")
    require_eval_mode(model, what="fact scoring")
    device = model_device(model)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(facts), batch_size):
        batch = tokenize_facts(model, list(facts[start : start + batch_size]))
        with real_tokens(batch):
            logits = model(batch.tokens.to(device))
        lp_true = target_logprob(logits, batch.target_ids, batch.last_positions)
        row = {
            "p_target": lp_true.exp(),
            "accuracy": top1_correct(logits, batch.target_ids, batch.last_positions).float(),
        }
        if batch.target_new_ids is not None:
            lp_new = target_logprob(logits, batch.target_new_ids, batch.last_positions)
            row["p_new"] = lp_new.exp()
            row["new_beats_true"] = (lp_new > lp_true).float()
        for key, value in row.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def fact_scores(model: Any, facts: Sequence[FactPrompt], *, batch_size: int = 256) -> dict[str, float]:
    """Means over ``facts`` of ``fact_item_scores``."""
    return {key: value.mean().item() for key, value in fact_item_scores(model, facts, batch_size=batch_size).items()}


# --------------------------------------------------------------------------------------------
# Answer scores: teacher-forced and generated, multi-token answers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerScores:
    """Per-item scores of answers after their prompts (see the module notes for definitions).

    Attributes:
        logprob: ``Float[n]``, teacher-forced ``sum_j log p(a_j | x, a_<j)`` (nats, <= 0).
        token_accuracy: ``Float[n]`` in [0, 1], fraction of teacher-forced steps whose argmax
            is the answer token.
        rank: ``Int[n]`` >= 1, the worst teacher-forced step's rank of its answer token.
        exact: ``Bool[n]``, the greedy continuation of ``n_tokens`` tokens equals the answer.
        n_tokens: ``Int[n]`` >= 1, tokens in each answer.
    """

    logprob: torch.Tensor
    token_accuracy: torch.Tensor
    rank: torch.Tensor
    exact: torch.Tensor
    n_tokens: torch.Tensor

    @property
    def p(self) -> torch.Tensor:
        """``Float[n]``, ``exp(logprob)``: the probability of the whole answer."""
        return self.logprob.exp()


def _pad_right(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [b, pos], mask [b, pos], last [b])`` of right-padded id rows."""
    lengths = torch.tensor([len(r) for r in rows])
    tokens = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return tokens, mask, lengths - 1


def _next_token_logits(model: Any, rows: list[torch.Tensor], pad_id: int, device: torch.device) -> torch.Tensor:
    """``Float[b, vocab]``: the logits after each row's last token, one right-padded forward.

    Inside ``real_tokens`` so that an activation edit at ``pos=-1`` acts on each row's own last
    token: the position that predicts, as during generation.
    """
    tokens, mask, last = _pad_right(rows, pad_id)
    with real_tokens(mask.to(device)):
        logits = model(tokens.to(device))
    return logits[torch.arange(len(rows), device=logits.device), last.to(logits.device)].float()


@torch.no_grad()
def answer_item_scores(
    model: Any, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 256
) -> AnswerScores:
    """Teacher-forced and generated scores of each ``answers[i]`` after ``prompts[i]``.

    Teacher forcing scores every (item, step) as one row, ``x a_<j`` predicting ``a_j``, all
    rows batched; generation takes its first token from the teacher-forced step 0 (the same
    input) and runs ``max m - 1`` further greedy steps over the prompts, each one forward of the
    batch (no key/value cache: answers are a few tokens). One-token answers cost one pass. BOS as
    ``model.to_tokens`` (``cfg.default_prepend_bos``). Causal LMs only.

    Raises:
        ValueError: lists of different lengths or empty, an answer that does not tokenise
            separately from its prompt or holds unknown words, a masked LM.
    """
    if is_masked_lm(model):
        raise ValueError(
            "answer_item_scores needs a causal LM (it generates); for a masked LM use "
            "fact_scores with single-token targets"
        )
    require_eval_mode(model, what="answer scoring")
    device = model_device(model)
    batch = tokenize_continuations(model, list(prompts), list(answers), device="cpu")
    pad_id = int(batch.tokens[0, 0])  # under right padding any id is safe: pads are never read
    starts, lengths = batch.continuation_starts.tolist(), batch.continuation_lengths.tolist()
    sequences = [batch.tokens[i, : s + m] for i, (s, m) in enumerate(zip(starts, lengths, strict=True))]
    answer_tokens = [seq[s:] for seq, s in zip(sequences, starts, strict=True)]

    # Teacher forcing: one row per (item, step).
    owner = torch.tensor([i for i, m in enumerate(lengths) for _ in range(m)])
    rows = [seq[: s + j] for seq, s, m in zip(sequences, starts, lengths, strict=True) for j in range(m)]
    targets = torch.cat(answer_tokens)
    logprob, top, rank = [], [], []
    for lo in range(0, len(rows), batch_size):
        logits = _next_token_logits(model, rows[lo : lo + batch_size], pad_id, device).cpu()
        target = targets[lo : lo + batch_size]
        chosen = logits.gather(1, target[:, None])[:, 0]
        logprob.append(logits.log_softmax(-1).gather(1, target[:, None])[:, 0])
        top.append(logits.argmax(-1))
        rank.append(1 + (logits > chosen[:, None]).sum(-1))
    n = len(sequences)
    m = torch.tensor(lengths)
    top = torch.cat(top)
    item_logprob = torch.zeros(n).index_add_(0, owner, torch.cat(logprob))
    item_acc = torch.zeros(n).index_add_(0, owner, (top == targets).float()) / m
    item_rank = torch.zeros(n, dtype=torch.long).scatter_reduce_(0, owner, torch.cat(rank), "amax")

    # Generation: greedy, each row fed its own previous choices. Its first step is the
    # teacher-forced step 0 (the prompt alone), so it starts from that argmax; a prompt asked
    # for several answers (the true and the new one) is generated once, to its longest answer.
    first = top[m.cumsum(0) - m]  # [n], the argmax after each prompt
    prompt_of = [tuple(batch.tokens[i, :s].tolist()) for i, s in enumerate(starts)]
    steps: dict[tuple[int, ...], int] = {}
    first_of: dict[tuple[int, ...], int] = {}
    for key, m_i, token in zip(prompt_of, lengths, first.tolist(), strict=True):
        steps[key] = max(steps.get(key, 0), m_i)
        first_of.setdefault(key, token)
    unique = list(steps)
    rest = greedy_continuations(model, [[*key, first_of[key]] for key in unique], [steps[key] - 1 for key in unique], batch_size)
    continuation = {key: torch.tensor([first_of[key], *tail], dtype=torch.long) for key, tail in zip(unique, rest, strict=True)}
    exact = torch.tensor(
        [torch.equal(continuation[key][:m_i], a) for key, m_i, a in zip(prompt_of, lengths, answer_tokens, strict=True)]
    )
    return AnswerScores(item_logprob, item_acc, item_rank, exact, m)


# --------------------------------------------------------------------------------------------
# The suites of one forget or edit case
# --------------------------------------------------------------------------------------------


def _as_prompts(name: str, values: Any) -> tuple[FactPrompt, ...]:
    if isinstance(values, FactPrompt):
        raise ValueError(f"{name} must be a list of FactPrompt, not one prompt; wrap it in a list")
    out = tuple(values)
    for i, item in enumerate(out):
        if not isinstance(item, FactPrompt):
            raise ValueError(f"{name}[{i}] must be a FactPrompt, got {type(item).__name__}")
    return out


@dataclass(frozen=True)
class FactEditSuites:
    """The prompts of one forget or edit case (see the module notes for each suite).

    Build it with ``fact_edit_suites(world, facts, new_values)`` or by hand. An **edit** case's
    ``efficacy``, ``paraphrase`` and ``multiple_choice`` prompts all carry a ``target_new``; a
    **forget** case's carry none. Specificity prompts (``neighbourhood``, ``same_subject``) may
    carry one (a neighbour should not move to the new answer) or not. Multiple-choice prompts
    answer a letter and list the option letters as ``candidates``.

    Attributes:
        efficacy, paraphrase, multiple_choice, neighbourhood, same_subject: fact prompts.
        fluency: held-out texts for perplexity.
        case: the label the report's rows carry; ``None`` -> ``"edit"`` or ``"forget"``.
        facts: what was edited, for the record: dicts of subject, relation_id, value, new_value.
    """

    efficacy: tuple[FactPrompt, ...]
    paraphrase: tuple[FactPrompt, ...] = ()
    multiple_choice: tuple[FactPrompt, ...] = ()
    neighbourhood: tuple[FactPrompt, ...] = ()
    same_subject: tuple[FactPrompt, ...] = ()
    fluency: tuple[str, ...] = ()
    case: str | None = None
    facts: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name in SUITES:
            object.__setattr__(self, name, _as_prompts(name, getattr(self, name)))
        if not self.efficacy:
            raise ValueError("efficacy is empty: a case needs the edited facts' own prompts")
        targeted = [p for name in ("efficacy", "paraphrase", "multiple_choice") for p in getattr(self, name)]
        with_new = {p.target_new is not None for p in targeted}
        if len(with_new) > 1:
            raise ValueError(
                "some efficacy/paraphrase/multiple_choice prompts carry a target_new and some do "
                "not; an edit case needs it on every one, a forget case on none (split them into "
                "two FactEditSuites)"
            )
        for i, p in enumerate(self.multiple_choice):
            if p.candidates is None:
                raise ValueError(
                    f"multiple_choice[{i}] has no candidates; list the option letters "
                    "(mc_item builds such prompts from an MCQuestion)"
                )
        if isinstance(self.fluency, str):
            raise ValueError("fluency must be a list of texts, not one string")
        object.__setattr__(self, "fluency", tuple(self.fluency))
        for i, text in enumerate(self.fluency):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"fluency[{i}] must be a non-empty string, got {text!r}")
        if self.case is None:
            object.__setattr__(self, "case", "edit" if with_new == {True} else "forget")
        if not isinstance(self.case, str) or not self.case.strip():
            raise ValueError(f"case must be a non-empty string, got {self.case!r}")
        object.__setattr__(self, "facts", tuple(dict(f) for f in self.facts))

    @property
    def is_edit(self) -> bool:
        """True for an edit case (a new answer should come), False for a forget case."""
        return self.efficacy[0].target_new is not None

    def sizes(self) -> dict[str, int]:
        """Items per suite (texts for ``fluency``)."""
        return {**{name: len(getattr(self, name)) for name in SUITES}, "fluency": len(self.fluency)}


def mc_item(question: MCQuestion, *, new_value: str | None = None) -> FactPrompt:
    """A multiple-choice question as a fact prompt: the true letter, the new one, the letters.

    The prompt is the question's (ending right before the letter); ``target`` is the true
    value's letter, ``target_new`` the letter of ``new_value`` (an edit case), ``candidates``
    the option letters.

    Raises:
        ValueError: a question without the true value among its options (``answer == ""``,
            built with ``without_value=True``), or a ``new_value`` that is not an option or
            equals the true value.
    """
    letters = MC_LETTERS[: len(question.options)]
    if question.answer not in letters:
        raise ValueError(
            f"the MC question about {question.subject!r} ({question.relation_id}) has answer "
            f"{question.answer!r}, not one of the letters {letters}: its options "
            f"{question.options} lack the true value (built with without_value=True?). Ask a "
            "question that lists the true value."
        )
    new_letter = None
    if new_value is not None:
        true_value = question.options[letters.index(question.answer)]
        if new_value == true_value:
            raise ValueError(
                f"new_value {new_value!r} is the true value of the MC question about "
                f"{question.subject!r}; an edit needs a different answer"
            )
        if new_value not in question.options:
            raise ValueError(
                f"the new answer {new_value!r} is not among the options {question.options} of the "
                f"MC question about {question.subject!r}; an edit case's question must offer it "
                "(fact_edit_suites puts it in place of a distractor)"
            )
        new_letter = letters[question.options.index(new_value)]
    return FactPrompt(
        prompt=question.prompt,
        target=question.answer,
        target_new=new_letter,
        candidates=tuple(letters),
        subject=question.subject,
        relation_id=question.relation_id,
    )


def _world_prompts(
    world: World, fact: Fact, templates: Iterable[str], new_value: str | None, *, candidates: bool
) -> list[FactPrompt]:
    values = None
    if candidates:  # the relation's values, and a new value from outside them
        values = tuple(dict.fromkeys((*world.relation[fact.relation_id].values, *([new_value] if new_value else []))))
    return [
        FactPrompt(
            prompt=fill(t, fact.subject),
            target=fact.value,
            target_new=new_value,
            subject=fact.subject,
            relation_id=fact.relation_id,
            candidates=values,
        )
        for t in templates
    ]


def _mc_questions(world: World, fact: Fact, new_value: str | None, split: str, *, seed: int, rotations: bool) -> list[MCQuestion]:
    """The fact's question with the true value at each letter in turn (or once), same options.

    In an edit case the new value replaces a distractor, one letter after the true value
    (cyclically), so neither answer sits at a fixed letter across the rotations.
    """
    key = f"edit-mc-{seed}-{fact.subject}-{fact.relation_id}"
    base = world.mc_question(fact, random.Random(key), split, value_at=0)
    options = list(base.options)
    if new_value is not None:
        if new_value in options:
            options.remove(new_value)
        options = [options[0], new_value, *options[1:]][: len(MC_LETTERS)]
    shifts = range(len(options)) if rotations else [random.Random(key).randrange(len(options))]
    out = []
    for k in shifts:
        rotated = options[-k:] + options[:-k] if k else options
        # one template per fact (options-first layout): the rotations ask the same question
        prompt = world.mc_prompt(fact, rotated, random.Random(key))
        out.append(MCQuestion(fact.subject, fact.relation_id, prompt, tuple(rotated), MC_LETTERS[k], split))
    return out


def fact_edit_suites(
    world: World,
    facts: Sequence[Fact],
    new_values: Sequence[str] | None = None,
    *,
    neighbours_per_fact: int | None = 8,
    exclude: Iterable[Fact] = (),
    mc_rotations: bool = True,
    mc_seed: int = 0,
    candidates: bool = True,
    fluency_texts: Sequence[str] | None = None,
    case: str | None = None,
) -> FactEditSuites:
    """The suites of a forget case (``new_values=None``) or an edit case, from fact-world facts.

    Args:
        world: the fact world (``zoo.load_world(name)``).
        facts: the edited facts, from ``world.facts`` or ``world.planted_facts``.
        new_values: ``None`` for a forget case, else the new answer of each fact (aligned with
            ``facts``; any word the tokenizer knows, usually another value of the relation).
        neighbours_per_fact: people per edited fact for the neighbourhood (same relation and
            value, ``World.neighbours``; edited people excluded), in every training template;
            ``None`` = all of them.
        exclude: facts kept out of the neighbourhood and same-subject suites, e.g. the retain
            set an edit was trained on (so specificity is measured on unseen facts).
        mc_rotations: ask each multiple-choice question four times with the true value at
            A, B, C and D (a letter preference cannot score); ``False`` asks it once.
        mc_seed: seeds the distractors.
        candidates: give every declarative prompt its relation's values as ``candidates``, so
            the report adds ``choice_accuracy_*``: accuracy renormalised over the relation's
            values (the measure Mechanistic Unlearning reports); ``False`` leaves them out.
        fluency_texts: texts for perplexity; ``None`` = ``world.text_heldout``.
        case: the rows' label; ``None`` -> ``"forget"`` or ``"edit"``.

    Returns:
        ``FactEditSuites``: ``efficacy`` (training templates), ``paraphrase`` (held-out
        templates), ``multiple_choice`` (letters; each edit-case question lists the new value),
        ``neighbourhood``, ``same_subject`` (the edited people's other relations, edited
        relations excluded), ``fluency``. In an edit case the first three carry ``target_new``
        and so do the neighbours (whose true value is the edited fact's).

    Raises:
        ValueError: no facts, a fact not in ``world`` (saying what the world holds), duplicate
            facts, ``new_values`` of another length, a new value equal to the old one.
    """
    if isinstance(facts, Fact):
        raise ValueError("facts must be a list of Fact, not one fact: [fact]")
    facts = list(facts)
    if not facts:
        raise ValueError("no facts: pass the edited facts, e.g. [world.facts[0]]")
    people = {p.name: p for p in (*world.people, *world.planted)}
    planted = {p.name for p in world.planted}
    for i, f in enumerate(facts):
        if not isinstance(f, Fact):
            raise ValueError(f"facts[{i}] must be a mechedit.zoo.world.Fact, got {type(f).__name__}")
        person = people.get(f.subject)
        if person is None:
            raise ValueError(
                f"facts[{i}]: no person {f.subject!r} in this world; pick facts from world.facts "
                f"or world.planted_facts (e.g. {world.facts[0]})"
            )
        if person.facts.get(f.relation_id) != f.value:
            held = person.facts.get(f.relation_id)
            what = f"{f.relation_id} = {held!r}" if held is not None else f"no {f.relation_id}; it has {sorted(person.facts)}"
            raise ValueError(f"facts[{i}]: {f} is not in this world: {f.subject!r} has {what}")
    if len(set(facts)) != len(facts):
        raise ValueError("facts contain duplicates; list each edited fact once")
    if new_values is not None:
        if isinstance(new_values, str):
            raise ValueError(f"new_values must be a list aligned with facts, not one string: [{new_values!r}]")
        new_values = list(new_values)
        if len(new_values) != len(facts):
            raise ValueError(f"{len(facts)} facts but {len(new_values)} new_values; pass one new value per fact")
        for i, (f, v) in enumerate(zip(facts, new_values, strict=True)):
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"new_values[{i}] must be a non-empty string, got {v!r}")
            if v.strip() == f.value:
                raise ValueError(
                    f"new_values[{i}] is {v!r}, the fact's current value ({f}); an edit needs a "
                    "different answer (for forgetting, pass new_values=None)"
                )
    news = new_values or [None] * len(facts)
    if neighbours_per_fact is not None and neighbours_per_fact < 0:
        raise ValueError(f"neighbours_per_fact must be >= 0 or None, got {neighbours_per_fact}")

    edited_people = {f.subject for f in facts}
    edited = set(facts)
    excluded = set(exclude)
    efficacy, paraphrase, mc, neighbourhood, same_subject = [], [], [], [], []
    seen_neighbours: set[tuple[Fact, str | None]] = set()
    for f, new in zip(facts, news, strict=True):
        rel = world.relation[f.relation_id]
        efficacy += _world_prompts(world, f, rel.train_templates, new, candidates=candidates)
        paraphrase += _world_prompts(world, f, rel.heldout_templates, new, candidates=candidates)
        split = "planted" if f.subject in planted else people[f.subject].mc_split
        mc += [mc_item(q, new_value=new) for q in _mc_questions(world, f, new, split, seed=mc_seed, rotations=mc_rotations)]
        near = [n for n in world.neighbours(f) if n.subject not in edited_people and n not in excluded]
        for n in near[:neighbours_per_fact] if neighbours_per_fact is not None else near:
            if (n, new) not in seen_neighbours:
                seen_neighbours.add((n, new))
                neighbourhood += _world_prompts(world, n, rel.train_templates, new, candidates=candidates)
        for rid, value in people[f.subject].facts.items():
            other = Fact(f.subject, rid, value)
            if other not in edited and other not in excluded:
                same_subject += _world_prompts(
                    world, other, world.relation[rid].train_templates, None, candidates=candidates
                )
    same_subject = list(dict.fromkeys(same_subject))  # two edited relations of one person
    return FactEditSuites(
        efficacy=tuple(efficacy),
        paraphrase=tuple(paraphrase),
        multiple_choice=tuple(mc),
        neighbourhood=tuple(neighbourhood),
        same_subject=tuple(same_subject),
        fluency=tuple(world.text_heldout if fluency_texts is None else fluency_texts),
        case=case,
        facts=tuple({**asdict(f), "new_value": v} for f, v in zip(facts, news, strict=True)),
    )


def _suite_item_scores(model: Any, prompts: Sequence[FactPrompt], batch_size: int) -> dict[tuple[str, str], torch.Tensor]:
    """``{(measure, metric): Float[n]}``: each item's score in one suite, in ``prompts`` order.

    The per-item values behind ``_suite_scores``: ``p_*``, ``logprob_*`` (nats), ``token_accuracy_*``,
    ``rank_*`` (>= 1), ``mrr_*`` (``1 / rank``), ``exact_*`` / ``new_beats_true`` /
    ``choice_accuracy_*`` (0 or 1). Every reported metric is the mean of its items except
    ``rank_*``, reported as the median.
    """
    answers = {"true": [p.target for p in prompts]}
    if all(p.target_new is not None for p in prompts):
        answers["new"] = [p.target_new for p in prompts]
    texts = [p.prompt for p in prompts]
    # both answers of an item in one call: their rows share batches
    keys = list(answers)
    scores = answer_item_scores(model, texts * len(keys), [a for k in keys for a in answers[k]], batch_size=batch_size)
    n = len(prompts)
    out: dict[tuple[str, str], torch.Tensor] = {}
    logprob = {}
    for k_i, key in enumerate(keys):
        part = slice(k_i * n, (k_i + 1) * n)
        logprob[key] = scores.logprob[part]
        out[("teacher_forced", f"p_{key}")] = scores.p[part]
        out[("teacher_forced", f"logprob_{key}")] = scores.logprob[part]
        out[("teacher_forced", f"token_accuracy_{key}")] = scores.token_accuracy[part]
        out[("teacher_forced", f"rank_{key}")] = scores.rank[part].float()
        out[("teacher_forced", f"mrr_{key}")] = 1.0 / scores.rank[part].float()
        out[("generated", f"exact_{key}")] = scores.exact[part].float()
    if "new" in logprob:
        out[("teacher_forced", "new_beats_true")] = (logprob["new"] > logprob["true"]).float()
    if all(p.candidates is not None for p in prompts):
        out.update(_choice_accuracy(model, prompts, batch_size))
    return out


def _suite_scores(items: dict[tuple[str, str], torch.Tensor]) -> dict[tuple[str, str], float]:
    """``{(measure, metric): value}`` of one suite from its item scores (means; ``rank_*`` the median)."""
    out = {}
    for (measure, metric), v in items.items():
        if metric.startswith("choice_accuracy_"):
            v = v[~v.isnan()]  # items without a target_new have no new-answer choice
        out[(measure, metric)] = float(statistics.median(v.tolist())) if metric.startswith("rank_") else v.mean().item()
    return out


@torch.no_grad()
def _choice_accuracy(model: Any, prompts: Sequence[FactPrompt], batch_size: int) -> dict[tuple[str, str], torch.Tensor]:
    """Per item (``Float[n]``, 0 or 1): is the true (new) answer's logit the highest among the candidates' tokens?

    NaN where an item has no ``target_new`` (the ``new`` tensor, when only some items carry one).
    """
    right: dict[str, torch.Tensor] = {}
    by_size: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_size.setdefault(len(p.candidates), []).append(i)
    for group in by_size.values():
        for lo in range(0, len(group), batch_size):
            index = group[lo : lo + batch_size]
            batch = tokenize_facts(model, [prompts[i] for i in index])
            with real_tokens(batch):
                logits = model(batch.tokens)
            rows = torch.arange(len(batch), device=logits.device)
            options = logits[rows, batch.last_positions].gather(1, batch.candidate_ids)  # [b, k]
            chosen = batch.candidate_ids.gather(1, options.argmax(-1, keepdim=True))[:, 0]
            answers = {"true": batch.target_ids, "new": batch.target_new_ids}
            for key, target in answers.items():
                if target is not None:  # grouped by candidate count: scatter back to prompt order
                    right.setdefault(key, torch.full((len(prompts),), math.nan))[index] = (chosen == target).float().cpu()
    return {("teacher_forced", f"choice_accuracy_{k}"): v for k, v in right.items()}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalRow:
    """One metric of one suite, before and after an edit, over ``n`` items.

    ``case`` is the ``FactEditSuites.case`` (``"forget"``, ``"edit"``, ...) and ``measure``
    ``"teacher_forced"`` or ``"generated"``; both are ``""`` for the legacy single-token suites.
    """

    suite: str
    metric: str
    before: float
    after: float
    n: int
    case: str = ""
    measure: str = ""

    @property
    def change(self) -> float:
        return self.after - self.before


_FRAME_COLUMNS = ["case", "suite", "measure", "metric", "before", "after", "change", "n"]


@dataclass(frozen=True)
class EditReport:
    """Before/after rows of an edit evaluation, with free-form context (edit description, seeds).

    ``items`` (from ``evaluate_fact_edit``; not saved by ``save``, not compared by ``==``): one
    dict per scored prompt, suite by suite: ``case``, ``suite``, ``item`` (its index in the
    suite), ``prompt``, ``subject``, ``relation_id``, ``target``, ``target_new``, ``record_id``,
    and ``before`` / ``after``: ``{metric: value}`` with the metric names of ``rows``. A row's
    value is the mean of its items' values (``rank_*``: the median); fluency is a corpus
    measure and has no items.
    """

    rows: tuple[EvalRow, ...]
    context: dict[str, Any]
    items: tuple[dict[str, Any], ...] = field(default=(), compare=False, repr=False)

    def get(self, suite: str, metric: str, *, case: str | None = None, measure: str | None = None) -> EvalRow:
        """The one row for ``suite`` / ``metric`` (narrowed by ``case`` / ``measure``).

        ``KeyError`` listing the rows that exist when none or several match.
        """
        found = [
            r
            for r in self.rows
            if (r.suite, r.metric) == (suite, metric)
            and (case is None or r.case == case)
            and (measure is None or r.measure == measure)
        ]
        if len(found) == 1:
            return found[0]
        what = "no row" if not found else f"{len(found)} rows (pass case= or measure=)"
        have = [(r.case, r.suite, r.measure, r.metric) for r in self.rows]
        raise KeyError(f"{what} for {suite}/{metric} (case={case!r}, measure={measure!r}); rows (case, suite, measure, metric): {have}")

    def to_frame(self) -> pd.DataFrame:
        """Columns case, suite, measure, metric, before, after, change, n (one row each)."""
        return pd.DataFrame([{**asdict(r), "change": r.change} for r in self.rows], columns=_FRAME_COLUMNS)

    def by_relation(self, metric: str = "accuracy") -> pd.DataFrame:
        """``metric`` before and after, averaged per (case, suite, relation) over the scored items.

        Columns case, suite, relation_id, before, after, change, n. Shows what one number per suite
        hides, e.g. a "same subject, other relations" drop that is all one relation. Needs the
        per-item scores (a report from ``evaluate_fact_edit``, not a loaded one).
        """
        if not self.items:
            raise ValueError("this report has no per-item scores (a loaded report keeps only its rows); "
                             "rerun evaluate_fact_edit")
        rows = [it for it in self.items if metric in it["before"]]
        if not rows:
            have = sorted({m for it in self.items for m in it["before"]})
            raise KeyError(f"no item has metric {metric!r}; per-item metrics: {have}")
        frame = pd.DataFrame([
            {"case": it["case"], "suite": it["suite"], "relation_id": it["relation_id"] or "?",
             "before": it["before"][metric], "after": it["after"][metric]} for it in rows
        ])
        out = frame.groupby(["case", "suite", "relation_id"], sort=False).agg(
            before=("before", "mean"), after=("after", "mean"), n=("before", "size")).reset_index()
        out.insert(5, "change", out["after"] - out["before"])
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON document (non-finite before/after values as ``"nan"``/``"inf"``/``"-inf"``)."""
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "rows": [
                {**asdict(r), "before": _number_to_json(r.before), "after": _number_to_json(r.after)}
                for r in self.rows
            ],
            "context": self.context,
        }

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically); ``ValueError`` if ``context`` is not plain JSON."""
        check_json_able(self.context, "EditReport.context")
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EditReport:
        """Read a saved report (version 2, or 1 without ``case``/``measure``).

        ``ReportFormatError`` (only) for anything missing or malformed.
        """
        err = ReportFormatError
        data = read_json(
            path,
            fmt=REPORT_FORMAT,
            version=REPORT_VERSION,
            error=err,
            expected="a report JSON written by EditReport.save",
            reads=_READS,
        )
        check_keys(data, required=("format", "version", "rows", "context"), error=err, where=str(path))
        check_type(data["rows"], list, error=err, where=f"{path}: 'rows'")
        check_type(data["context"], dict, error=err, where=f"{path}: 'context'")
        rows = []
        fields = ("suite", "metric", "before", "after", "n")
        labels = ("case", "measure") if data["version"] >= 2 else ()
        for i, row in enumerate(data["rows"]):
            at = f"{path}: rows[{i}]"
            check_type(row, dict, error=err, where=at)
            check_keys(row, required=(*fields, *labels), error=err, where=at)
            for key in ("suite", "metric", *labels):
                check_type(row[key], str, error=err, where=f"{at}[{key!r}]")
            check_type(row["n"], int, error=err, where=f"{at}['n']")
            if labels and row["measure"] not in ("", *MEASURES):
                raise err(f"{at}['measure'] is {row['measure']!r}; expected one of {['', *MEASURES]}")
            rows.append(
                EvalRow(
                    row["suite"],
                    row["metric"],
                    _number_from_json(row["before"], where=f"{at}['before']"),
                    _number_from_json(row["after"], where=f"{at}['after']"),
                    row["n"],
                    *(row[key] for key in labels),
                )
            )
        return cls(tuple(rows), data["context"])


# --------------------------------------------------------------------------------------------
# Before and after
# --------------------------------------------------------------------------------------------

Measured = dict[tuple[str, str, str, str], tuple[float, int]]  # (case, suite, measure, metric) -> (value, n)


Items = dict[tuple[str, str], dict[tuple[str, str], torch.Tensor]]  # (case, suite) -> (measure, metric) -> [n]


def _measure(
    model, suites: dict[str, Sequence[FactPrompt]], texts: Sequence[str], batch_size: int, items: Items | None = None
) -> Measured:
    out: Measured = {}
    for name, facts in suites.items():
        if facts:
            per_item = fact_item_scores(model, facts, batch_size=batch_size)
            for metric, value in per_item.items():
                out[("", name, "", metric)] = (value.mean().item(), len(facts))
            if items is not None:
                items[("", name)] = {("", metric): value.cpu() for metric, value in per_item.items()}
    if texts:
        out[("", "fluency", "", "perplexity")] = (perplexity(model, list(texts), batch_size=batch_size), len(texts))
    return out


def measure_cases(
    model: Any, cases: Sequence[FactEditSuites], batch_size: int = 256, *, items: Items | None = None
) -> Measured:
    """Every suite of ``cases`` measured on ``model`` as it is (both measures, all metrics).

    Returns ``{(case, suite, measure, metric): (value, n_items)}``; ``fluency`` is measured once
    per distinct text set. ``evaluate_fact_edit`` calls it before and after an edit; the
    robustness evaluation calls it on two models and under attacks. Given a dict ``items``, each
    suite's per-item scores go in as ``items[(case, suite)] = {(measure, metric): Float[n]}``.
    """
    out: Measured = {}
    fluency: dict[tuple[str, ...], float] = {}
    for case in cases:
        for name in SUITES:
            prompts = getattr(case, name)
            if prompts:
                per_item = _suite_item_scores(model, prompts, batch_size)
                for (measure, metric), value in _suite_scores(per_item).items():
                    out[(case.case, name, measure, metric)] = (value, len(prompts))
                if items is not None:
                    items[(case.case, name)] = per_item
        if case.fluency:
            if case.fluency not in fluency:  # cases usually share their texts: measure once
                fluency[case.fluency] = perplexity(model, list(case.fluency), batch_size=batch_size)
            out[(case.case, "fluency", "teacher_forced", "perplexity")] = (fluency[case.fluency], len(case.fluency))
    return out


def _check_cases(suites: FactEditSuites | Sequence[FactEditSuites] | None) -> list[FactEditSuites]:
    if suites is None:
        return []
    cases = [suites] if isinstance(suites, FactEditSuites) else list(suites)
    for i, case in enumerate(cases):
        if not isinstance(case, FactEditSuites):
            raise ValueError(
                f"suites[{i}] must be a FactEditSuites (fact_edit_suites(world, facts, new_values)), "
                f"got {type(case).__name__}"
            )
    names = [c.case for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"cases need distinct labels, got {names}; pass case='...' to fact_edit_suites")
    return cases


def evaluate_fact_edit(
    model: Any,
    *,
    edit: Edit | Callable[[], contextlib.AbstractContextManager[Any]],
    edited: Sequence[FactPrompt] = (),
    paraphrases: Sequence[FactPrompt] = (),
    neighbours: Sequence[FactPrompt] = (),
    fluency_texts: Sequence[str] = (),
    extra: dict[str, Sequence[FactPrompt]] | None = None,
    suites: FactEditSuites | Sequence[FactEditSuites] | None = None,
    batch_size: int = 256,
    context: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> EditReport:
    """Measure every suite on ``model`` as it is, then with ``edit`` applied, and report both.

    ``edit`` is an ``Edit`` (``mechedit.edit.Edit``: a ``WeightEdit`` or an activation edit
    such as ``ablate(model, circuit)``), applied with ``edit.applied(model)``, or a
    zero-argument callable returning a context manager. The model is left exactly as it was
    given.

    ``suites`` takes one or more forget/edit cases (``fact_edit_suites(world, facts,
    new_values)``; distinct ``case`` labels): each gets teacher-forced and generated rows per
    suite (see the module notes), and its fluency. The legacy arguments (``edited``,
    ``paraphrases``, ``neighbours``, ``fluency_texts``, ``extra``: single-token prompts) add the
    single-token rows, with ``case`` and ``measure`` ``""``. Empty suites are skipped. When
    ``suites`` are given, ``context["cases"]`` records each case's edited facts and sizes
    (unless ``context`` sets ``"cases"`` itself).

    Raises:
        ValueError: nothing to measure (neither ``edited`` nor ``suites``), cases with the same
            label, a suite item that cannot be scored (an answer the tokenizer does not know).
    """
    cases = _check_cases(suites)
    legacy = {"efficacy": edited, "generalisation": paraphrases, "specificity": neighbours, **(extra or {})}
    if not cases and not any(legacy.values()) and not fluency_texts:
        raise ValueError("nothing to evaluate: pass suites=fact_edit_suites(world, facts, ...) or edited=[FactPrompt, ...]")
    if progress:
        progress("measuring before the edit")
    items_before: Items = {}
    items_after: Items = {}
    before = {
        **_measure(model, legacy, fluency_texts, batch_size, items_before),
        **measure_cases(model, cases, batch_size, items=items_before),
    }
    if progress:
        progress("measuring with the edit")
    with applied_edit(model, edit):
        after = {
            **_measure(model, legacy, fluency_texts, batch_size, items_after),
            **measure_cases(model, cases, batch_size, items=items_after),
        }
    rows = tuple(
        EvalRow(suite, metric, value, after[key][0], n, case, measure)
        for key, (value, n) in before.items()
        for case, suite, measure, metric in [key]
    )
    context = dict(context or {})
    if cases:
        context.setdefault("cases", {c.case: {"facts": [dict(f) for f in c.facts], "sizes": c.sizes()} for c in cases})
    prompts = {**{("", name): facts for name, facts in legacy.items()},
               **{(c.case, name): getattr(c, name) for c in cases for name in SUITES}}
    return EditReport(rows, context, _item_rows(prompts, items_before, items_after))


def _item_rows(prompts: dict[tuple[str, str], Sequence[FactPrompt]], before: Items, after: Items) -> tuple[dict[str, Any], ...]:
    """One dict per scored prompt (see ``EditReport.items``), suites in measuring order."""
    out = []
    for case, suite in before:
        values = {
            when: {metric: [float(x) for x in v.tolist()] for (_, metric), v in measured[(case, suite)].items()}
            for when, measured in (("before", before), ("after", after))
        }
        for i, p in enumerate(prompts[(case, suite)]):
            out.append({
                "case": case, "suite": suite, "item": i, "prompt": p.prompt, "subject": p.subject,
                "relation_id": p.relation_id, "target": p.target, "target_new": p.target_new, "record_id": p.record_id,
                **{when: {metric: v[i] for metric, v in vals.items()} for when, vals in values.items()},
            })
    return tuple(out)
