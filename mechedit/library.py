"""The repository's ``circuits/`` folder: circuits for the shipped models, rebuilt by one command.

    mechedit circuits            # rewrites circuits/*.json (mechedit.cli.circuits)
    mechedit circuits --check    # compares a rebuild with them

Besides one circuit per example recipe (``mechedit.cli.circuits``), the library holds:

* ``factworld-planted_ground_truth.json`` and ``factworld-planted-subject_ground_truth.json`` - the
  MLP block the planted facts were trained into (from each checkpoint's metadata; the second
  stores them as subject enrichment): the answer every localisation method is tested against;
* ``factworld_demo.json`` - the demo's circuit: the neurons whose zeroing forgets the demo's fact.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mechedit
from mechedit import zoo
from mechedit.circuit import Circuit
from mechedit.components import Component

PLANTED = ("factworld-planted", "factworld-planted-subject")


def planted_ground_truth(name: str = "factworld-planted") -> Circuit:
    """The whole MLP of the layer the planted model ``name`` learned its new facts in."""
    model = mechedit.load(name)
    meta = zoo.metadata(name)
    layer = meta["planted_layer"]
    at = meta.get("planted_at", "all")
    where = "at every position" if at == "all" else "only at the subject's name tokens"
    return Circuit.of(
        model,
        [Component("mlp", layer)],
        method="planted",
        config={"planted_layer": layer, "planted_facts": len(meta["planted_facts"]), "planted_at": at},
        description=f"ground truth: the {len(meta['planted_facts'])} planted facts were taught by training only blocks.{layer}.mlp {where}",
    )


def demo_circuit(*, progress: bool = True) -> Circuit:
    """The circuit of ``mechedit demo`` with its default settings (the demo runs in a temporary folder)."""
    from mechedit.demo import DemoConfig, run_demo

    with tempfile.TemporaryDirectory() as tmp:
        return run_demo(DemoConfig(out_dir=tmp, effects=False), progress=progress).circuit  # only the circuit is kept


def write_library(out_dir: str | Path = "circuits", *, progress: bool = True) -> list[Path]:
    """Rebuild the ground-truth and demo circuits in ``out_dir``; return the files written.

    ``mechedit circuits`` rebuilds these and the example recipes' circuits.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [planted_ground_truth(name).save(out / f"{name}_ground_truth.json") for name in PLANTED if name in zoo.NAMES]
    written.append(demo_circuit(progress=progress).save(out / "factworld_demo.json"))
    return written
