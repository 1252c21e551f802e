"""Train a zoo model by name: the one function behind ``python -m mechedit.zoo train`` and
``mechedit world train``.

``train_zoo_model(name, out)`` picks the recipe of ``name`` (``TRAINABLE``), applies the overrides
given as keyword arguments or as a JSON settings file (``read_settings``) and runs
``train_factworld``, ``plant_facts`` or ``train_mlm``. A settings file has up to four sections, each
checked against the fields of its dataclass (an unknown key is an error naming the allowed ones)::

    {"world": {"n_people": 24, "n_planted": 4, ...},               # WorldConfig
     "train": {"epochs": 1, "max_steps": 6, "shape": {"n_layer": 2, ...}},  # TrainConfig / MLMTrainConfig
     "plant": {"max_steps": 3, "batch_size": 8, ...},               # PlantConfig
     "occupations": [["nurse", 90.0], ["engineer", 10.0]]}         # (occupation, BLS % female)

which is how tests and quick experiments train tiny worlds in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

#: the zoo models a recipe exists for (all shipped: ``zoo.NAMES``)
TRAINABLE = ("factworld", "factworld-planted", "factworld-planted-subject", "factworld-mlm")
SECTIONS = ("world", "train", "plant", "occupations")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass ``cls`` from ``data``, nested dataclasses included.

    JSON lists become tuples where the field is a tuple; ``ValueError`` names the key path of an
    unknown key, a wrong type or a value the dataclass refuses.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object of {cls.__name__} fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; {cls.__name__} has {', '.join(fields)}")
    values = {}
    for key, value in data.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            value = _from_dict(kind, value, f"{where}.{key}")
        elif isinstance(value, list) and typing.get_origin(kind) is tuple:
            value = tuple(value)
        values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def read_settings(path: str | Path) -> dict[str, Any]:
    """The sections of a JSON settings file (see the module docstring), not yet applied.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not a
    JSON object of known sections.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no settings file {str(p)!r}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{p}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected an object with sections {', '.join(SECTIONS)}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{p}: {unknown[0]}: unknown section; sections are {', '.join(SECTIONS)}")
    return data


def _occupations(settings: dict[str, Any], winogender: str | Path | None) -> list[tuple[str, float]] | None:
    from mechedit.zoo.world import load_occupations

    if "occupations" in settings:
        if winogender is not None:
            raise ValueError("give the occupations in the settings file or --winogender, not both")
        rows = settings["occupations"]
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2 for r in rows):
            raise ValueError('occupations: expected a list of [occupation, bls_pct_female] pairs, e.g. [["nurse", 90.0]]')
        return [(name, pct) for name, pct in rows]
    return load_occupations(winogender)


def train_zoo_model(
    name: str,
    out: str | Path,
    *,
    base: str | Path | None = None,
    settings: dict[str, Any] | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    threads: int | None = None,
    layer: int | None = None,
    at: str | None = None,
    winogender: str | Path | None = None,
    progress: bool = True,
    measure: bool = True,
) -> dict:
    """Train zoo model ``name`` (one of ``TRAINABLE``) into the folder ``out``; returns its metadata.

    The recipe is the shipped one; ``settings`` (``read_settings``) replaces fields of it, and the
    keyword overrides (``epochs``, ``max_steps``, ``threads``; for planted models ``layer``, ``at``
    and ``base``, the factworld folder to start from, default the shipped one) replace those.
    ``winogender``: the path of WinoGender's ``occupations-stats.tsv`` (factworld only).
    With ``measure`` the saved checkpoint's figures are measured into its ``metadata.json``.
    """
    settings = dict(settings or {})
    if name not in TRAINABLE:
        raise ValueError(f"no recipe for {name!r}; trainable zoo models: {', '.join(TRAINABLE)}")
    planted = name.startswith("factworld-planted")
    allowed = {"factworld": ("world", "train", "occupations"), "factworld-mlm": ("world", "train", "occupations")}
    for section in settings:
        if section not in allowed.get(name, ("plant",)):
            raise ValueError(f"{name} takes no {section!r} settings; it takes {', '.join(allowed.get(name, ('plant',)))}")
    if planted and (epochs is not None):
        raise ValueError("--epochs is for factworld and factworld-mlm; planting runs max_steps (--max-steps)")
    if not planted and (layer is not None or at is not None or base is not None):
        raise ValueError("--layer, --at and --base are for the planted models")
    out = Path(out)
    overrides = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps, "threads": threads}.items() if v is not None}

    if name == "factworld":
        from mechedit.zoo.train import TrainConfig, train_factworld
        from mechedit.zoo.world import WorldConfig

        tc = _from_dict(TrainConfig, settings.get("train", {}), "train")
        tc = replace(tc, **overrides)
        wc = _from_dict(WorldConfig, {"seed": tc.seed, **settings.get("world", {})}, "world")
        return train_factworld(out, world_config=wc, train_config=tc, occupations=_occupations(settings, winogender),
                               progress=progress, measure=measure)
    if name == "factworld-mlm":
        from mechedit.zoo.mlm import MLMTrainConfig, train_mlm

        mc = replace(_from_dict(MLMTrainConfig, settings.get("train", {}), "train"), **overrides)
        world = None  # the shipped factworld's, so both models know the same world
        if "world" in settings or "occupations" in settings:
            from mechedit.zoo.world import World, WorldConfig

            wc = _from_dict(WorldConfig, settings.get("world", {}), "world")
            world = World.generate(wc, occupations=_occupations(settings, winogender))
        return train_mlm(out, world=world, train_config=mc, progress=progress, measure=measure)

    from mechedit.zoo.train import PlantConfig, plant_facts

    plant = settings.get("plant", {})
    if not isinstance(plant, dict):
        raise ValueError(f"plant: expected an object of PlantConfig fields, got {type(plant).__name__}")
    # --at, else the settings' "at", else the name decides where the MLP is trained (and its defaults)
    mode = at or plant.get("at") or ("subject" if name == "factworld-planted-subject" else "all")
    if mode not in ("all", "subject"):
        raise ValueError(f"plant.at: {mode!r}; choose all or subject")
    pc = _from_dict(PlantConfig, {**PlantConfig.for_mode(mode).__dict__, **plant, "at": mode}, "plant")
    pc = replace(pc, **{k: v for k, v in {"layer": layer, "max_steps": max_steps, "threads": threads}.items() if v is not None})
    if base is None:
        from mechedit.zoo import checkpoint_dir

        base = checkpoint_dir("factworld")
    return plant_facts(base, out, config=pc, progress=progress, measure=measure)


__all__ = ["SECTIONS", "TRAINABLE", "read_settings", "train_zoo_model"]
