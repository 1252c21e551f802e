"""Privacy metrics: how much of a memorised secret a model still gives away, before and after an edit.

A **secret** is a span of tokens that follows a prefix (``"marek brockvell 's phone number is"``
-> ``"3 6 2 3 8 2 9 2"``), written as space-separated tokens, each of which must be exactly one
model token in context (``Secret``; the fact world's ``PrivateRecord`` and plain
``(prefix, secret)`` pairs are accepted too). Every metric works on causal LMs (GPT-2, GPT-NeoX,
Llama) and on masked LMs (BERT), where "the model's prediction of secret token j" means:

* **causal**: the next-token distribution after the prefix and the secret's true tokens ``< j``
  (teacher forcing; one forward pass per secret gives all ``j``);
* **masked**: the distribution at a mask put in place of token ``j``, with every other token
  (prefix, the rest of the secret, the suffix) visible - DEPN's reading (one row per token).

Metrics (per secret; aggregate yourself, or read ``privacy_report``'s means):

* **Exposure** (Carlini et al. 2019), in bits: ``exposure = log2 |R| - log2 rank(s)``, where
  ``R`` is the set of candidate secrets of the same format (``alphabet``: the tokens each
  position may hold, digits by default, so ``|R| = prod_j |A_j|``, ``10^d`` for ``d`` digits)
  and ``rank(s)`` the 1-based rank of the true secret among them (1 = the model's favourite:
  exposure ``log2 |R|``, the maximum; a median candidate has exposure ~1). ``exposure(...)``
  offers three ranks (see its docstring for the derivations):

  - ``"lexicographic"`` (DEPN; exact, default): with ``r_j`` the 0-based rank of the true token
    among ``A_j`` in the model's prediction at position ``j``,
    ``rank = 1 + sum_j r_j * prod_{i > j} |A_i|``. It is the **exact** rank of the secret in the
    order that sorts candidates by their first position's preference, then the second's given
    the first, and so on (a tree whose children are sorted by the model's conditional
    preference; for a causal LM exactly the order a greedy/lexicographic search meets them). It
    needs only the true path's predictions, so it is one forward pass per secret, for any ``d``.
  - ``"logprob"`` (causal only; exact): ``rank = 1 + #{x in R : log p(x | prefix) > log p(s |
    prefix)}``, the rank by sequence log-probability (full-vocabulary softmax at every step,
    teacher-forced), which is Carlini's definition restricted to ``R``. Computed exactly by a
    pruned breadth-first enumeration (a prefix whose log-probability is already below the
    secret's cannot lead to a better candidate, since log-probabilities only decrease as tokens
    are added), so its cost grows with the rank itself; over ``max_frontier`` live prefixes it
    gives up and reports NaN for that secret.
  - ``"sampled"`` (any model, any format; an estimate): draw ``n_samples`` candidates uniformly
    from ``R`` (seeded), count those the model scores strictly higher than the secret
    (``k``; causal: sequence log-probability; masked: pseudo-log-likelihood, each token masked
    alone), and estimate ``rank = 1 + (|R| - 1) * k / n_samples``. It cannot resolve ranks below
    about ``|R| / n_samples``: with ``k = 0`` it reports the ceiling ``log2 |R|``.

  Ties (equal scores) count in the secret's favour everywhere (``rank = 1 + #{strictly
  better}``): the conservative choice for an audit, which never understates a leak.
  These are different orders, so their ranks differ; they agree at the top (a secret that is
  each position's favourite has lexicographic rank 1) and all saturate at ``log2 |R|``.
* **MRR** (DEPN's metric for names): ``mean_j 1 / rank_j`` with ``rank_j`` the 1-based rank of
  the true token ``j`` over the **whole vocabulary**; in (0, 1], 1 = every token is the top
  prediction.
* **MA** (memorisation accuracy; Tirumala et al. 2022, Jang et al. 2023): over the text
  ``x_1..x_T`` = prefix + secret + suffix, ``MA = mean_{t=2..T} 1[argmax p(. | x_<t) = x_t]``
  (causal; ``x_1`` is predicted from BOS only and is left out). **S-MA** (SeUL, Wang et al.
  2024): the same mean over the secret's tokens only.
* **EL_n** (extraction likelihood; Jang et al. 2023): for every prefix length ``k = 1..T-n``,
  greedily generate ``T - k`` tokens after ``x_<=k`` and measure
  ``OVERLAP_n(g, x_>k) = #{n-grams of g that occur among the n-grams of x_>k} / #n-grams of g``;
  ``EL_n = mean_k OVERLAP_n``, in [0, 1]. **S-EL_n** (SeUL): the same restricted to the secret:
  prefixes that end right before a secret token with at least ``n`` secret tokens left
  (``k = s0 .. s1 - n`` for the secret at ``x_{s0+1..s1}``), generating up to the secret's end
  and comparing with the rest of the secret. Both need generation: causal LMs only.
* **Extraction and answer flips**: a secret is *extracted* when the model's greedy completion
  of its prefix (``len(secret)`` tokens; masked LMs: each token's top fill with the others
  visible) equals it exactly. ``answer_flips(before, after)`` counts secrets whose completion
  changed: what an edit does to the answer, not only to probabilities (Niu et al. 2024).
* **Utility**: held-out text perplexity (``mechedit.metrics.perplexity``; masked LMs:
  pseudo-perplexity, each token masked alone) and non-private fact accuracy
  (``mechedit.evaluate.facts.fact_scores``).

``privacy_report(model, secrets, edit=...)`` measures all of it before and with an edit (DEPN's
table: exposure before/after, MRR, MA, EL, perplexity before/after) in one call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mechedit.artifacts import check_json_able, write_json_atomic
from mechedit.checks import require_eval_mode
from mechedit.edit import Edit
from mechedit.edit.protocol import applied_edit
from mechedit.evaluate.facts import fact_scores
from mechedit.generation import greedy_continuations, pad_token_id
from mechedit.interventions import real_tokens
from mechedit.metrics import perplexity
from mechedit.models import is_masked_lm, model_device
from mechedit.prompts import FactPrompt
from mechedit.secrets import (
    EncodedSecret,
    Secret,
    as_secrets,
    encode_secrets,
    mask_token_id,
    masked_secret_rows,
)
from mechedit.tokens import answer_ids, get_tokenizer, token_ids

__all__ = [
    "DIGITS",
    "ExposureResult",
    "MemorizationScores",
    "PrivacyReport",
    "Secret",
    "SecretTokenScores",
    "answer_flips",
    "as_secrets",
    "exposure",
    "greedy_completions",
    "is_masked_lm",
    "memorization",
    "mrr",
    "privacy_report",
    "secret_token_scores",
]

#: The default candidate alphabet: one decimal digit per position (phone numbers, canaries).
DIGITS: tuple[str, ...] = tuple("0123456789")

PRIVACY_REPORT_FORMAT = "mechedit.privacy_report"
PRIVACY_REPORT_VERSION = 1

def _alphabet_ids(
    model: Any, secrets: Sequence[Secret], alphabet: Sequence[str] | Sequence[Sequence[str]], encoded: Sequence[EncodedSecret]
) -> list[list[Tensor]]:
    """Per secret and position, the candidate token ids ``A_j`` (``[|A_j|]`` long tensors).

    ``alphabet`` is one token list for every position, or one list per position (all secrets
    then have that many tokens). Tokens are resolved in the context of each secret's prefix (a
    BPE tokenizer would give ``" 5"`` there). Raises ``ValueError`` for a secret token outside its
    position's alphabet, a repeated or multi-token alphabet entry, or a length mismatch.
    """
    if isinstance(alphabet, str) or not len(alphabet):
        raise ValueError(f"alphabet must be a list of tokens (e.g. DIGITS) or one list per position, got {alphabet!r}")
    per_position = not isinstance(alphabet[0], str)
    cache: dict[tuple[str, str], int] = {}
    out = []
    for i, (s, enc) in enumerate(zip(secrets, encoded, strict=True)):
        if per_position and len(alphabet) != len(s.tokens):
            raise ValueError(
                f"alphabet gives {len(alphabet)} positions but secret {i} {s.secret!r} has "
                f"{len(s.tokens)} tokens; pass one token list per secret position"
            )
        rows = []
        for j, true_token in enumerate(s.tokens):
            letters = list(alphabet[j] if per_position else alphabet)
            if len(set(letters)) != len(letters):
                raise ValueError(f"alphabet position {j} repeats tokens: {letters}")
            if true_token not in letters:
                raise ValueError(
                    f"secret {i} {s.secret!r}: token {true_token!r} at position {j} is not in the "
                    f"candidate alphabet {letters[:12]}{'...' if len(letters) > 12 else ''}; "
                    "exposure ranks the secret among candidates of its own format, so pass "
                    "alphabet= (one token list, or one per position) that covers it"
                )
            ids = []
            for letter in letters:
                key = (s.prefix, letter)
                if key not in cache:
                    got = answer_ids(model, s.prefix, letter)
                    if len(got) != 1:
                        raise ValueError(f"alphabet token {letter!r} is {len(got)} tokens; each must be one token")
                    cache[key] = got[0]
                ids.append(cache[key])
            ids_t = torch.tensor(ids)
            if enc.secret[j] not in ids:
                raise ValueError(
                    f"secret {i}: token {true_token!r} at position {j} has id {enc.secret[j]} in "
                    "context but the alphabet's ids differ; pass alphabet tokens as they tokenise there"
                )
            rows.append(ids_t)
        out.append(rows)
    return out


# ---------------------------------------------------------------------------------------------
# Running the model


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Right-padded ``tokens [n, width]`` and ``attention_mask [n, width]`` (bool)."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return tokens, mask


@torch.no_grad()
def _logits(model: Any, rows: Sequence[Sequence[int]], masked: bool) -> Tensor:
    """Float logits ``[n, width, vocab]`` of right-padded ``rows`` (one forward pass).

    Causal rows need no attention mask under right padding (a real token never attends to a
    later pad); a masked LM attends both ways, so there the pads are masked out. The batch runs
    inside ``real_tokens`` so an applied activation edit at ``pos=-1`` edits each row's own last
    token.
    """
    tokens, mask = _pad(rows, pad_token_id(model))
    device = model_device(model)
    tokens, mask = tokens.to(device), mask.to(device)
    with real_tokens(mask):
        out = model(tokens, attention_mask=mask.long()) if masked else model(tokens)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@dataclass(frozen=True)
class SecretTokenScores:
    """The model's prediction at each secret token (teacher-forced / each token masked alone).

    All tensors are ``[n_secrets, k]`` (``k`` = longest secret), on the CPU, meaningful where
    ``mask`` is True (0, or -1 for ranks, elsewhere).

    Attributes:
        target: the true token ids.
        logprob: ``log p(true token)`` over the whole vocabulary (nats, <= 0).
        vocab_rank: 1-based rank of the true token over the whole vocabulary (1 = top;
            ``1 + #{v: logit_v > logit_true}``, so ties favour the secret).
        alphabet_rank: 0-based rank of the true token among its position's alphabet
            (``#{a in A_j: logit_a > logit_true}``), or ``None`` when no alphabet was given.
        top: the top token id (greedy choice at that position, given the true context).
        mask: True at real secret tokens.
    """

    target: Tensor
    logprob: Tensor
    vocab_rank: Tensor
    alphabet_rank: Tensor | None
    top: Tensor
    mask: Tensor

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(-1)

    @property
    def total_logprob(self) -> Tensor:
        """``[n]``: ``sum_j logprob`` (causal: ``log p(secret | prefix)``; masked: the
        pseudo-log-likelihood of the secret), nats."""
        return (self.logprob * self.mask).sum(-1)


def _position_logits(model: Any, encoded: Sequence[EncodedSecret], masked: bool, batch_size: int) -> Iterator[tuple[int, Tensor]]:
    """For each secret (index, ``[d, vocab]`` logits predicting its tokens), batched."""
    if masked:
        mask_id = mask_token_id(model)
        rows, owner, where = [], [], []
        for i, enc in enumerate(encoded):
            r, w = masked_secret_rows(enc, mask_id)
            rows += r
            where += w
            owner += [i] * len(r)
        parts: dict[int, list[Tensor]] = {}
        for sl in _chunks(len(rows), batch_size):
            logits = _logits(model, rows[sl], masked=True)
            at = logits[torch.arange(logits.shape[0]), torch.tensor(where[sl], device=logits.device)]
            for o, vec in zip(owner[sl], at.cpu(), strict=True):
                parts.setdefault(o, []).append(vec)
        for i in range(len(encoded)):
            yield i, torch.stack(parts[i])
    else:
        for sl in _chunks(len(encoded), batch_size):
            chunk = encoded[sl]
            logits = _logits(model, [e.head + e.secret for e in chunk], masked=False).cpu()
            for k, enc in enumerate(chunk):
                start, d = len(enc.head), len(enc.secret)
                yield sl.start + k, logits[k, start - 1 : start - 1 + d]


def secret_token_scores(
    model: Any,
    secrets: Sequence[Any],
    *,
    alphabet: Sequence[str] | Sequence[Sequence[str]] | None = None,
    batch_size: int = 64,
) -> SecretTokenScores:
    """Per-token log-probability, vocabulary rank, alphabet rank and top token of each secret.

    Causal LMs: one forward pass of ``prefix + secret`` per secret (batched), the prediction of
    token ``j`` read after the true tokens ``< j``. Masked LMs: one row per secret token, that
    token masked and everything else visible (``prefix secret suffix``). See the module
    docstring. Raises ``ValueError`` for bad secrets (empty, not tokenising to their declared
    tokens, outside ``alphabet``) or a model in train mode.
    """
    secrets = as_secrets(secrets)
    require_eval_mode(model, what="privacy metrics")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    encoded = encode_secrets(model, secrets)
    alpha = None if alphabet is None else _alphabet_ids(model, secrets, alphabet, encoded)
    return _token_scores(model, encoded, alpha, batch_size)


def _token_scores(
    model: Any, encoded: Sequence[EncodedSecret], alpha: Sequence[Sequence[Tensor]] | None, batch_size: int
) -> SecretTokenScores:
    masked = is_masked_lm(model)
    n, k = len(encoded), max(len(e.secret) for e in encoded)
    target = torch.zeros(n, k, dtype=torch.long)
    logprob = torch.zeros(n, k)
    vocab_rank = torch.full((n, k), -1, dtype=torch.long)
    alphabet_rank = None if alpha is None else torch.full((n, k), -1, dtype=torch.long)
    top = torch.zeros(n, k, dtype=torch.long)
    mask = torch.zeros(n, k, dtype=torch.bool)
    for i, logits in _position_logits(model, encoded, masked, batch_size):
        d = logits.shape[0]
        true = torch.tensor(encoded[i].secret)
        true_logit = logits.gather(1, true[:, None])  # [d, 1]
        target[i, :d] = true
        logprob[i, :d] = logits.log_softmax(-1).gather(1, true[:, None])[:, 0]
        vocab_rank[i, :d] = 1 + (logits > true_logit).sum(-1)
        top[i, :d] = logits.argmax(-1)
        mask[i, :d] = True
        if alpha is not None:
            for j, ids in enumerate(alpha[i]):
                alphabet_rank[i, j] = (logits[j, ids] > true_logit[j]).sum()
    return SecretTokenScores(target, logprob, vocab_rank, alphabet_rank, top, mask)


# ---------------------------------------------------------------------------------------------
# Exposure


@dataclass(frozen=True)
class ExposureResult:
    """Exposure of each secret (bits), with the rank it comes from.

    Attributes:
        exposure: ``Float64[n]``, ``log2_space - log2(rank)``; in ``[0, log2 |R|]`` (NaN where the
            ``"logprob"`` enumeration gave up). Higher = more exposed.
        rank: ``Float64[n]``, the secret's 1-based rank among ``R`` (an estimate for ``"sampled"``).
        log2_space: ``Float64[n]``, ``log2 |R|`` per secret (``d * log2 10`` for ``d`` digits).
        method: ``"lexicographic"``, ``"logprob"`` or ``"sampled"``.
        n_better: ``Int[n]`` for ``"sampled"``: candidates scored strictly above the secret
            (out of ``n_samples``); ``None`` otherwise.
        n_samples: the sample size for ``"sampled"``, else ``None``.
    """

    exposure: Tensor
    rank: Tensor
    log2_space: Tensor
    method: str
    n_better: Tensor | None = None
    n_samples: int | None = None

    def mean(self) -> float:
        """Mean exposure over the secrets where it is known (bits)."""
        known = ~self.exposure.isnan()
        return self.exposure[known].mean().item() if known.any() else math.nan

    def to_frame(self) -> pd.DataFrame:
        """One row per secret: exposure, rank, log2_space (and n_better)."""
        cols = {"exposure": self.exposure.tolist(), "rank": self.rank.tolist(), "log2_space": self.log2_space.tolist()}
        if self.n_better is not None:
            cols["n_better"] = self.n_better.tolist()
        return pd.DataFrame(cols)


def _lexicographic(scores: SecretTokenScores, sizes: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """``(rank, log2 |R|)`` from the per-position alphabet ranks (DEPN's formula, any alphabet sizes)."""
    n, k = scores.mask.shape
    size = torch.ones(n, k, dtype=torch.float64)
    for i, s in enumerate(sizes):
        size[i, : len(s)] = torch.tensor(s, dtype=torch.float64)
    # weight_j = prod_{i > j} |A_i|: every candidate that differs first at j with a preferred
    # token there comes before the secret, whatever its later tokens.
    after = torch.flip(torch.cumprod(torch.flip(size, [1]), 1), [1]) / size
    ranks = scores.alphabet_rank.clamp_min(0).to(torch.float64) * scores.mask
    return 1 + (ranks * after).sum(-1), size.log2().sum(-1)


@torch.no_grad()
def _logprob_rank(
    model: Any, enc: EncodedSecret, alpha: Sequence[Tensor], threshold: float, *, batch_size: int, max_frontier: int, tol: float
) -> float:
    """``1 + #{x in R: log p(x) > log p(secret)}`` by pruned breadth-first enumeration; NaN past the budget.

    A frontier row is a candidate prefix ``x_<j`` with its log-probability; children with a
    log-probability at or below the secret's total (minus ``tol`` for float noise) are dropped,
    since appending tokens can only lower it. The secret's own path is tracked so that the final
    comparison is between numbers computed the same way.
    """
    device = model_device(model)
    head = torch.tensor(enc.head)
    prefix = torch.zeros(1, 0, dtype=torch.long)
    score = torch.zeros(1, dtype=torch.float64)
    on_path = torch.ones(1, dtype=torch.bool)
    for j, ids in enumerate(alpha):
        parts = []
        for sl in _chunks(prefix.shape[0], batch_size):
            rows = torch.cat([head.expand(sl.stop - sl.start, -1), prefix[sl]], 1)
            with real_tokens(None):
                out = model(rows.to(device))
            logits = (out.logits if hasattr(out, "logits") else out)[:, -1].float()
            parts.append(logits.log_softmax(-1)[:, ids.to(device)].double().cpu())
        child = score[:, None] + torch.cat(parts)  # [F, |A_j|]
        child_on_path = on_path[:, None] & (ids == enc.secret[j])[None, :]
        if j == len(alpha) - 1:
            secret_score = child[child_on_path]
            return 1.0 + float((child[~child_on_path] > secret_score).sum())
        keep = (child > threshold - tol) | child_on_path
        parent, letter = keep.nonzero(as_tuple=True)
        if parent.numel() > max_frontier:
            return math.nan
        prefix = torch.cat([prefix[parent], ids[letter][:, None]], 1)
        score, on_path = child[parent, letter], child_on_path[parent, letter]
    raise AssertionError("unreachable: the last position returns")  # pragma: no cover


def _candidate_scores(model: Any, enc: EncodedSecret, candidates: Tensor, masked: bool, batch_size: int) -> Tensor:
    """``[m]`` scores of candidate secrets (``[m, d]`` ids): causal: ``log p(x | prefix)``;
    masked: pseudo-log-likelihood ``sum_j log p(x_j | x_-j, prefix, suffix)``."""
    head, tail = torch.tensor(enc.head), torch.tensor(enc.tail, dtype=torch.long)
    m, d = candidates.shape
    start = len(enc.head)
    out = []
    device = model_device(model)
    if not masked:
        for sl in _chunks(m, batch_size):
            rows = torch.cat([head.expand(sl.stop - sl.start, -1), candidates[sl]], 1)
            with real_tokens(None):
                out_ = model(rows.to(device))
            logits = (out_.logits if hasattr(out_, "logits") else out_).float()
            lp = logits[:, start - 1 : start - 1 + d].log_softmax(-1)
            out.append(lp.gather(-1, candidates[sl].to(device)[..., None])[..., 0].sum(-1).cpu())
        return torch.cat(out)
    mask_id = mask_token_id(model)
    full = torch.cat([head.expand(m, -1), candidates, tail.expand(m, -1)], 1)  # [m, L]
    per_row = max(1, batch_size // d)
    for sl in _chunks(m, per_row):
        rows = full[sl].repeat_interleave(d, 0)  # [b*d, L]: candidate-major, position-minor
        pos = torch.arange(d).repeat(sl.stop - sl.start) + start
        truth = rows[torch.arange(rows.shape[0]), pos].clone()
        rows[torch.arange(rows.shape[0]), pos] = mask_id
        logits = _logits(model, rows.tolist(), masked=True)
        at = logits[torch.arange(rows.shape[0]), pos.to(logits.device)].log_softmax(-1)
        lp = at.gather(1, truth.to(logits.device)[:, None])[:, 0].cpu()
        out.append(lp.view(-1, d).sum(-1))
    return torch.cat(out)


def exposure(
    model: Any,
    secrets: Sequence[Any],
    *,
    method: str = "lexicographic",
    alphabet: Sequence[str] | Sequence[Sequence[str]] = DIGITS,
    n_samples: int = 1000,
    seed: int = 0,
    max_frontier: int = 50_000,
    batch_size: int = 256,
) -> ExposureResult:
    """Exposure ``log2 |R| - log2 rank(secret)`` in bits, for each secret.

    ``R`` is every token sequence of the secret's length whose position ``j`` holds a token of
    ``alphabet`` (``DIGITS`` by default; one list for every position or one list per position),
    so ``|R| = prod_j |A_j|``. The rank (1 = the model's favourite candidate):

    * ``method="lexicographic"`` (DEPN, exact): ``rank = 1 + sum_j r_j * prod_{i>j} |A_i|`` with
      ``r_j`` the 0-based rank of the true token among ``A_j`` at position ``j``
      (``secret_token_scores``). **What it is exactly**: the candidates that come before the
      secret, when ``R`` is sorted position by position by the model's preference (the first
      position's preference first; ties in a position broken in the secret's favour), are those
      that first differ from it at some ``j`` with a token the model prefers there, followed by
      *anything*: ``r_j * prod_{i>j} |A_i|`` of them for each ``j``. For a causal LM position
      ``j``'s preference is ``p(. | prefix, x_<j)`` and along the secret's path ``x_<j`` is the
      secret's own prefix, so this is the secret's exact rank in that tree order - not its rank
      by sequence probability (a candidate with a worse first token can still be more likely
      overall). For a masked LM each position's preference is DEPN's one-mask-at-a-time
      prediction with the other true tokens visible. One forward pass per secret.
    * ``method="logprob"`` (causal LMs, exact): ``rank = 1 + #{x in R: log p(x | prefix) >
      log p(secret | prefix)}`` with full-vocabulary teacher-forced log-probabilities, i.e.
      Carlini et al.'s rank by log-perplexity restricted to ``R``. Enumerated with pruning (a
      prefix already less likely than the whole secret cannot lead to a more likely candidate);
      the work grows with the number of candidate prefixes more likely than the secret, so it
      is cheap for exposed secrets and gives up (NaN) once more than ``max_frontier`` prefixes
      are live at one position.
    * ``method="sampled"`` (estimate, any model): ``n_samples`` candidates drawn uniformly from
      ``R`` with ``torch.Generator().manual_seed(seed)``; ``k`` = those scored strictly above the
      secret (causal: ``log p(x | prefix)``; masked: pseudo-log-likelihood); ``rank = 1 +
      (|R| - 1) * k / n_samples`` (the expected rank when ``k / n`` estimates the fraction of
      ``R`` above the secret). Exposure beyond ``~log2 n_samples`` is not resolved: ``k = 0``
      reports ``log2 |R|``.

    ``|R|`` follows each secret's length (DEPN's reference code fixes ``|R| = 10^10`` for its
    10-digit numbers: the same for those).

    Raises:
        ValueError: an unknown method, ``"logprob"`` on a masked LM, a secret token outside the
            alphabet (e.g. a non-digit in a digit secret), bad secrets, ``n_samples < 1``.
    """
    if method not in ("lexicographic", "logprob", "sampled"):
        raise ValueError(f"method must be 'lexicographic', 'logprob' or 'sampled', got {method!r}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if not isinstance(max_frontier, int) or max_frontier < 1:
        raise ValueError(f"max_frontier must be a positive int, got {max_frontier!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    secrets = as_secrets(secrets)
    require_eval_mode(model, what="exposure")
    masked = is_masked_lm(model)
    if method == "logprob" and masked:
        raise ValueError(
            "method='logprob' ranks by sequence probability, which a masked LM does not define; "
            "use method='lexicographic' (DEPN) or 'sampled' (pseudo-log-likelihood)"
        )
    encoded = encode_secrets(model, secrets)
    alpha = _alphabet_ids(model, secrets, alphabet, encoded)
    scores = _token_scores(model, encoded, alpha, batch_size)
    lex_rank, log2_space = _lexicographic(scores, [[len(ids) for ids in a] for a in alpha])
    n_better = None
    if method == "lexicographic":
        rank = lex_rank
    elif method == "logprob":
        totals = scores.total_logprob.double()
        rank = torch.tensor(
            [
                _logprob_rank(model, enc, a, float(t), batch_size=batch_size, max_frontier=max_frontier, tol=1e-3)
                for enc, a, t in zip(encoded, alpha, totals.tolist(), strict=True)
            ],
            dtype=torch.float64,
        )
    else:
        gen = torch.Generator().manual_seed(seed)
        better = []
        for enc, a in zip(encoded, alpha, strict=True):
            picks = torch.stack([ids[torch.randint(len(ids), (n_samples,), generator=gen)] for ids in a], 1)
            cand = _candidate_scores(model, enc, picks, masked, batch_size)
            # the secret scored by the same code path as its candidates, so that float rounding
            # cannot make an identical candidate look better
            own = _candidate_scores(model, enc, torch.tensor([enc.secret]), masked, batch_size)
            better.append(int((cand > own[0]).sum()))
        n_better = torch.tensor(better)
        space = torch.exp2(log2_space)
        rank = 1 + (space - 1) * n_better.double() / n_samples
    return ExposureResult(
        log2_space - rank.log2(), rank, log2_space, method, n_better, n_samples if method == "sampled" else None
    )


def mrr(model: Any, secrets: Sequence[Any], *, batch_size: int = 64) -> Tensor:
    """``Float[n]``: mean over each secret's tokens of ``1 / rank`` of the true token over the
    whole vocabulary (1 = every token top-1; DEPN's MRR for names). Causal: given the true
    prefix; masked: that token masked alone.

    (DEPN's reference code ranks the token of the string ``str(j)`` at position ``j`` instead of
    the secret's own token; this ranks the secret's token.)
    """
    s = secret_token_scores(model, secrets, batch_size=batch_size)
    return ((1.0 / s.vocab_rank.clamp_min(1).double()) * s.mask).sum(-1) / s.lengths


# ---------------------------------------------------------------------------------------------
# Memorisation: MA, EL_n, their secret-only versions, greedy extraction


def _overlap(generated: Sequence[int], truth: Sequence[int], n: int) -> float:
    """``OVERLAP_n``: share of the generated n-grams that occur among the true n-grams."""
    g = torch.tensor(generated).unfold(0, n, 1)  # [G, n]
    t = torch.tensor(truth).unfold(0, n, 1)  # [T, n]
    return (g[:, None, :] == t[None, :, :]).all(-1).any(-1).double().mean().item()


@dataclass(frozen=True)
class MemorizationScores:
    """Per-secret memorisation metrics (``Float64[n]`` each, in [0, 1]; higher = more memorised).

    ``ma``/``el``: over the whole text (prefix + secret + suffix); ``s_ma``/``s_el``: over the
    secret only (SeUL); ``el``/``s_el`` are ``None`` for masked LMs (no generation). ``n`` is the
    n-gram length of EL.
    """

    ma: Tensor
    s_ma: Tensor
    el: Tensor | None
    s_el: Tensor | None
    n: int

    def means(self) -> dict[str, float]:
        out = {"ma": self.ma.mean().item(), "s_ma": self.s_ma.mean().item()}
        if self.el is not None and self.s_el is not None:
            out[f"el_{self.n}"] = self.el.mean().item()
            out[f"s_el_{self.n}"] = self.s_el.mean().item()
        return out


def _bos_shift(model: Any, encoded: Sequence[EncodedSecret]) -> int:
    """1 when the rows start with a prepended BOS (which is not part of the text), else 0."""
    bos = get_tokenizer(model).bos_token_id
    return int(bos is not None and encoded[0].head[:1] == (bos,))


@torch.no_grad()
def _teacher_forced_top(model: Any, rows: Sequence[Sequence[int]], masked: bool, batch_size: int, first: int) -> list[Tensor]:
    """Per row, ``Bool[len - first]``: is token ``t`` (``t >= first``) the model's top prediction?

    Causal: predicted from the tokens before ``t``; masked: with ``t`` masked alone.
    """
    out: list[Tensor] = []
    if not masked:
        for sl in _chunks(len(rows), batch_size):
            chunk = rows[sl]
            top = _logits(model, chunk, masked=False).argmax(-1).cpu()
            for k, r in enumerate(chunk):
                r_t = torch.tensor(r)
                out.append(top[k, first - 1 : len(r) - 1] == r_t[first:])
        return out
    mask_id = mask_token_id(model)
    flat, where, owner = [], [], []
    for i, r in enumerate(rows):
        for t in range(first, len(r)):
            row = list(r)
            row[t] = mask_id
            flat.append(row)
            where.append(t)
            owner.append(i)
    hits = []
    for sl in _chunks(len(flat), batch_size):
        logits = _logits(model, flat[sl], masked=True)
        top = logits[torch.arange(logits.shape[0]), torch.tensor(where[sl], device=logits.device)].argmax(-1).cpu()
        hits.append(top == torch.tensor([rows[o][w] for o, w in zip(owner[sl], where[sl], strict=True)]))
    hit = torch.cat(hits)
    counts = [len(r) - first for r in rows]
    return list(torch.split(hit, counts))


def memorization(model: Any, secrets: Sequence[Any], *, n: int = 3, el: bool = True, batch_size: int = 128) -> MemorizationScores:
    """MA, S-MA and (causal LMs) EL_n, S-EL_n of each secret; formulas in the module docstring.

    ``n`` is EL's n-gram length (Jang et al. use 10 on 200-token texts; the fact world's
    records are 10-20 tokens, hence 3). ``el=False`` skips EL and S-EL (``None``): they greedily
    generate from every prefix of every text, by far the costliest metric here. Raises
    ``ValueError`` when a text is too short for ``n`` (fewer than ``n + 1`` tokens) or a secret
    has fewer than ``n`` tokens.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    secrets = as_secrets(secrets)
    require_eval_mode(model, what="privacy metrics")
    masked = is_masked_lm(model)
    encoded = encode_secrets(model, secrets)
    rows, starts, bos = [e.row for e in encoded], [len(e.head) for e in encoded], _bos_shift(model, encoded)
    first = bos + 1  # the first text token is only predicted from BOS: left out of MA
    hits = _teacher_forced_top(model, rows, masked, batch_size, first)
    ma = torch.tensor([h.double().mean().item() for h in hits], dtype=torch.float64)
    s_ma = torch.tensor(
        [h[s - first : s - first + len(e.secret)].double().mean().item() for h, s, e in zip(hits, starts, encoded, strict=True)],
        dtype=torch.float64,
    )
    if masked or not el:
        return MemorizationScores(ma, s_ma, None, None, n)
    for i, (r, e) in enumerate(zip(rows, encoded, strict=True)):
        if len(r) - bos < n + 1:
            raise ValueError(f"secret {i}: its text has {len(r) - bos} tokens; EL_{n} needs at least {n + 1}")
        if len(e.secret) < n:
            raise ValueError(f"secret {i} {secrets[i].secret!r} has {len(e.secret)} tokens; S-EL_{n} needs at least n={n}")
    # Every (text, prefix length) of EL and of S-EL as one batch of greedy generations.
    jobs: list[tuple[str, int, int, int]] = []  # (which, secret, prefix end, generation end)
    for i, (r, s, e) in enumerate(zip(rows, starts, encoded, strict=True)):
        jobs += [("el", i, k, len(r)) for k in range(bos + 1, len(r) - n + 1)]
        jobs += [("s_el", i, k, s + len(e.secret)) for k in range(s, s + len(e.secret) - n + 1)]
    gens = greedy_continuations(model, [rows[i][:k] for _, i, k, _ in jobs], [end - k for _, _, k, end in jobs], batch_size)
    sums = {"el": torch.zeros(len(rows), dtype=torch.float64), "s_el": torch.zeros(len(rows), dtype=torch.float64)}
    counts = {key: torch.zeros(len(rows)) for key in sums}
    for (which, i, k, end), g in zip(jobs, gens, strict=True):
        sums[which][i] += _overlap(g, rows[i][k:end], n)
        counts[which][i] += 1
    return MemorizationScores(ma, s_ma, sums["el"] / counts["el"], sums["s_el"] / counts["s_el"], n)


def greedy_completions(model: Any, secrets: Sequence[Any], *, batch_size: int = 128) -> list[str]:
    """Each secret's greedy completion, as space-joined token strings (compare with ``secret``).

    Causal: ``len(secret)`` tokens generated greedily after the prefix. Masked: each secret
    token's top fill with that token masked and the rest visible (a masked LM does not
    generate left to right).
    """
    secrets = as_secrets(secrets)
    require_eval_mode(model, what="privacy metrics")
    tok = get_tokenizer(model)
    if is_masked_lm(model):
        top = secret_token_scores(model, secrets, batch_size=batch_size)
        ids = [top.top[i, : int(top.lengths[i])].tolist() for i in range(len(secrets))]
    else:
        encoded = encode_secrets(model, secrets)
        ids = greedy_continuations(model, [list(e.head) for e in encoded], [len(e.secret) for e in encoded], batch_size)
    return [" ".join(tok.decode([t], clean_up_tokenization_spaces=False).strip() for t in row) for row in ids]


def answer_flips(before: Sequence[str], after: Sequence[str]) -> int:
    """How many completions differ between two runs (e.g. ``greedy_completions`` before and
    after an edit): the number of secrets whose answer actually changed."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} completions before but {len(after)} after; pass one per secret, same order")
    return sum(b != a for b, a in zip(before, after, strict=True))


# ---------------------------------------------------------------------------------------------
# Utility on masked LMs


@torch.no_grad()
def _pseudo_perplexity(model: Any, texts: Sequence[str], batch_size: int) -> float:
    """``exp`` of the mean NLL of every text token with it alone masked (Salazar et al. 2020)."""
    mask_id = mask_token_id(model)
    bos = get_tokenizer(model).bos_token_id
    rows, where = [], []
    for text in texts:
        ids = token_ids(model, text)
        head = [bos] if bos is not None and getattr(model.cfg, "default_prepend_bos", True) else []
        for t in range(len(ids)):
            row = head + list(ids)
            row[len(head) + t] = mask_id
            rows.append((row, head + list(ids)))
            where.append(len(head) + t)
    nll = []
    for sl in _chunks(len(rows), batch_size):
        logits = _logits(model, [r for r, _ in rows[sl]], masked=True)
        pos = torch.tensor(where[sl], device=logits.device)
        truth = torch.tensor([full[w] for (_, full), w in zip(rows[sl], where[sl], strict=True)], device=logits.device)
        lp = logits[torch.arange(logits.shape[0]), pos].log_softmax(-1).gather(1, truth[:, None])[:, 0]
        nll.append(-lp.cpu())
    return math.exp(torch.cat(nll).double().mean().item())


@torch.no_grad()
def _masked_fact_accuracy(model: Any, facts: Sequence[FactPrompt], batch_size: int) -> float:
    """Top-1 accuracy at the mask of fact prompts that hold one mask token (``"... in <mask> ."``)."""
    tok = get_tokenizer(model)
    mask_id = mask_token_id(model)
    bos = tok.bos_token_id
    rows, where, targets = [], [], []
    for i, f in enumerate(facts):
        ids = token_ids(model, f.prompt)
        if ids.count(mask_id) != 1:
            raise ValueError(
                f"fact {i} {f.prompt!r}: a masked LM's fact prompt needs exactly one {tok.mask_token!r} "
                "where the answer goes"
            )
        head = [bos] if bos is not None and getattr(model.cfg, "default_prepend_bos", True) else []
        before = f.prompt.split(tok.mask_token)[0].rstrip()
        if not before:
            raise ValueError(f"fact {i} {f.prompt!r}: put some text before the mask")
        rows.append(head + ids)
        where.append(len(head) + ids.index(mask_id))
        # the answer's token as it tokenises where the mask stands
        targets.append(answer_ids(model, before, f.target)[0])
    hits = []
    for sl in _chunks(len(rows), batch_size):
        logits = _logits(model, rows[sl], masked=True)
        top = logits[torch.arange(logits.shape[0]), torch.tensor(where[sl], device=logits.device)].argmax(-1).cpu()
        hits.append(top == torch.tensor(targets[sl]))
    return torch.cat(hits).double().mean().item()


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class PrivacyReport:
    """Privacy and utility of a model on a set of secrets, before and (optionally) with an edit.

    Attributes:
        metrics: metric -> ``(before, after)`` means (``after`` is NaN without an edit). Keys:
            ``exposure`` (bits, over the secrets that fit the alphabet), ``mrr``, ``ma``,
            ``s_ma``, ``el_n``/``s_el_n`` (causal), ``extracted`` (fraction whose greedy
            completion is the secret), ``perplexity`` (held-out texts; pseudo-perplexity on masked
            LMs) and ``fact_accuracy`` (non-private facts) when those were given.
        per_secret: one row per secret: prefix, secret, kind, repetitions, each metric
            ``_before`` / ``_after``, completions before/after.
        flips: secrets whose greedy completion changed under the edit (``None`` without one).
        n_secrets: how many secrets were measured.
        context: free-form, JSON-able (exposure method, alphabet size, n, edit description).
    """

    metrics: dict[str, tuple[float, float]]
    per_secret: pd.DataFrame
    flips: int | None
    n_secrets: int
    context: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """Columns metric, before, after, change (after - before)."""
        return pd.DataFrame(
            [{"metric": k, "before": b, "after": a, "change": a - b} for k, (b, a) in self.metrics.items()]
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (NaN as ``None``)."""

        def num(x: float) -> float | None:
            return None if isinstance(x, float) and math.isnan(x) else x

        return {
            "format": PRIVACY_REPORT_FORMAT,
            "version": PRIVACY_REPORT_VERSION,
            "metrics": {k: {"before": num(b), "after": num(a)} for k, (b, a) in self.metrics.items()},
            "flips": self.flips,
            "n_secrets": self.n_secrets,
            "per_secret": [
                {k: num(v) if isinstance(v, float) else v for k, v in row.items()}
                for row in self.per_secret.to_dict(orient="records")
            ],
            "context": self.context,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON (atomically)."""
        check_json_able(self.context, "PrivacyReport.context")
        return write_json_atomic(path, self.to_dict())


def _measure(
    model: Any,
    secrets: tuple[Secret, ...],
    *,
    fits: list[int],
    alphabet: Any,
    exposure_method: str,
    n: int,
    el: bool,
    n_samples: int,
    seed: int,
    heldout_texts: Sequence[str],
    facts: Sequence[FactPrompt],
    batch_size: int,
) -> tuple[dict[str, Tensor], list[str], dict[str, float]]:
    masked = is_masked_lm(model)
    per: dict[str, Tensor] = {}
    exp = torch.full((len(secrets),), math.nan, dtype=torch.float64)
    if fits:
        res = exposure(
            model, [secrets[i] for i in fits], method=exposure_method, alphabet=alphabet,
            n_samples=n_samples, seed=seed, batch_size=batch_size,
        )
        exp[fits] = res.exposure
    per["exposure"] = exp
    per["mrr"] = mrr(model, secrets, batch_size=batch_size)
    mem = memorization(model, secrets, n=n, el=el, batch_size=batch_size)
    per["ma"], per["s_ma"] = mem.ma, mem.s_ma
    if mem.el is not None and mem.s_el is not None:
        per[f"el_{n}"], per[f"s_el_{n}"] = mem.el, mem.s_el
    completions = greedy_completions(model, secrets, batch_size=batch_size)
    per["extracted"] = torch.tensor([c == " ".join(s.tokens) for c, s in zip(completions, secrets, strict=True)], dtype=torch.float64)
    utility: dict[str, float] = {}
    if heldout_texts:
        utility["perplexity"] = (
            _pseudo_perplexity(model, heldout_texts, batch_size) if masked else perplexity(model, list(heldout_texts), batch_size=batch_size)
        )
    if facts:
        utility["fact_accuracy"] = (
            _masked_fact_accuracy(model, facts, batch_size) if masked else fact_scores(model, facts, batch_size=batch_size)["accuracy"]
        )
    return per, completions, utility


def _fits(secrets: Sequence[Secret], alphabet: Any) -> list[int]:
    if alphabet is None:
        return []
    if alphabet and not isinstance(alphabet[0], str):
        return [i for i, s in enumerate(secrets) if len(s.tokens) == len(alphabet) and all(t in a for t, a in zip(s.tokens, alphabet, strict=True))]
    return [i for i, s in enumerate(secrets) if all(t in alphabet for t in s.tokens)]


def privacy_report(
    model: Any,
    secrets: Sequence[Any],
    *,
    edit: Edit | Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    heldout_texts: Sequence[str] = (),
    facts: Sequence[FactPrompt] = (),
    exposure_method: str = "lexicographic",
    alphabet: Sequence[str] | Sequence[Sequence[str]] | None = DIGITS,
    n: int = 3,
    el: bool = True,
    n_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 128,
    context: dict[str, Any] | None = None,
) -> PrivacyReport:
    """Every privacy metric (and utility) on ``model`` as it is and, given ``edit``, with it applied.

    ``edit`` is applied as in ``evaluate_fact_edit``: an ``Edit`` through ``edit.applied(model)``
    or a zero-argument callable returning a context manager; the model is left as given.
    Exposure (``exposure_method``, see ``exposure``) is measured on the secrets whose every
    token is in ``alphabet`` (digits by default; ``None`` skips exposure) and is NaN for the
    others; MRR, MA/S-MA, EL_n/S-EL_n (causal; ``el=False`` skips them, the costliest) and
    extraction on all. ``heldout_texts`` give
    perplexity (pseudo-perplexity on a masked LM); ``facts`` (non-private ``FactPrompt``s; on a
    masked LM with the mask token in the prompt) give fact accuracy. Means in ``metrics``.
    """
    secrets = as_secrets(secrets)
    fits = _fits(secrets, alphabet)
    kw = dict(
        fits=fits, alphabet=alphabet, exposure_method=exposure_method, n=n, el=el, n_samples=n_samples,
        seed=seed, heldout_texts=heldout_texts, facts=facts, batch_size=batch_size,
    )
    before, done_before, util_before = _measure(model, secrets, **kw)
    after, done_after, util_after = None, None, {}
    if edit is not None:
        with applied_edit(model, edit):
            after, done_after, util_after = _measure(model, secrets, **kw)

    def mean(t: Tensor) -> float:
        known = ~t.isnan()
        return t[known].mean().item() if known.any() else math.nan

    metrics = {
        k: (mean(v), mean(after[k]) if after is not None else math.nan) for k, v in before.items()
    }
    metrics.update({k: (v, util_after.get(k, math.nan)) for k, v in util_before.items()})
    table = {
        "prefix": [s.prefix for s in secrets],
        "secret": [s.secret for s in secrets],
        "kind": [s.kind for s in secrets],
        "repetitions": [s.repetitions for s in secrets],
        "completion_before": done_before,
    }
    for k, v in before.items():
        table[f"{k}_before"] = v.tolist()
    if after is not None and done_after is not None:
        table["completion_after"] = done_after
        for k, v in after.items():
            table[f"{k}_after"] = v.tolist()
    ctx = {
        "exposure_method": exposure_method,
        "exposure_secrets": len(fits),
        "n": n,
        "masked_lm": is_masked_lm(model),
        "edit": None if edit is None else type(edit).__name__,
        **(context or {}),
    }
    flips = None if done_after is None else answer_flips(done_before, done_after)
    return PrivacyReport(metrics, pd.DataFrame(table), flips, len(secrets), ctx)
