"""Resume a forward pass from a cached run: the engine behind exact patching and causal tracing.

A patch at layer ``l`` and token position ``p`` cannot change what the model computed before it.
Under causal attention the residual stream at every position ``< p`` stays as it was in the
unpatched run (the *reference* run) at every layer, and at every position it stays as it was
below layer ``l``. A patched run therefore needs only blocks ``l .. L-1``, only positions
``p .. n-1``, and, of the earlier positions, only the keys and values that the reference run
already computed. And a metric that reads one position per prompt needs the unembedding there
only. ``reference_run`` runs the model once and keeps the residual entering every block plus
every block's keys and values; ``resume`` then runs many patched rows in one batch from those.

The batch of a ``resume`` call shares one start position ``p``; its rows may start at different
layers. Rows are sorted by start layer, so at block ``j`` the active rows (those that started at
or below ``j``) are a prefix of the batch, and rows that start at ``j`` join it there with the
reference residual. Hooks registered for the call see exactly the active rows at each block, in
batch order, with a token axis covering positions ``p .. n-1`` (attention patterns: queries
``p .. n-1`` over keys ``0 .. n-1``).

Exactness: ``resume`` computes the same function as a full forward with the same hooks (up to
floating-point summation order), which the tests check against full forwards on GPT-2, GPT-NeoX
and Llama. It needs a causal language model whose blocks are the bridge's ``blocks`` stack and
whose attention reads the key/value cache (``check_resumable`` says why not, e.g. for BERT).
Rows must be unpadded or right-padded: with right padding, no real token attends to padding, so
the positions a metric reads do not depend on the attention mask.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers.cache_utils import Cache

from mechedit.checks import require_eval_mode
from mechedit.models import model_device

__all__ = ["ReferenceRun", "check_resumable", "reference_run", "resume"]

HookList = Sequence[tuple[str, Callable[..., Any]]]

# HF model classes whose blocks see only earlier positions (the prefix reuse is exact there).
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True, eq=False)
class ReferenceRun:
    """What one unpatched forward pass leaves for patched runs to resume from.

    Attributes:
        tokens: ``Int[batch, pos]``, the prompts (right-padded or unpadded).
        last_positions: ``Int[batch]``, the position each row's metric reads.
        resid: ``Float[n_layers + 1, batch, pos, d_model]``: ``resid[j]`` is the residual
            entering block ``j``; ``resid[n_layers]`` the one leaving the last block (the final
            norm's input).
        keys, values: per block, ``Float[batch, kv_heads, pos, d_head]``, as the attention used
            them (after rotary embeddings where the architecture rotates keys).
        logits: ``Float[batch, vocab]``, the logits at ``last_positions``.
        activations: ``{hook_name: tensor}``, whole activations the caller asked to keep.
    """

    tokens: Int[Tensor, "batch pos"]
    last_positions: Int[Tensor, " batch"]
    resid: Float[Tensor, "layer_plus_1 batch pos d_model"]
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    logits: Float[Tensor, "batch vocab"]
    activations: dict[str, Tensor]

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_layers(self) -> int:
        return len(self.keys)


def check_resumable(model: Any) -> str | None:
    """Why ``resume`` cannot run on ``model`` (``None`` when it can).

    ``resume`` needs a causal LM (later positions never feed earlier ones) with the bridge's
    ``blocks``, ``ln_final`` and ``unembed``. Masked LMs such as BERT attend both ways.
    """
    hf = getattr(model, "original_model", None)
    name = type(hf).__name__ if hf is not None else type(model).__name__
    if not name.endswith(_CAUSAL_SUFFIXES):
        return (
            f"{name} is not a causal language model: a patch at one position changes every "
            "position, so the prefix cannot be reused"
        )
    for part in ("blocks", "ln_final", "unembed"):
        if not hasattr(model, part):
            return f"the model has no `{part}` component to resume through"
    return None


class _PrefixKV:
    """A one-block key/value cache: the reference keys/values of positions ``< p``.

    The bridge's attention calls ``update`` with the new positions' keys and values and attends
    over what it returns; nothing is stored, so one reference serves every resumed batch.
    """

    def __init__(self, keys: Tensor | None, values: Tensor | None) -> None:
        self.keys, self.values = keys, values

    def update(self, k: Tensor, v: Tensor, layer_idx: int, *args: Any, **kwargs: Any):  # noqa: ARG002
        if self.keys is None:
            return k, v
        return torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:  # noqa: ARG002
        return 0 if self.keys is None else int(self.keys.shape[2])


def _is_cache(value: Any) -> bool:
    return isinstance(value, (Cache, _PrefixKV))


@contextlib.contextmanager
def _quiet_cache_rename() -> Iterator[None]:
    # The bridge hands HF the cache as ``past_key_values``, which transformers 5 renamed.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def _kv_cache_reaches_attention(model: Any) -> Iterator[None]:
    """Hand each block's attention the key/value cache under the name the bridge reads.

    transformers 5 passes the cache to attention as ``cache``; the bridge's attention (TL 4.3)
    looks for ``past_key_values`` or ``layer_past`` and would otherwise ignore it, leaving keys
    and values of earlier positions out of the cache.
    """

    def rename(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:  # noqa: ARG001
        cache = kwargs.get("cache")
        if _is_cache(cache) and kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
            return args, {**kwargs, "past_key_values": cache}
        return None

    handles = [b.attn.register_forward_pre_hook(rename, with_kwargs=True) for b in model.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reference_run(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    last_positions: Int[Tensor, " batch"] | None = None,
    keep: Sequence[str] = (),
    fwd_hooks: HookList = (),
) -> ReferenceRun:
    """One forward pass under ``no_grad`` that keeps what ``resume`` starts from.

    Args:
        tokens: ``Int[batch, pos]`` prompts, right-padded or unpadded (moved to the model).
        last_positions: ``Int[batch]``, the position whose logits each row's metric reads
            (default: the last position).
        keep: hook names whose whole activations to keep as well (e.g. the clean activations a
            patch will copy in).
        fwd_hooks: ``(hook_name, fn)`` hooks active during the run (e.g. embedding noise); the
            kept tensors are those the run computed with them.

    Raises:
        RuntimeError: the model is in training mode; ``check_resumable`` fails; the attention
            did not fill the key/value cache.
    """
    require_eval_mode(model, what="reference_run")
    problem = check_resumable(model)
    if problem:
        raise RuntimeError(f"cannot resume forward passes on this model: {problem}")
    device = model_device(model)
    tokens = tokens.to(device)
    batch, n_pos = tokens.shape
    last = (
        torch.full((batch,), n_pos - 1, device=device)
        if last_positions is None
        else last_positions.to(device).long()
    )
    n_layers = len(model.blocks)
    names = [f"blocks.{j}.hook_resid_pre" for j in range(n_layers)]
    names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    kept: dict[str, Tensor] = {}

    def keeper(name: str) -> Callable[..., None]:
        def fn(activation: Tensor, hook: Any = None) -> None:  # noqa: ARG001
            kept[name] = activation.detach().clone()

        return fn

    hooks = list(fwd_hooks) + [(n, keeper(n)) for n in dict.fromkeys([*names, *keep])]
    with torch.no_grad(), _quiet_cache_rename(), _kv_cache_reaches_attention(model), model.hooks(fwd_hooks=hooks):
        logits, cache = model(tokens, return_type="logits_and_cache")
    keys, values = [], []
    for j in range(n_layers):
        layer = cache.layers[j] if cache is not None and j < len(cache.layers) else None
        k = getattr(layer, "keys", None)
        if k is None or k.shape[2] != n_pos:
            raise RuntimeError(
                f"block {j}'s attention did not record its keys/values in the cache, so patched "
                "runs cannot reuse earlier positions on this architecture; use the one-forward-"
                "per-cell method instead (method='naive')"
            )
        keys.append(k)
        values.append(layer.values)
    resid = torch.stack([kept[n] for n in names])
    rows = torch.arange(batch, device=device)
    return ReferenceRun(
        tokens=tokens,
        last_positions=last,
        resid=resid,
        keys=tuple(keys),
        values=tuple(values),
        logits=logits[rows, last].detach(),
        activations={n: kept[n] for n in keep},
    )


class _Stop(Exception):
    pass


def _block_inputs(model: Any, ref: ReferenceRun, start_pos: int) -> tuple[tuple, dict]:
    """The extra arguments HF hands every block for queries ``start_pos .. n-1``.

    They (position ids, rotary embeddings, causal mask, cache position) depend on the positions
    only, so one row suffices and they broadcast over any batch. Captured by running the model up
    to block 0 on one row whose cache already holds ``start_pos`` positions.
    """
    got: dict[str, Any] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:  # noqa: ARG001
        got["args"], got["kwargs"] = args[1:], kwargs
        raise _Stop

    suffix = ref.tokens[:1, start_pos:]
    handle = model.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), _quiet_cache_rename():
            if start_pos:
                from transformers.cache_utils import DynamicCache

                past = DynamicCache()
                for j in range(ref.n_layers):
                    past.update(ref.keys[j][:1, :, :start_pos], ref.values[j][:1, :, :start_pos], j)
                model(suffix, past_key_values=past)
            else:
                model(suffix)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "args" not in got:
        raise RuntimeError("block 0 never ran; cannot capture the blocks' inputs")
    return got["args"], got["kwargs"]


def resume(
    model: Any,
    ref: ReferenceRun,
    *,
    start_pos: int,
    rows: Int[Tensor, " R"],
    start_layers: Int[Tensor, " R"],
    fwd_hooks: HookList = (),
    differentiable: bool = False,
) -> Float[Tensor, "R vocab"]:
    """Run ``R`` rows from the reference, each from its own block, positions ``start_pos..``.

    Row ``i`` is reference row ``rows[i]``; it enters block ``start_layers[i]`` with the
    reference residual (``n_layers`` means after the last block, at the final norm) and runs to
    the logits. ``fwd_hooks`` are active throughout; at block ``j`` they see the rows that
    started at or below ``j``, in batch order (the first ``#(start_layers <= j)`` rows), over
    positions ``start_pos .. n-1``.

    Args:
        start_pos: first recomputed position, ``0 <= start_pos < n_pos``.
        rows: ``Int[R]`` reference row of each batch row (repeats allowed).
        start_layers: ``Int[R]``, non-decreasing, each in ``[0, n_layers]``.
        differentiable: run under autograd (a hook may bring in a tensor that requires grad,
            e.g. integrated gradients' scaled activations); the reference tensors stay
            constants. Default: ``no_grad``.

    Returns:
        ``Float[R, vocab]``: each row's logits at its reference ``last_positions``. A row whose
        read position is before ``start_pos`` cannot change and gets the reference logits.
    """
    require_eval_mode(model, what="resume")
    n_layers, n_pos = ref.n_layers, ref.n_pos
    if not 0 <= start_pos < n_pos:
        raise ValueError(f"start_pos must lie in [0, {n_pos}), got {start_pos}")
    device = ref.tokens.device
    rows = torch.as_tensor(rows, device=device).long()
    start_layers = torch.as_tensor(start_layers, device=device).long()
    if rows.ndim != 1 or rows.shape != start_layers.shape or not len(rows):
        raise ValueError("rows and start_layers must be non-empty [R] tensors of equal length")
    if bool((start_layers[1:] < start_layers[:-1]).any()):
        raise ValueError("start_layers must be non-decreasing: sort the rows by start layer")
    if int(start_layers.min()) < 0 or int(start_layers.max()) > n_layers:
        raise ValueError(f"start_layers must lie in [0, {n_layers}]")
    # rows [enter[j], enter[j + 1]) join at block j
    enter = torch.searchsorted(start_layers, torch.arange(n_layers + 2, device=device)).tolist()
    args, kwargs = _block_inputs(model, ref, start_pos)
    hidden: Tensor | None = None
    grad_mode = torch.enable_grad() if differentiable else torch.no_grad()
    with grad_mode, _kv_cache_reaches_attention(model), model.hooks(fwd_hooks=list(fwd_hooks)):
        for j in range(n_layers + 1):
            lo, hi = enter[j], enter[j + 1]
            if hi > lo:
                joining = ref.resid[j][rows[lo:hi], start_pos:]
                hidden = joining if hidden is None else torch.cat([hidden, joining])
            if hidden is None or j == n_layers:
                continue
            active = rows[: hidden.shape[0]]
            kv = _PrefixKV(
                ref.keys[j][active, :, :start_pos] if start_pos else None,
                ref.values[j][active, :, :start_pos] if start_pos else None,
            )
            block_args = tuple(kv if _is_cache(a) else a for a in args)
            block_kwargs = {k: kv if _is_cache(v) else v for k, v in kwargs.items()}
            out = model.blocks[j](hidden, *block_args, **block_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        assert hidden is not None and hidden.shape[0] == len(rows)  # every row joined by block L
        read = ref.last_positions[rows] - start_pos
        changed = read >= 0
        final = hidden[torch.arange(len(rows), device=device), read.clamp(min=0)]
        logits = model.unembed(model.ln_final(final[:, None, :]))[:, 0]
    return torch.where(changed[:, None], logits, ref.logits[rows])
