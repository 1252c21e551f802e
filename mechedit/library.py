"""The repository's ``circuits/`` folder: circuits for the shipped models, rebuilt by one command.

    mechedit circuits            # rewrites circuits/*.json

* ``factworld-planted_ground_truth.json`` - the MLP block the planted facts were trained into
  (from the checkpoint's metadata): the answer every localisation method is tested against;
* ``factworld_demo.json`` - the demo's circuit: the neurons whose zeroing forgets the demo's fact.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mechedit
from mechedit import zoo
from mechedit.circuit import Circuit
from mechedit.components import Component


def planted_ground_truth() -> Circuit:
    """The whole MLP of the layer ``factworld-planted`` learned its new facts in."""
    model = mechedit.load("factworld-planted")
    meta = zoo.metadata("factworld-planted")
    layer = meta["planted_layer"]
    return Circuit.of(
        model,
        [Component("mlp", layer)],
        method="planted",
        config={"planted_layer": layer, "planted_facts": len(meta["planted_facts"])},
        description=f"ground truth: the {len(meta['planted_facts'])} planted facts were taught by training only blocks.{layer}.mlp",
    )


def write_library(out_dir: str | Path = "circuits", *, progress: bool = True) -> list[Path]:
    """Rebuild every circuit of the library in ``out_dir``; return the files written."""
    from mechedit.demo import DemoConfig, run_demo

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [planted_ground_truth().save(out / "factworld-planted_ground_truth.json")]
    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(DemoConfig(out_dir=tmp), progress=progress)
        written.append(Path(shutil.copy(result.paths["circuit"], out / "factworld_demo.json")))
    return written
