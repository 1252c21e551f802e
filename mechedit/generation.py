"""Greedy generation from token ids, batched: the one generator privacy and fact metrics share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mechedit.interventions import real_tokens
from mechedit.models import model_device
from mechedit.tokens import get_tokenizer

__all__ = ["greedy_continuations", "pad_token_id"]


def pad_token_id(model: Any) -> int:
    """The id used to pad rows: the tokenizer's pad, else EOS, else BOS, else 0."""
    tok = get_tokenizer(model)
    for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if candidate is not None:
            return candidate
    return 0


@torch.no_grad()
def greedy_continuations(
    model: Any, rows: Sequence[Sequence[int]], n_new: Sequence[int], batch_size: int = 128
) -> list[list[int]]:
    """Greedy continuations of ``n_new[r]`` tokens after each row (causal LMs), batched.

    Rows are right-padded in one buffer; each step runs the batch once, reads each row's own
    last position and writes the argmax after it (so no attention mask or position shift is
    needed), until every row has its tokens.
    """
    out: list[list[int]] = [[] for _ in rows]
    pad = pad_token_id(model)
    device = model_device(model)
    # Rows needing as many steps (and of similar lengths) share a batch, so few steps run idle.
    order = sorted(range(len(rows)), key=lambda r: (n_new[r], len(rows[r])))
    for start in range(0, len(rows), batch_size):
        sl = slice(start, start + batch_size)
        members = order[sl]
        chunk, want = [rows[r] for r in members], torch.tensor([n_new[r] for r in members])
        lengths = torch.tensor([len(r) for r in chunk])
        buf = torch.full((len(chunk), int((lengths + want).max())), pad, dtype=torch.long)
        for i, r in enumerate(chunk):
            buf[i, : len(r)] = torch.tensor(r)
        done = torch.zeros(len(chunk), dtype=torch.long)
        idx = torch.arange(len(chunk))
        for _ in range(int(want.max()) if len(chunk) else 0):
            live = done < want
            width = int((lengths + done)[live].max())
            real = torch.arange(width)[None, :] < (lengths + done)[:, None]
            with real_tokens(real):
                logits = model(buf[:, :width].to(device))
            logits = (logits.logits if hasattr(logits, "logits") else logits).cpu()
            nxt = logits[idx, (lengths + done - 1).clamp(max=width - 1)].argmax(-1)
            pos = (lengths + done)[live]
            buf[idx[live], pos] = nxt[live]
            done = done + live.long()
        for i, r in enumerate(members):
            out[r] = buf[i, lengths[i] : lengths[i] + want[i]].tolist()
    return out
