"""The model zoo: the fact world (mechedit's embedded default) and random checkpoints.

``NAMES`` lists the shipped checkpoints; ``checkpoint_dir(name)`` gives the folder of one
(config.json, model.safetensors, tokenizer files, metadata.json).
"""

from __future__ import annotations

from pathlib import Path

from mechedit.zoo.random_model import random_gpt2_checkpoint

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
NAMES: tuple[str, ...] = ("factworld", "factworld-planted")


def checkpoint_dir(name: str) -> Path:
    """The shipped Hugging Face checkpoint folder of zoo model ``name``.

    Raises ``KeyError`` for a name not in ``NAMES`` and ``FileNotFoundError`` when the folder is
    missing (rebuild it with ``python -m mechedit.zoo train NAME``).
    """
    if name not in NAMES:
        raise KeyError(f"unknown zoo model {name!r}; the zoo has: {', '.join(NAMES)}")
    folder = CHECKPOINTS / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the {name!r} checkpoint is missing from {folder}; rebuild it with "
            f"`python -m mechedit.zoo train {name}`"
        )
    return folder


__all__ = ["CHECKPOINTS", "NAMES", "checkpoint_dir", "random_gpt2_checkpoint"]
