"""Interventions: change ``activation[rows, positions, units]`` at a hook, per row, vectorised.

One primitive for every method that edits activations while the model runs — activation and
path patching (copy cells of a cached run), causal tracing (add noise on each row's subject),
integrated gradients (scale each row by its own α, or replace by a differentiable leaf), mean
and zero ablation (``mechedit.edit.ActivationEdit`` is built on it)::

    clean = ...                                   # cached [batch, pos, d_mlp] of the clean run
    patch_last = Intervention("blocks.1.mlp.hook_post", "replace", source=clean,
                              positions=torch.tensor([3, 5, 4]), rows=torch.arange(3))
    with patch(model, [patch_last], attention_mask=batch.attention_mask):
        logits = model(batch.corrupt_tokens)

**The activation as cells.** A hook tensor is read as ``[batch, pos, unit, feature]``: heads
(``attn.hook_z``, ``[b, p, n_heads, d_head]``) have one unit per head of ``d_head`` features;
every 3-D site (``[b, p, d]``: neurons, the residual stream, block outputs) has one unit per
entry of its last axis (a neuron, or one residual dimension) with a single feature. An
intervention selects cells ``(row, position, unit)`` and changes all features of each.

**Selecting cells** — either index tensors, broadcast together like torch advanced indexing
(``activation[rows, positions, units]``), each ``None`` meaning "every" along its axis:

- ``rows=torch.tensor([0, 1, 2]), positions=torch.tensor([4, 2, -1])``: one position per row;
- ``positions=-1``: every row's last real token (all units);
- ``positions=torch.tensor([[1], [2]]), units=torch.tensor([3, 7])``: an outer product;

or a boolean ``mask`` ``[batch, pos]`` (every unit of the chosen cells) or ``[batch, pos, unit]``,
in the padded coordinates of the tensor as the model sees it.

**Positions count real tokens, per row.** Index positions are positions *in each row's prompt*
(BOS included when the tokenizer prepends it): ``0`` is the row's first real token and ``-1``
its last, whatever the padding side. They resolve against the rows' real tokens, given as an
``attention_mask`` (``Bool[batch, pos]``, True at real tokens, or any tokenised batch with an
``.attention_mask`` such as ``mechedit.tokens.tokenize_prompts``' result) to ``patch(...)``,
to ``ActivationEdit.apply`` / ``applied``, or for any forward pass with ``real_tokens(mask)``.
Without one, every row is taken to be unpadded (its real tokens are the whole sequence), so a
batch of equal-length prompts needs nothing. ``positions=None`` selects every real token of each
row. A position outside a row's real tokens is an error naming the row.

**Sources** — what the selected cells become (``op``: ``"replace"``: the source; ``"add"``:
activation + source; ``"scale"``: activation × source; ``"zero"``: 0, no source). The source is
a tensor or a number, laid out as ``source_shape`` says, with ``token`` = one token's
activation shape (``[d_mlp]``, ``[n_heads, d_head]``, ``[d_model]``):

- ``"activation"`` (default): ``[batch, pos, *token]``, e.g. another run's cached activation;
  each cell takes the value of the same cell there (same padded position);
- ``"row"``: ``[batch]`` (one number per row, e.g. a per-row α) or ``[batch, *token]``
  (e.g. ``α[:, None] * a``, a fresh leaf with ``requires_grad=True`` for integrated gradients);
- ``"position"``: ``[pos]`` or ``[pos, *token]`` indexed by each cell's prompt position (a
  per-position mean);
- ``"token"``: a number or a tensor broadcasting to ``token`` (a mean over positions; noise).

Values are cast to the activation's dtype and device; gradients flow to a source that
requires them (through the selected cells only) and to the unselected activation. The hook
builds a ``[batch, pos, unit]`` boolean mask on the activation's device and applies the op with
one ``torch.where``: no Python loop over rows or units, and a cell named twice is edited once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool
from torch import Tensor

from mechedit.components import check_hook_name

Op = Literal["replace", "add", "scale", "zero"]
OPS = ("replace", "add", "scale", "zero")
SourceShape = Literal["activation", "row", "position", "token"]
SOURCE_SHAPES = ("activation", "row", "position", "token")

HookFn = Callable[..., Tensor]


# ---------------------------------------------------------------------------------------------
# The rows' real tokens


@dataclass(frozen=True, eq=False)
class RealTokens:
    """Where each row's real tokens lie in a padded batch (contiguous: right or left padding).

    Attributes:
        mask: ``Bool[batch, pos]``, True at real tokens.
        first: ``Int[batch]``, padded index of each row's first real token.
        length: ``Int[batch]``, number of real tokens per row (>= 1).
    """

    mask: Bool[Tensor, "batch pos"]
    first: Tensor
    length: Tensor
    _on: dict[torch.device, RealTokens] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, attention_mask: Any) -> RealTokens:
        """From ``Bool[batch, pos]`` (or 0/1 integers), or a tokenised batch's ``.attention_mask``."""
        if isinstance(attention_mask, RealTokens):
            return attention_mask
        mask = getattr(attention_mask, "attention_mask", attention_mask)
        if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.is_floating_point():
            raise ValueError(
                "attention_mask must be a Bool[batch, pos] tensor (True at real tokens) or a "
                "tokenised batch with .attention_mask (mechedit.tokens.tokenize_prompts)"
            )
        mask = mask.detach().to(torch.bool)
        length = mask.sum(1)
        first = mask.to(torch.uint8).argmax(1)
        if mask.is_meta:  # shapes only (device checks): there are no values to check
            return cls(mask, first, length)
        if mask.shape[1] and bool((length == 0).any()):
            rows = (length == 0).nonzero().flatten().tolist()
            raise ValueError(f"attention_mask rows {rows} have no real token")
        span = torch.arange(mask.shape[1], device=mask.device)
        contiguous = (span >= first[:, None]) & (span < (first + length)[:, None])
        if not torch.equal(contiguous, mask):
            rows = (contiguous != mask).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"attention_mask rows {rows[:5]} have gaps: real tokens must be one contiguous "
                "run per row (right or left padding)"
            )
        return cls(mask, first, length)

    def on(self, device: torch.device) -> RealTokens:
        """This on ``device`` (cached, so a hook moves it once per device)."""
        if self.mask.device == device:
            return self
        if device not in self._on:
            self._on[device] = RealTokens(
                self.mask.to(device), self.first.to(device), self.length.to(device)
            )
        return self._on[device]


_CURRENT: contextvars.ContextVar[RealTokens | None] = contextvars.ContextVar(
    "mechedit_real_tokens", default=None
)


@contextlib.contextmanager
def real_tokens(attention_mask: Any) -> Iterator[RealTokens]:
    """Interventions inside this block resolve positions against these rows' real tokens.

    ``attention_mask`` is ``Bool[batch, pos]`` (True at real tokens) or a tokenised batch; every
    forward pass in the block must have that batch shape. Nested blocks: the innermost wins.
    ``None`` changes nothing (the enclosing rows, or unpadded rows, stay in force).
    """
    if attention_mask is None:
        yield _CURRENT.get()
        return
    rows = RealTokens.of(attention_mask)
    token = _CURRENT.set(rows)
    try:
        yield rows
    finally:
        _CURRENT.reset(token)


def current_real_tokens() -> RealTokens | None:
    """The rows set by the innermost ``real_tokens`` block, or ``None`` (rows are unpadded)."""
    return _CURRENT.get()


# ---------------------------------------------------------------------------------------------
# The primitive


def _index(value: Any, name: str, *, signed: bool) -> Tensor | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be integers (use mask= for a boolean selection)")
        t = value.detach().to(torch.long)
    else:
        items = [value] if isinstance(value, int) else value
        try:
            t = torch.as_tensor(items)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be an int, ints or an integer tensor: {err}") from None
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be ints, got {value!r}")
        t = t.to(torch.long)
        if isinstance(value, int):
            t = t.reshape(())
    if not signed and t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must be >= 0 (only positions count from the end), got {t.tolist()}")
    return t


def _as_units(activation: Tensor) -> Tensor:
    """View a hook tensor as ``[batch, pos, unit, feature]`` (see the module docstring)."""
    if activation.ndim == 4:
        return activation
    if activation.ndim != 3:
        raise ValueError(
            f"interventions edit [batch, pos, ...] activations of 3 or 4 axes, got shape "
            f"{tuple(activation.shape)}"
        )
    return activation.unsqueeze(-1)


@dataclass(frozen=True, eq=False)
class Intervention:
    """Change ``activation[rows, positions, units]`` at hook ``hook_name`` (see the module docstring).

    Args:
        hook_name: the TransformerLens hook, e.g. ``"blocks.1.attn.hook_z"``.
        op: ``"replace"``, ``"add"``, ``"scale"`` or ``"zero"``.
        source: a tensor or number laid out as ``source_shape`` says; none for ``"zero"``.
        source_shape: ``"activation"`` ``[batch, pos, *token]`` (default), ``"row"``,
            ``"position"`` or ``"token"``.
        rows, positions, units: integer index tensors (or ints / lists) broadcast together;
            ``None`` = every row / every real position / every unit. Positions count each row's
            real tokens (``-1`` = last real token). Rows and units are ``>= 0``.
        mask: instead of indices, ``Bool[batch, pos]`` or ``Bool[batch, pos, unit]`` in padded
            coordinates.
    """

    hook_name: str
    op: Op = "replace"
    source: Tensor | float | None = None
    source_shape: SourceShape = "activation"
    rows: Tensor | None = None
    positions: Tensor | None = None
    units: Tensor | None = None
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise ValueError(f"hook_name must be a hook name string, got {self.hook_name!r}")
        if self.op not in OPS:
            raise ValueError(f"op {self.op!r} is not known; valid ops: {', '.join(OPS)}")
        if self.source_shape not in SOURCE_SHAPES:
            raise ValueError(
                f"source_shape {self.source_shape!r} is not known; valid: {', '.join(SOURCE_SHAPES)}"
            )
        if (self.source is None) != (self.op == "zero"):
            raise ValueError(f"op={self.op!r} " + ("takes no source" if self.op == "zero" else "needs source="))
        if self.source is not None and not isinstance(self.source, Tensor):
            if not isinstance(self.source, int | float) or isinstance(self.source, bool):
                raise ValueError(f"source must be a tensor or a number, got {type(self.source).__name__}")
            object.__setattr__(self, "source_shape", "token")  # a number: every cell alike
        rows = _index(self.rows, "rows", signed=False)
        positions = _index(self.positions, "positions", signed=True)
        units = _index(self.units, "units", signed=False)
        given = [t for t in (rows, positions, units) if t is not None]
        if self.mask is not None:
            if given:
                raise ValueError("give either mask= or rows/positions/units, not both")
            if not isinstance(self.mask, Tensor) or self.mask.dtype != torch.bool or self.mask.ndim not in (2, 3):
                raise ValueError("mask must be a Bool[batch, pos] or Bool[batch, pos, unit] tensor")
        try:
            torch.broadcast_shapes(*(t.shape for t in given))
        except RuntimeError:
            raise ValueError(
                f"rows, positions and units must broadcast together (like torch advanced "
                f"indexing); got shapes {[tuple(t.shape) for t in given]}"
            ) from None
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "units", units)

    # -- where ------------------------------------------------------------------------------------

    def selection(
        self, activation: Tensor, rows: RealTokens | None = None
    ) -> Bool[Tensor, "batch pos unit"]:
        """The ``[batch, pos, unit]`` cells this intervention edits in ``activation``, on its device."""
        units = _as_units(activation)
        batch, seq, n_units = units.shape[:3]
        device = activation.device
        rows = None if rows is None else rows.on(device)
        if rows is not None and tuple(rows.mask.shape) != (batch, seq):
            raise ValueError(
                f"the rows' attention mask is {tuple(rows.mask.shape)} but {self.hook_name} sees "
                f"[batch, pos] = {(batch, seq)}; give the attention mask of the batch being run"
            )
        if self.mask is not None:
            mask = self.mask.to(device)
            want = (batch, seq) if mask.ndim == 2 else (batch, seq, n_units)
            if tuple(mask.shape) != want:
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)} but {self.hook_name} needs {want}"
                )
            return mask[:, :, None].expand(batch, seq, n_units) if mask.ndim == 2 else mask
        r, p, u = (None if t is None else t.to(device) for t in (self.rows, self.positions, self.units))
        for name, t, size in (("rows", r, batch), ("units", u, n_units)):
            if t is not None and t.numel() and int(t.max()) >= size:
                raise ValueError(
                    f"{name} {sorted(set(t[t >= size].tolist()))[:5]} out of range at "
                    f"{self.hook_name}: it has {size} {name} (0..{size - 1})"
                )
        if p is not None:
            # a position resolves against its row's real tokens, so every cell needs its row
            if r is None:
                ndim = max(p.ndim, 0 if u is None else u.ndim)
                r = torch.arange(batch, device=device).view(batch, *([1] * ndim))
            r, p, *rest = torch.broadcast_tensors(r, p, *([] if u is None else [u]))
            u = rest[0] if rest else None
            p = _resolve_positions(p, r, rows, seq)
        # free axes stay slices: no [batch, pos, unit] grid of indices is built
        index = tuple(slice(None) if t is None else t for t in (r, p, u))
        selected = torch.zeros(batch, seq, n_units, dtype=torch.bool, device=device)
        selected[index] = True
        if self.positions is None and rows is not None:
            selected &= rows.mask[:, :, None]  # "every position" means every real token
        return selected

    # -- what ------------------------------------------------------------------------------------

    def _source_like(self, activation: Tensor, units: Tensor, rows: RealTokens | None) -> Tensor:
        """The source broadcastable to ``units`` ``[batch, pos, unit, feature]``, in its dtype."""
        src = self.source
        if not isinstance(src, Tensor):
            return torch.tensor(src, dtype=units.dtype, device=units.device)
        src = src.to(device=units.device, dtype=units.dtype)
        batch, seq = units.shape[:2]
        token = tuple(activation.shape[2:])

        def fit(t: Tensor, lead: tuple[int, ...], what: str) -> Tensor:
            # t is [*lead] or [*lead, *token]; returns [*lead, unit, feature] broadcastable
            if tuple(t.shape) == lead:
                t = t.reshape(*lead, 1, 1)
            elif tuple(t.shape) == (*lead, *token):
                t = t.reshape(*lead, *units.shape[2:])
            else:
                raise ValueError(
                    f"source for {self.hook_name} with source_shape={self.source_shape!r} must be "
                    f"{what} = {list(lead)} or {[*lead, *token]}, got {list(t.shape)}"
                )
            return t

        if self.source_shape == "activation":
            if tuple(src.shape) != tuple(units.shape[:2]) + token:
                raise ValueError(
                    f"source for {self.hook_name} must have the activation's shape "
                    f"{[batch, seq, *token]} (source_shape='activation'), got {list(src.shape)}; "
                    "for a mean or one value per row pass source_shape='token' / 'row'"
                )
            return src.reshape(units.shape)
        if self.source_shape == "row":
            return fit(src, (batch,), "[batch]")[:, None]
        if self.source_shape == "token":
            try:
                fits = torch.broadcast_shapes(src.shape, token) == torch.Size(token)
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"source for {self.hook_name} (source_shape='token') must broadcast to one "
                    f"token's activation {list(token)}, got {list(src.shape)}"
                )
            return src.expand(token).reshape(1, 1, *units.shape[2:])
        # "position": index by each cell's prompt position (padded index - row's first real one)
        length = src.shape[0] if src.ndim else 0
        src = fit(src, (length,), "[pos]")
        first = rows.first if rows is not None else torch.zeros(batch, dtype=torch.long, device=units.device)
        real = rows.mask if rows is not None else torch.ones(batch, seq, dtype=torch.bool, device=units.device)
        prompt_pos = torch.arange(seq, device=units.device)[None, :] - first[:, None]
        needed = int(prompt_pos[real].max()) + 1 if real.any() else 0
        if needed > length:
            raise ValueError(
                f"per-position source covers {length} positions but the input has {needed}; "
                "give values for at least as many positions as the longest row"
            )
        return src[prompt_pos.clamp(0, max(length - 1, 0))]

    def apply_to(self, activation: Tensor, attention_mask: Any = None) -> Tensor:
        """The edited activation (a new tensor; differentiable), as the hook returns it.

        ``attention_mask`` (or the enclosing ``real_tokens`` block) gives the rows' real tokens.
        """
        rows = RealTokens.of(attention_mask) if attention_mask is not None else current_real_tokens()
        units = _as_units(activation)
        where = self.selection(activation, rows)[..., None]
        if self.op == "zero":
            edited = units.masked_fill(where, 0.0)
        else:
            value = self._source_like(activation, units, rows)
            if self.op == "add":
                value = units + value
            elif self.op == "scale":
                value = units * value
            edited = torch.where(where, value, units)
        return edited.reshape(activation.shape)

    def hook(self, attention_mask: Any = None) -> tuple[str, HookFn]:
        """``(hook_name, fn)`` for ``model.hooks(fwd_hooks=[...])`` / ``run_with_hooks``.

        Positions resolve against ``attention_mask`` if given, else against the ``real_tokens``
        block active when the hook runs.
        """
        fixed = None if attention_mask is None else RealTokens.of(attention_mask)

        def fn(activation: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001 - TL hook signature
            return self.apply_to(activation, fixed)

        return self.hook_name, fn


def _resolve_positions(
    positions: Tensor, rows_index: Tensor, rows: RealTokens | None, seq: int
) -> Tensor:
    """Prompt positions of cells (negative: from each row's last real token) -> padded indices."""
    if rows is None:
        first = torch.zeros_like(positions)
        length = torch.full_like(positions, seq)
    else:
        first, length = rows.first[rows_index], rows.length[rows_index]
    bad = (positions >= length) | (positions < -length)
    if bool(bad.any()):
        wrong = sorted(set(positions[bad].tolist()))
        if rows is None:
            raise ValueError(
                f"positions {wrong} out of range for a sequence of {seq} tokens "
                f"(valid: 0..{seq - 1} or -{seq}..-1)"
            )
        row = int(rows_index[bad][0])
        n = int(rows.length[row])
        raise ValueError(
            f"positions {wrong} out of range for row {row}, which has {n} real tokens "
            f"(valid: 0..{n - 1} or -{n}..-1)"
        )
    return first + torch.where(positions < 0, positions + length, positions)


@contextlib.contextmanager
def patch(
    model: Any, interventions: Iterable[Intervention], *, attention_mask: Any = None
) -> Iterator[Any]:
    """Run the block with ``interventions`` hooked into ``model``; removes exactly them on exit.

    Interventions at one hook apply in the order given. ``attention_mask`` (``Bool[batch, pos]``
    or a tokenised batch) gives the rows' real tokens for every forward pass in the block (see
    the module docstring); without it, an enclosing ``real_tokens`` block or unpadded rows.
    """
    items = list(interventions)
    for item in items:
        if not isinstance(item, Intervention):
            raise ValueError(f"patch takes Intervention objects, got {type(item).__name__}")
        check_hook_name(model, item.hook_name)
    with real_tokens(attention_mask), model.hooks(fwd_hooks=[i.hook() for i in items]):
        yield model


__all__ = [
    "OPS",
    "SOURCE_SHAPES",
    "Intervention",
    "Op",
    "RealTokens",
    "SourceShape",
    "current_real_tokens",
    "patch",
    "real_tokens",
]
