"""What every command shares: the bad-input error, global options, model loading, output.

Nothing here imports torch or TransformerLens at module level: ``mechedit --help`` must stay
fast, so commands import the library inside their ``run`` functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """Bad input found by the command line itself (exit code 2, one line, no traceback)."""


@dataclass(frozen=True)
class Context:
    """The global options: where to put the model, how much to say, how to report."""

    device: str | None = None
    quiet: bool = False
    json: bool = False
    #: set by ``mechedit run``: the steps' summaries are collected here instead of printed
    record: list[dict[str, Any]] | None = None

    def say(self, *parts: Any) -> None:
        """Progress for people: stderr, so ``--json`` output on stdout stays parseable."""
        if not self.quiet:
            print(*parts, file=sys.stderr, flush=True)

    @property
    def progress(self) -> bool:
        """Whether the library's progress bars run (not with ``--quiet`` or ``--json``)."""
        return not (self.quiet or self.json)


_DEVICE = re.compile(r"^(cpu|mps|meta|cuda(:\d+)?|xpu(:\d+)?)$")


def check_device(device: str | None) -> str | None:
    if device is not None and not _DEVICE.match(device):
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps")
    return device


def load_model(ctx: Context, name_or_dir: str) -> Any:
    """``mechedit.load`` with the global ``--device``; a missing model is bad input (exit 2)."""
    from mechedit.models import load

    ctx.say(f"loading {name_or_dir} ...")
    with quiet_loading(ctx):
        return load(name_or_dir, device=ctx.device)


@contextlib.contextmanager
def quiet_loading(ctx: Context) -> Iterator[None]:
    """Without progress (``--quiet``/``--json``), hide transformers' "Loading weights" bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not ctx.progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as a dict; VALUE is read as JSON when it parses, else text.

    ``--set steps=5`` gives ``5``, ``--set layers=[0,1]`` a list, ``--set site=pre`` the string.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps=5")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out[key.strip().replace("-", "_")] = value
    return out


def check_new_output(path: str | os.PathLike, *, what: str, overwrite: bool = False) -> Path:
    """An output path that may be written: refuse to clobber unless ``--overwrite`` (exit 2).

    Checked before any work, so a refused run costs nothing and creates nothing.
    """
    p = Path(path)
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise UsageError(f"{what} {p} exists and is not empty; choose another path or pass --overwrite")
    if p.is_file() and not overwrite:
        raise UsageError(f"{what} {p} exists; choose another path or pass --overwrite")
    return p


def stamped_folder(parent: Path, name: str, stamp: str) -> tuple[Path, Path]:
    """``(final, partial)`` paths for a new ``parent/name-stamp`` folder that exists in neither form.

    Stamps have one-second resolution, so a second run of the same recipe within that second
    gets ``name-stamp-2`` (then ``-3``, ...) rather than an error or another run's folder.
    """
    for n in range(1, 10_000):
        base = f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}"
        final, partial = parent / base, parent / f".{base}.partial"
        if not final.exists() and not partial.exists():
            return final, partial
    raise UsageError(f"{parent} already holds 9,999 folders named {name}-{stamp}*; clean it up and run again")


def emit(ctx: Context, summary: dict[str, Any], lines: list[str]) -> None:
    """The command's result: ``summary`` as one JSON object with ``--json``, else ``lines`` as text."""
    if ctx.record is not None:
        ctx.record.append(summary)
    elif ctx.json:
        print(json.dumps(summary, sort_keys=True, default=str))
    else:  # the result itself, also under --quiet (which silences progress only)
        for line in lines:
            print(line)
