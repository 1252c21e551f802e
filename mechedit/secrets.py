"""Secrets: a span of tokens after a prefix, and its token ids as every privacy method reads them.

The shared core of privacy locators (``locate.depn``) and metrics (``evaluate.privacy``): the
``Secret`` type, ``as_secrets`` (from ``Secret``s, the fact world's ``PrivateRecord``s or
``(prefix, secret)`` pairs), ``encode_secrets`` (ids with the secret's span located and checked
token by token) and the masked-LM rows (one row per secret token, that token masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mechedit.tokens import answer_ids, get_tokenizer, tokenize_continuations

__all__ = ["EncodedSecret", "Secret", "as_secrets", "encode_secrets", "mask_token_id", "masked_secret_rows"]


# ---------------------------------------------------------------------------------------------
# Secrets


@dataclass(frozen=True)
class Secret:
    """A secret span after a prefix.

    Attributes:
        prefix: the text before the secret, e.g. ``"the secret code of tango is"``.
        secret: the secret as space-separated tokens, e.g. ``"8 8 5 2 6 0"``; each must be one
            model token after what precedes it (checked when tokenised).
        suffix: text after the secret (``"."`` for the fact world's records). Masked LMs see it;
            causal LMs only use it in MA / EL over the whole text.
        kind: a label (``"phone"``, ``"canary"``, ...), carried into per-secret tables.
        repetitions: training copies per epoch when known (``PrivateRecord``), else ``None``.
    """

    prefix: str
    secret: str
    suffix: str = ""
    kind: str = "secret"
    repetitions: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not self.prefix.strip():
            raise ValueError(f"a secret needs a non-empty prefix (the text before it), got {self.prefix!r}")
        if not isinstance(self.secret, str) or not self.secret.strip():
            raise ValueError(
                f"secret after {self.prefix!r} is empty ({self.secret!r}); pass its tokens "
                "separated by spaces, e.g. '3 6 2 3'"
            )
        if not isinstance(self.suffix, str):
            raise ValueError(f"suffix must be a string, got {type(self.suffix).__name__}")

    @property
    def tokens(self) -> tuple[str, ...]:
        """The declared secret tokens (``secret.split()``)."""
        return tuple(self.secret.split())

    @property
    def text(self) -> str:
        """``prefix secret suffix``, the memorised sentence MA and EL read."""
        return " ".join(p for p in (self.prefix, self.secret, self.suffix) if p)


def as_secrets(items: Any) -> tuple[Secret, ...]:
    """``Secret``s from ``Secret``s, the fact world's ``PrivateRecord``s or ``(prefix, secret)`` pairs.

    A ``PrivateRecord`` becomes ``Secret(prefix, secret, suffix=".", kind, repetitions)``: its
    training sentences end with ``" ."`` (``World.training_sentences``).
    """
    if isinstance(items, (Secret, str)) or (isinstance(items, tuple) and len(items) == 2 and all(isinstance(x, str) for x in items)):
        raise ValueError("pass a list of secrets, e.g. [Secret(prefix, secret)] or [(prefix, secret)]")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Secret):
            out.append(item)
        elif all(hasattr(item, a) for a in ("prefix", "secret", "kind", "repetitions")):
            out.append(Secret(item.prefix, item.secret, ".", item.kind, item.repetitions))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            out.append(Secret(item[0], item[1]))
        else:
            raise ValueError(
                f"secret {i} is a {type(item).__name__}; pass Secret(prefix, secret), a "
                "PrivateRecord or a (prefix, secret) pair of strings"
            )
    if not out:
        raise ValueError("no secrets given")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Tokenisation: one row of ids per secret, the secret's span located and checked


@dataclass(frozen=True)
class EncodedSecret:
    """A secret's ids: ``head`` (BOS + prefix), ``secret`` (one id per declared token), ``tail``."""

    head: tuple[int, ...]
    secret: tuple[int, ...]
    tail: tuple[int, ...]

    @property
    def row(self) -> list[int]:
        return [*self.head, *self.secret, *self.tail]


def encode_secrets(model: Any, secrets: Sequence[Secret]) -> list[EncodedSecret]:
    """Token ids per secret; ``ValueError`` when a declared token is not one model token there."""
    tok = get_tokenizer(model)
    batch = tokenize_continuations(
        model, [s.prefix for s in secrets], [s.secret for s in secrets], device="cpu"
    )
    out = []
    for i, s in enumerate(secrets):
        start, length = int(batch.continuation_starts[i]), int(batch.continuation_lengths[i])
        row = batch.tokens[i, : start + length].tolist()
        pieces = [tok.decode([t], clean_up_tokenization_spaces=False).strip() for t in row[start:]]
        if pieces != list(s.tokens):
            raise ValueError(
                f"secret {i} {s.secret!r} after {s.prefix!r} tokenises to {pieces} "
                f"({length} tokens), not to its {len(s.tokens)} declared tokens {list(s.tokens)}; "
                "write the secret as space-separated tokens the model's tokenizer keeps whole "
                "(e.g. digits one by one: '3 6 2 3')"
            )
        tail = answer_ids(model, f"{s.prefix} {s.secret}", s.suffix) if s.suffix.strip() else []
        out.append(EncodedSecret(tuple(row[:start]), tuple(row[start:]), tuple(tail)))
    return out



def mask_token_id(model: Any) -> int:
    mask = get_tokenizer(model).mask_token_id
    if mask is None:
        raise ValueError("this masked LM's tokenizer has no mask token; set tokenizer.mask_token")
    return mask


def masked_secret_rows(enc: EncodedSecret, mask_id: int) -> tuple[list[list[int]], list[int]]:
    """One row per secret token with that token masked (others visible), and the mask positions."""
    start = len(enc.head)
    rows, where = [], []
    for j in range(len(enc.secret)):
        row = enc.row
        row[start + j] = mask_id
        rows.append(row)
        where.append(start + j)
    return rows, where
