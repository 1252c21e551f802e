"""Tokenisation helpers that catch what users get wrong: multi-token or unknown targets, a missing
or doubled BOS, padding, clean/corrupt prompts of different lengths, where the subject sits.

Every function takes a model (anything with a ``.tokenizer``, e.g. a ``TransformerBridge``) or a
Hugging Face tokenizer, and works the same for BPE tokenizers (GPT-2, Pythia: ``" Paris"`` with its
leading space is one token, ``"Paris"`` another) and for word-level ones (the fact world: every
word is one token, spaces only separate). Nothing dispatches on a model's name.

Conventions
-----------
- **BOS**: prompts are tokenised without the tokenizer's own special tokens and BOS is prepended
  here, once: by default when the model's ``cfg.default_prepend_bos`` says so (True for a bare
  tokenizer), matching what ``model.to_tokens`` feeds the model. A text that already starts with
  the BOS token does not get a second one (``model.to_tokens("<bos> w1")`` would give two).
- **Padding**: right by default. A causal model never attends from a real token to a later pad,
  and absolute positions (GPT-2) stay those of the unpadded prompt, so a right-padded batch's
  logits at real positions equal the unpadded runs' with no attention mask or position ids to
  pass around (hooks and patching code see plain ``[batch, pos]`` tokens). The price is that rows
  end at different positions: every batch carries ``last_positions``, and the metrics take them.
  ``padding_side="left"`` lines the last tokens up at ``pos - 1``; then run the model with
  ``attention_mask=batch.attention_mask`` so it masks the pads and shifts positions.
- **Answers in context**: an answer's token is the one the tokenizer produces when the answer
  follows the prompt (joined by one space unless either side already has whitespace). For a BPE
  model and prompt ``"... located in"`` the answer ``"Paris"`` is therefore ``" Paris"``, the
  token the model actually predicts; for a word-level model it is simply ``"Paris"``.
- **Devices**: the ``tokenize_*`` functions return their tensors on the model's device
  (``model_device``: where its parameters are; the CPU for a bare tokenizer), so a model on a GPU
  gets GPU tokens with no ``.to`` at the call site; ``device=`` overrides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mechedit.models import model_device
from mechedit.prompts import (
    FactPrompt,
    PaddingSide,
    PromptPair,
    TokenizedContinuations,
    TokenizedFacts,
    TokenizedPairs,
    TokenizedPrompts,
)

__all__ = [
    "pair_batch",
    "answer_id",
    "answer_ids",
    "get_tokenizer",
    "model_device",
    "single_token_id",
    "subject_token_positions",
    "token_ids",
    "tokenize_continuations",
    "tokenize_facts",
    "tokenize_pairs",
    "tokenize_prompts",
]


def get_tokenizer(model_or_tokenizer: Any) -> PreTrainedTokenizerBase:
    """The Hugging Face tokenizer of a model (its ``.tokenizer``), or the tokenizer itself."""
    if isinstance(model_or_tokenizer, PreTrainedTokenizerBase):
        return model_or_tokenizer
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if isinstance(tok, PreTrainedTokenizerBase):
        return tok
    raise TypeError(
        f"expected a model with a Hugging Face .tokenizer or a tokenizer, got "
        f"{type(model_or_tokenizer).__name__}; load models with mechedit.load(...)"
    )


def _on_device(batch: Any, model_or_tokenizer: Any, device: torch.device | str | None) -> Any:
    """``batch`` moved to ``device``, or to the model's device when ``device`` is None."""
    target = torch.device(device) if device is not None else model_device(model_or_tokenizer)
    return batch if target == batch.device else batch.to(target)


def _default_prepend_bos(model_or_tokenizer: Any, prepend_bos: bool | None) -> bool:
    if prepend_bos is not None:
        return bool(prepend_bos)
    return bool(getattr(getattr(model_or_tokenizer, "cfg", None), "default_prepend_bos", True))


def _pieces(tok: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own, so a BPE piece shows its leading space (' Paris')."""
    return [tok.decode([i], clean_up_tokenization_spaces=False) for i in ids]


def _encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _encode_many(tok: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]


def _check_known(tok: PreTrainedTokenizerBase, text: str, ids: Sequence[int], what: str) -> None:
    """An unknown word silently becomes <unk>, and every unknown target would then share one id."""
    unk = tok.unk_token_id
    if unk is not None and unk in ids and tok.unk_token not in text:
        raise ValueError(
            f"{what} {text!r} contains words the tokenizer does not know: it tokenises to "
            f"{_pieces(tok, ids)} with the unknown token {tok.unk_token!r}. Check spelling and "
            "case against the model's vocabulary."
        )


def token_ids(model_or_tokenizer: Any, text: str) -> list[int]:
    """All token ids of ``text`` as given: no BOS, no special tokens (explicit multi-token form)."""
    tok = get_tokenizer(model_or_tokenizer)
    ids = _encode(tok, text)
    _check_known(tok, text, ids, "text")
    return ids


def single_token_id(model_or_tokenizer: Any, text: str) -> int:
    """The id of ``text`` as given, which must be exactly one token.

    Raises ``ValueError`` listing the pieces when ``text`` is several tokens (or none, or an
    unknown word), and suggests the leading-space form when that one is a single token (BPE
    vocabularies store mid-sentence words with their space: ``" Paris"``). For an answer that
    follows a prompt, prefer ``answer_id``, which picks the in-context form for you.
    """
    tok = get_tokenizer(model_or_tokenizer)
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    ids = _encode(tok, text)
    _check_known(tok, text, ids, "text")
    if len(ids) == 1:
        return ids[0]
    hint = ""
    for alt in (" " + text.lstrip(), text.strip()):
        if alt != text:
            alt_ids = _encode(tok, alt)
            if len(alt_ids) == 1 and alt_ids[0] != tok.unk_token_id:
                hint = f" {alt!r} is a single token (id {alt_ids[0]}): did you mean it?"
                break
    raise ValueError(
        f"{text!r} is {len(ids)} tokens, not 1: {_pieces(tok, ids)}.{hint} "
        "For an answer after a prompt use answer_id(model, prompt, answer); for a deliberately "
        "multi-token answer use answer_ids / token_ids."
    )


def _join(prompt: str, answer: str, sep: str) -> str:
    if prompt[-1:].isspace() or answer[:1].isspace():
        return prompt + answer
    return prompt + sep + answer


def _split_answer(
    tok: PreTrainedTokenizerBase,
    prompt: str,
    answer: str,
    head: list[int],
    joined: list[int],
    *,
    sep: str,
    single: bool,
) -> list[int]:
    """The answer's ids: ``joined`` (prompt+answer) minus ``head`` (the prompt), checked."""
    if joined[: len(head)] != head or len(joined) == len(head):
        advice = (
            "Remove the trailing whitespace from the prompt: BPE tokenizers attach a space to "
            "the word after it."
            if prompt[-1:].isspace()
            else f"Separate them (sep={sep!r}) or rephrase so the answer starts a new token."
        )
        raise ValueError(
            f"answer {answer!r} does not tokenise separately from prompt {prompt!r}: the prompt "
            f"ends in {_pieces(tok, head[-3:])} but prompt+answer ends in "
            f"{_pieces(tok, joined[max(len(head) - 3, 0) :])}. {advice}"
        )
    ids = joined[len(head) :]
    _check_known(tok, answer, ids, "answer")
    if single and len(ids) != 1:
        raise ValueError(
            f"answer {answer!r} is {len(ids)} tokens after prompt {prompt!r}: "
            f"{_pieces(tok, ids)}. Pick a single-token answer, or score all its tokens with "
            "answer_ids(...)."
        )
    return ids


def _resolve_answers(
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    sep: str,
    single: bool,
    labels: Sequence[str] | None = None,
) -> list[list[int]]:
    """``answer_ids`` for many (prompt, answer) items with two batched tokenizer calls.

    An error is prefixed with the item's label (e.g. ``"fact 3"``) when labels are given.
    """

    def fail(k: int, message: str) -> ValueError:
        return ValueError(message if labels is None else f"{labels[k]}: {message}")

    for name, values in (("prompt", prompts), ("answer", answers)):
        for k, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise fail(k, f"{name} must be a non-empty string, got {value!r}")
    # Facts share prompts and answers (a target is also a candidate): encode each text once.
    unique = list(dict.fromkeys(prompts))
    heads = dict(zip(unique, _encode_many(tok, unique), strict=True))
    texts = [_join(p, a, sep) for p, a in zip(prompts, answers, strict=True)]
    unique = list(dict.fromkeys(texts))
    joined = dict(zip(unique, _encode_many(tok, unique), strict=True))
    out = []
    for k, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        try:
            ids = _split_answer(
                tok, prompt, answer, heads[prompt], joined[texts[k]], sep=sep, single=single
            )
            out.append(ids)
        except ValueError as err:
            raise fail(k, str(err)) from None
    return out


def answer_ids(model_or_tokenizer: Any, prompt: str, answer: str, *, sep: str = " ") -> list[int]:
    """Token ids that ``answer`` adds when it follows ``prompt`` (explicit multi-token form).

    The answer is joined to the prompt with ``sep`` (one space) unless the prompt ends or the
    answer starts with whitespace, then tokenised; the ids after the prompt's own ids are the
    answer's. Raises ``ValueError`` if the join changes how the prompt itself tokenises (a
    trailing space in a BPE prompt, or an answer that fuses with the prompt's last word), or if
    the answer holds an unknown word.
    """
    tok = get_tokenizer(model_or_tokenizer)
    return _resolve_answers(tok, [prompt], [answer], sep=sep, single=False)[0]


def answer_id(model_or_tokenizer: Any, prompt: str, answer: str, *, sep: str = " ") -> int:
    """The single token id of ``answer`` right after ``prompt`` (see ``answer_ids``).

    Raises ``ValueError`` listing the pieces when the answer is more than one token there.
    """
    tok = get_tokenizer(model_or_tokenizer)
    return _resolve_answers(tok, [prompt], [answer], sep=sep, single=True)[0][0]


def _with_bos(
    tok: PreTrainedTokenizerBase, ids: list[int], prepend_bos: bool
) -> tuple[list[int], int]:
    """``ids`` with BOS in front when asked (never twice); also the shift BOS added (0 or 1)."""
    if not prepend_bos:
        return ids, 0
    bos = tok.bos_token_id
    if bos is None:
        raise ValueError(
            "prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False "
            "(or set tokenizer.bos_token)."
        )
    if ids[:1] == [bos]:
        return ids, 0
    return [bos, *ids], 1


def _pad_id(tok: PreTrainedTokenizerBase) -> int:
    # Under right padding the pad id never influences real positions, so any valid id will do.
    for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _long(values: Sequence[Any]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _n_ctx(model_or_tokenizer: Any) -> int | None:
    return getattr(getattr(model_or_tokenizer, "cfg", None), "n_ctx", None)


def _pad(
    rows: Sequence[Sequence[int]], *, pad_id: int, padding_side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad id lists into ``tokens [batch, pos]``, ``mask [batch, pos]``, ``last [batch]``."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max())
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        tokens[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = True
    last = lengths - 1 if padding_side == "right" else torch.full_like(lengths, width - 1)
    return tokens, mask, last


def _prompt_rows(
    model_or_tokenizer: Any,
    texts: Sequence[str],
    *,
    prepend_bos: bool | None,
    padding_side: str,
    what: str = "prompt",
) -> list[list[int]]:
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if isinstance(texts, str):
        raise ValueError(f"pass a list of {what}s, not one string: [{texts!r}]")
    if len(texts) == 0:
        raise ValueError(f"no {what}s to tokenise")
    tok = get_tokenizer(model_or_tokenizer)
    bos = _default_prepend_bos(model_or_tokenizer, prepend_bos)
    n_ctx = _n_ctx(model_or_tokenizer)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{what} {i} must be a string, got {type(text).__name__}")
    rows = []
    for i, (text, ids) in enumerate(zip(texts, _encode_many(tok, texts), strict=True)):
        _check_known(tok, text, ids, f"{what} {i}")
        ids, _ = _with_bos(tok, ids, bos)
        if not ids:
            raise ValueError(f"{what} {i} ({text!r}) has no tokens; pass non-empty text")
        if n_ctx is not None and len(ids) > n_ctx:
            raise ValueError(
                f"{what} {i} is {len(ids)} tokens, longer than the model's context ({n_ctx}); "
                "split or shorten it."
            )
        rows.append(ids)
    return rows


def tokenize_prompts(
    model_or_tokenizer: Any,
    texts: Sequence[str],
    *,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide = "right",
    device: torch.device | str | None = None,
) -> TokenizedPrompts:
    """Tokenise prompts into one padded batch with each row's last real position.

    Args:
        texts: the prompts (a list, even for one).
        prepend_bos: put BOS first (never twice); ``None`` follows ``model.cfg.default_prepend_bos``
            (True for a bare tokenizer), i.e. what ``model.to_tokens`` does.
        padding_side: ``"right"`` (default, see the module notes) or ``"left"``.
        device: where to put the tensors; ``None`` = the model's device (``model_device``).

    Raises:
        ValueError: an empty list or text, or a prompt longer than the model's context.
    """
    rows = _prompt_rows(
        model_or_tokenizer, texts, prepend_bos=prepend_bos, padding_side=padding_side
    )
    tok = get_tokenizer(model_or_tokenizer)
    tokens, mask, last = _pad(rows, pad_id=_pad_id(tok), padding_side=padding_side)
    return _on_device(
        TokenizedPrompts(tokens, mask, last, padding_side), model_or_tokenizer, device
    )


def tokenize_pairs(
    model_or_tokenizer: Any,
    pairs: Sequence[PromptPair],
    *,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide = "right",
    device: torch.device | str | None = None,
) -> TokenizedPairs:
    """Tokenise clean/corrupt pairs; answers resolve to one token each after the clean prompt.

    ``prepend_bos``, ``padding_side`` and ``device`` are as in ``tokenize_prompts``.

    Raises:
        ValueError: a clean and corrupt prompt of different token lengths (naming the pair and
            both tokenisations: patching compares them position by position), or an answer
            that is not a single token in context.
    """
    if isinstance(pairs, PromptPair):
        raise ValueError("pass a list of PromptPair, not one pair: [pair]")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PromptPair):
            raise ValueError(f"pair {i} must be a PromptPair, got {type(pair).__name__}")
    tok = get_tokenizer(model_or_tokenizer)
    options = dict(prepend_bos=prepend_bos, padding_side=padding_side)
    clean = _prompt_rows(
        model_or_tokenizer, [p.clean for p in pairs], what="clean prompt", **options
    )
    corrupt = _prompt_rows(
        model_or_tokenizer, [p.corrupt for p in pairs], what="corrupt prompt", **options
    )
    for i, (pair, c, k) in enumerate(zip(pairs, clean, corrupt, strict=True)):
        if len(c) != len(k):
            name = f"pair {i}" + (f" (id {pair.pair_id!r})" if pair.pair_id is not None else "")
            raise ValueError(
                f"{name}: clean and corrupt prompts tokenise to different lengths, so positions do "
                f"not line up.\n  clean   ({len(c)} tokens): {_pieces(tok, c)}\n  corrupt "
                f"({len(k)} tokens): {_pieces(tok, k)}\nChoose a corruption that keeps the token "
                "count, e.g. swap a name for another single-token name."
            )
    labels = [f"pair {i}" for i in range(len(pairs))]
    clean_prompts = [p.clean for p in pairs]
    answers = _resolve_answers(
        tok, clean_prompts, [p.answer for p in pairs], sep=" ", single=True, labels=labels
    )
    wrongs = _resolve_answers(
        tok, clean_prompts, [p.wrong_answer for p in pairs], sep=" ", single=True, labels=labels
    )
    pad = _pad_id(tok)
    clean_t, mask, last = _pad(clean, pad_id=pad, padding_side=padding_side)
    corrupt_t, _, _ = _pad(corrupt, pad_id=pad, padding_side=padding_side)
    batch = TokenizedPairs(
        clean_t,
        corrupt_t,
        _long([ids[0] for ids in answers]),
        _long([ids[0] for ids in wrongs]),
        last,
        mask,
        padding_side,
    )
    return _on_device(batch, model_or_tokenizer, device)


def tokenize_facts(
    model_or_tokenizer: Any,
    facts: Sequence[FactPrompt],
    *,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide = "right",
    device: torch.device | str | None = None,
) -> TokenizedFacts:
    """Tokenise fact prompts with the token ids of their targets (one token each, in context).

    ``target_new_ids`` is filled when every fact has a ``target_new``; ``candidate_ids`` and
    ``answer_index`` when every fact has candidates, all of the same count. ``prepend_bos``,
    ``padding_side`` and ``device`` are as in ``tokenize_prompts``.

    Raises:
        ValueError: a target, new target or candidate that is not one token after its prompt
            (naming the fact), or candidate sets of different sizes.
    """
    if isinstance(facts, FactPrompt):
        raise ValueError("pass a list of FactPrompt, not one fact: [fact]")
    for i, fact in enumerate(facts):
        if not isinstance(fact, FactPrompt):
            raise ValueError(f"fact {i} must be a FactPrompt, got {type(fact).__name__}")
    rows = _prompt_rows(
        model_or_tokenizer,
        [f.prompt for f in facts],
        prepend_bos=prepend_bos,
        padding_side=padding_side,
    )
    tok = get_tokenizer(model_or_tokenizer)
    with_new = all(f.target_new is not None for f in facts)
    with_cands = all(f.candidates is not None for f in facts)
    if with_cands and len({len(f.candidates) for f in facts}) > 1:
        sizes = sorted({len(f.candidates) for f in facts})
        raise ValueError(
            f"facts have candidate sets of different sizes {sizes}; batch facts with equally "
            "many candidates together."
        )

    # All answers in one batched call: the targets, then the new targets, then the candidates.
    n, k = len(facts), len(facts[0].candidates) if with_cands else 0
    owners = [*range(n), *(range(n) if with_new else ()), *(i for i in range(n) for _ in range(k))]
    answers = [f.target for f in facts]
    answers += [f.target_new for f in facts] if with_new else []
    answers += [c for f in facts for c in f.candidates] if with_cands else []
    labels = [
        f"fact {i}"
        + (f" (record {facts[i].record_id!r})" if facts[i].record_id is not None else "")
        for i in owners
    ]
    prompts = [facts[i].prompt for i in owners]
    flat = [
        ids[0]
        for ids in _resolve_answers(tok, prompts, answers, sep=" ", single=True, labels=labels)
    ]
    targets = flat[:n]
    news = flat[n : 2 * n] if with_new else None
    offset = 2 * n if with_new else n
    cands = [flat[offset + i * k : offset + (i + 1) * k] for i in range(n)] if with_cands else None
    tokens, mask, last = _pad(rows, pad_id=_pad_id(tok), padding_side=padding_side)
    batch = TokenizedFacts(
        tokens,
        mask,
        last,
        _long(targets),
        None if news is None else _long(news),
        None if cands is None else _long(cands),
        _long([f.answer_index for f in facts]) if with_cands else None,
        padding_side,
    )
    return _on_device(batch, model_or_tokenizer, device)


def tokenize_continuations(
    model_or_tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide = "right",
    sep: str = " ",
    device: torch.device | str | None = None,
) -> TokenizedContinuations:
    """Tokenise ``prompt + continuation`` rows, recording where each continuation starts.

    A continuation's tokens are those it adds after its prompt (``answer_ids``: joined with
    ``sep`` unless either side has whitespace there), so for a BPE model ``"Paris"`` after
    ``"... located in"`` is scored as ``" Paris"``. An empty prompt (``""``) scores the
    continuation as a text of its own, given only BOS.

    BOS: prepended as in ``tokenize_prompts`` (``None`` follows ``model.cfg.default_prepend_bos``).
    It is what predicts the first token of a continuation whose prompt is empty, so an empty
    prompt needs BOS. With a non-empty prompt, BOS only changes the context.

    Raises:
        ValueError: lists of different lengths, an empty continuation, an empty prompt without
            BOS, a continuation that fuses with its prompt's last token, or a row longer than the
            model's context.
    """
    for name, values in (("prompts", prompts), ("continuations", continuations)):
        if isinstance(values, str):
            raise ValueError(f"pass a list of {name}, not one string: [{values!r}]")
    if len(prompts) != len(continuations):
        raise ValueError(
            f"{len(prompts)} prompts but {len(continuations)} continuations; pass one "
            "continuation per prompt"
        )
    if len(prompts) == 0:
        raise ValueError("no prompts to tokenise")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    tok = get_tokenizer(model_or_tokenizer)
    bos = _default_prepend_bos(model_or_tokenizer, prepend_bos)
    for i, (prompt, cont) in enumerate(zip(prompts, continuations, strict=True)):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} must be a string, got {type(prompt).__name__}")
        if not isinstance(cont, str) or not cont.strip():
            raise ValueError(f"continuation {i} must be a non-empty string, got {cont!r}")
        if not prompt and not bos:
            raise ValueError(
                f"prompt {i} is empty and no BOS is prepended, so nothing predicts the first "
                "token of its continuation; pass prepend_bos=True or a non-empty prompt"
            )
    # An empty prompt is BOS alone and its continuation a text of its own; every other
    # continuation is resolved in the context of its prompt.
    heads = [_with_bos(tok, [], True)[0] if not p else [] for p in prompts]
    tails = [_encode(tok, c) if not p else [] for p, c in zip(prompts, continuations, strict=True)]
    for i, (prompt, cont) in enumerate(zip(prompts, continuations, strict=True)):
        if not prompt:
            _check_known(tok, cont, tails[i], f"continuation {i}")
    with_prompt = [i for i, p in enumerate(prompts) if p]
    if with_prompt:
        texts = [prompts[i] for i in with_prompt]
        options = dict(prepend_bos=bos, padding_side=padding_side)
        resolved = _resolve_answers(
            tok,
            texts,
            [continuations[i] for i in with_prompt],
            sep=sep,
            single=False,
            labels=[f"continuation {i}" for i in with_prompt],
        )
        for i, head, tail in zip(
            with_prompt, _prompt_rows(model_or_tokenizer, texts, **options), resolved, strict=True
        ):
            heads[i], tails[i] = head, tail
    rows = [head + tail for head, tail in zip(heads, tails, strict=True)]
    n_ctx = _n_ctx(model_or_tokenizer)
    for i, row in enumerate(rows):
        if n_ctx is not None and len(row) > n_ctx:
            raise ValueError(
                f"prompt {i} with its continuation is {len(row)} tokens, longer than the model's "
                f"context ({n_ctx}); shorten it."
            )
    tokens, mask, last = _pad(rows, pad_id=_pad_id(tok), padding_side=padding_side)
    lengths = _long([len(t) for t in tails])
    batch = TokenizedContinuations(tokens, mask, last + 1 - lengths, lengths, padding_side)
    return _on_device(batch, model_or_tokenizer, device)


def subject_token_positions(
    model_or_tokenizer: Any,
    prompt: str | FactPrompt,
    subject: str | None = None,
    *,
    prepend_bos: bool | None = None,
) -> range:
    """Token positions the subject occupies in the tokenised prompt (BOS counted when prepended).

    Positions index the tokens ``tokenize_prompts`` produces for the same prompt and
    ``prepend_bos``. A token is part of the subject when its characters overlap the subject's; a
    BPE token such as ``" Massif"`` counts although its space lies outside.

    Args:
        prompt: the prompt text, or a ``FactPrompt`` (its ``subject_span`` is used).
        subject: the subject text (first occurrence, case-sensitive); omit with a ``FactPrompt``.

    Raises:
        ValueError: the subject does not occur in the prompt, or the tokenizer cannot report
            character offsets (a "slow" Python tokenizer: load the fast one).
    """
    tok = get_tokenizer(model_or_tokenizer)
    if isinstance(prompt, FactPrompt):
        if subject is not None and subject != prompt.subject:
            raise ValueError(f"subject {subject!r} disagrees with the fact's {prompt.subject!r}")
        if prompt.subject_span is None:
            raise ValueError(f"this fact has no subject (prompt {prompt.prompt!r})")
        text, (start, end) = prompt.prompt, prompt.subject_span
    else:
        if not isinstance(subject, str) or not subject:
            raise ValueError("pass the subject as a non-empty string")
        text, start = prompt, prompt.find(subject)
        if start < 0:
            raise ValueError(
                f"subject {subject!r} does not occur in prompt {prompt!r} (matching is exact and "
                "case-sensitive); pass the subject exactly as the prompt spells it."
            )
        end = start + len(subject)
    if not tok.is_fast:
        raise ValueError(
            f"{type(tok).__name__} is a slow tokenizer without character offsets; load the fast "
            "one (AutoTokenizer.from_pretrained(..., use_fast=True))."
        )
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [
        i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start
    ]
    if not inside:
        raise ValueError(
            f"no token of {text!r} covers characters {start}..{end} ({text[start:end]!r})"
        )
    _, shift = _with_bos(
        tok, list(enc["input_ids"]), _default_prepend_bos(model_or_tokenizer, prepend_bos)
    )
    return range(inside[0] + shift, inside[-1] + 1 + shift)


def pair_batch(model: Any, pairs: Sequence[PromptPair] | TokenizedPairs, *, what: str = "pairs") -> TokenizedPairs:
    """``pairs`` as a right-padded (or unpadded) ``TokenizedPairs`` on the model's device.

    What patching methods take: a list of ``PromptPair`` (tokenised here) or a batch tokenised
    already. Raises ``ValueError`` for an empty list, one pair instead of a list, or a
    left-padded batch (patched runs resume per position, which needs right padding).
    """
    if isinstance(pairs, TokenizedPairs):
        batch = pairs.to(model_device(model))
    else:
        if isinstance(pairs, PromptPair) or not isinstance(pairs, Sequence):
            raise ValueError(f"{what} must be a list of PromptPair (or a TokenizedPairs batch)")
        if not len(pairs):
            raise ValueError(f"{what} is empty: give at least one PromptPair")
        batch = tokenize_pairs(model, pairs, device=model_device(model))
    if not len(batch):
        raise ValueError(f"{what} is empty: give at least one PromptPair")
    if batch.padding_side != "right" and not bool(batch.attention_mask.all()):
        raise ValueError(f"{what} must be right-padded (or unpadded); tokenise with padding_side='right'")
    return batch
