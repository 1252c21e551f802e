"""The model zoo: the fact world (mechedit's embedded default) and random checkpoints.

``factworld`` (GPT-2) and ``factworld-planted`` are causal LMs; ``factworld-mlm`` is a BERT
masked LM on the same world (trained by ``mechedit.zoo.mlm``).

``NAMES`` lists the shipped checkpoints; ``checkpoint_dir(name)`` gives the folder of one
(config.json, model.safetensors, tokenizer files, metadata.json); ``load_world(name)`` rebuilds
the world it was trained on (its ground truth); ``export(name, out_dir)`` writes that world in
CounterFact / known_1000 / CrowS-Pairs formats.
"""

from __future__ import annotations

from pathlib import Path

from mechedit.zoo.metadata import read_metadata, world_from_metadata
from mechedit.zoo.random_model import random_gpt2_checkpoint

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
# `python -m mechedit.zoo train NAME` writes each of them to CHECKPOINTS (MODEL_CARD.md: figures, gaps).
NAMES: tuple[str, ...] = ("factworld", "factworld-planted", "factworld-planted-subject", "factworld-mlm")


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


def metadata(name_or_dir: str | Path) -> dict:
    """The validated ``metadata.json`` of a zoo model (by name) or of a checkpoint folder."""
    folder = checkpoint_dir(name_or_dir) if str(name_or_dir) in NAMES else Path(name_or_dir)
    return read_metadata(folder)


def load_world(name_or_dir: str | Path = "factworld"):
    """Rebuild the ``World`` a zoo checkpoint was trained on, from its recorded configuration."""
    return world_from_metadata(metadata(name_or_dir))


def export(name_or_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the world of a zoo model in the standard formats (see ``mechedit.zoo.formats``)."""
    from mechedit.zoo.formats import export_world

    return export_world(load_world(name_or_dir), out_dir)


__all__ = [
    "CHECKPOINTS",
    "NAMES",
    "checkpoint_dir",
    "export",
    "load_world",
    "metadata",
    "random_gpt2_checkpoint",
]
