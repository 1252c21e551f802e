"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``, so this folder is
on ``sys.path`` and ``from _common import best_of`` works)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def best_of(repeats: int, run: Callable[[], T]) -> tuple[float, T]:
    """Fastest wall time of ``repeats`` calls of ``run`` (seconds) and the last call's result."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def gpt2_shape(small: bool) -> dict[str, int]:
    """``random_checkpoint`` keyword arguments: GPT-2-small's shape (12 layers, d_model 768, its
    50,257-token vocabulary), or a tiny 2-layer model for smoke tests (``small``)."""
    if small:
        return {"n_layer": 2, "n_embd": 64, "n_head": 4}
    return {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_words": 50252}
