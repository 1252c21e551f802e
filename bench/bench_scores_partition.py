"""Save + load time of partition scores: one label per unit (format 1) vs the (param, offset, size) table.

    python bench/bench_scores_partition.py            # GPT-2-small shape, random weights
    python bench/bench_scores_partition.py --small    # a quick run on a tiny model

The partition axis covers every output unit of every parameter ``components.partition_sizes``
lists for the model. Both forms hold the same float32 values and name the same components; the
table shows the JSON sidecar's size, the best of ``--repeats`` save and load times, and a
``top_k(100)`` on the loaded scores, all in this process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import best_of, gpt2_shape

import mechedit
from mechedit.components import partition_key, partition_sizes
from mechedit.provenance import Provenance
from mechedit.scores import PartitionTable, Scores
from mechedit.zoo.random_model import random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 2-layer d_model 64 model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = gpt2_shape(args.small)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = mechedit.load(random_checkpoint(tmp / "model", "gpt2", **shape))
        sizes = partition_sizes(model)
        n_units = sum(sizes.values())
        values = torch.randn(n_units, generator=torch.Generator().manual_seed(0))
        common = {"provenance": Provenance.of(model)}
        del model  # only its partition sizes and provenance are needed from here on

        forms = {
            "labels (format 1)": Scores(
                values, ("partition",), "partition", "bench",
                labels={"partition": [partition_key(p, u) for p, n in sizes.items() for u in range(n)]},
                **common,
            ),
            "table (format 2)": Scores(
                values, ("partition",), "partition", "bench",
                partitions=PartitionTable.from_sizes(sizes), **common,
            ),
        }
        print(f"partition axis: {n_units:,} units over {len(sizes)} parameters "
              f"({'tiny' if args.small else 'GPT-2-small'} shape), float32 values")
        print(f"{'form':<20} {'JSON KiB':>9} {'save s':>8} {'load s':>8} {'top_k s':>8}")
        chosen = {}
        for name, scores in forms.items():
            stem = tmp / name.split()[0]
            save_s, json_path = best_of(args.repeats, lambda scores=scores, stem=stem: scores.save(stem))
            load_s, loaded = best_of(args.repeats, lambda json_path=json_path: Scores.load(json_path))
            top_s, circuit = best_of(args.repeats, lambda loaded=loaded: loaded.top_k(100, by="abs"))
            chosen[name] = list(circuit)
            kib = json_path.stat().st_size / 1024
            print(f"{name:<20} {kib:>9,.1f} {save_s:>8.3f} {load_s:>8.3f} {top_s:>8.3f}")
        first, second = chosen.values()
        print(f"same top-100 components from both forms: {first == second}")


if __name__ == "__main__":
    main()
