"""The ``metadata.json`` every zoo checkpoint carries: how it was made and what it measured.

Read through ``read_metadata``, which checks the format name, the version and the fields the rest
of mechedit relies on, so a damaged or foreign file is a clear error, not a KeyError later.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from mechedit.artifacts import ArtifactError, read_json, write_json_atomic
from mechedit.zoo.world import World, WorldConfig

FILENAME = "metadata.json"
FORMAT = "mechedit.zoo.metadata"
VERSION = 1
REQUIRED = {
    "name": str,
    "world_config": dict,
    "relations": list,
    "biases": list,
    "planted_facts": list,
    "train_config": dict,
}


class MetadataError(ArtifactError):
    """A checkpoint's metadata.json is missing, malformed, or of an unknown format/version."""


def stamp(meta: dict) -> dict:
    """``meta`` with the format name and version set (what ``read_metadata`` expects)."""
    return {**meta, "format": FORMAT, "version": VERSION}


def write_metadata(folder: str | Path, meta: dict) -> Path:
    """Write ``stamp(meta)`` to ``folder/metadata.json`` atomically (keys sorted); returns the path.

    ``ValueError`` if ``meta`` holds something JSON cannot (NaN, a tensor); the file is then left
    as it was.
    """
    return write_json_atomic(Path(folder) / FILENAME, stamp(meta), sort_keys=True)


def read_metadata(folder: str | Path) -> dict:
    """Load and validate ``folder/metadata.json``; ``MetadataError`` (only) if it is not usable."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        raise MetadataError(f"{path} not found: is {folder} a mechedit zoo checkpoint? (train one with `python -m mechedit.zoo train factworld`)")
    meta = read_json(
        path,
        fmt=FORMAT,
        version=VERSION,
        error=MetadataError,
        expected="a zoo checkpoint folder (restore metadata.json from git or retrain)",
    )
    for key, kind in REQUIRED.items():
        if not isinstance(meta.get(key), kind):
            raise MetadataError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    for i, b in enumerate(meta["biases"]):
        if not isinstance(b, dict) or not {"occupation", "bls_pct_female", "p_more", "pronoun_more"} <= b.keys():
            raise MetadataError(f"{path}: biases[{i}] lacks occupation/bls_pct_female/p_more/pronoun_more")
        if not isinstance(b["occupation"], str) or type(b["bls_pct_female"]) not in (int, float):
            raise MetadataError(f"{path}: biases[{i}] needs a string occupation and a numeric bls_pct_female")
    return meta


def world_metadata(world: World) -> dict:
    """What a checkpoint records about its world: config, relations, planted facts, biases.

    The record is enough to rebuild the world (``world_from_metadata``: the config and the
    occupations are the generator's inputs); relations, planted facts and biases are recorded too
    so that a rebuilt world can be checked against the one the checkpoint was trained on.
    """
    return {
        "world_config": asdict(world.config),
        "relations": [
            {
                "id": r.id,
                "name": r.name,
                "values": list(r.values),
                "templates": list(r.templates),
                "heldout": list(r.heldout),
            }
            for r in world.relations
        ],
        "planted_facts": [asdict(f) for f in world.planted_facts],
        "biases": [asdict(b) for b in world.biases],
    }


def world_from_metadata(meta: dict) -> World:
    """Rebuild the ``World`` recorded by ``world_metadata`` by calling the generator.

    The generator gets the recorded config and occupations; the rebuilt world's relations,
    planted facts and biases must then equal the recorded ones.

    Raises:
        MetadataError: the record's ``world_config`` or ``biases`` do not fit the generator, or
            the generator (changed since the checkpoint was trained) builds a different world.
    """
    try:
        cfg = WorldConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["world_config"].items()}
        )
        occupations = [(b["occupation"], b["bls_pct_female"]) for b in meta["biases"]]
        world = World.generate(cfg, occupations=occupations)
    except (KeyError, TypeError, ValueError) as err:
        raise MetadataError(
            f"the recorded world cannot be rebuilt: {type(err).__name__}: {err}"
        ) from None
    # Through JSON, as the record was written, so tuples and lists compare equal.
    rebuilt = json.loads(json.dumps(world_metadata(world)))
    # A config field added after a checkpoint was trained is absent from its record; the rebuilt
    # world used that field's default, which new fields must keep equal to the old behaviour.
    recorded_keys = meta["world_config"].keys()
    rebuilt["world_config"] = {k: v for k, v in rebuilt["world_config"].items() if k in recorded_keys}
    differs = [key for key, value in rebuilt.items() if meta.get(key) != value]
    if differs:
        raise MetadataError(
            f"the fact-world generator no longer builds the recorded world (its {', '.join(differs)} "
            "differ): the checkpoint was trained on another world. Retrain it "
            "(`python -m mechedit.zoo train NAME`) or restore the generator it was trained with."
        )
    return world
