"""Circuit-restricted fine-tuning vs full fine-tuning: steps per second and optimiser memory.

    python bench/bench_finetune.py            # GPT-2-small shape (50,257 vocabulary), random weights
    python bench/bench_finetune.py --small    # a quick run on a tiny model

Setup: 8 rows of ~16 random words, each with a one-word new answer; ``finetune`` with ``EditCE``
(no reference outputs to precompute), AdamW, ``--steps`` steps, the whole set every step. Three
circuits: the MLP blocks of two layers, 24 MLP neurons in three layers, and ``"all"`` (every
parameter: full fine-tuning through the same loop). Reported per circuit:

* **trained entries**: the parameter entries the circuit covers (what the optimiser holds);
* **optimiser state**: the bytes of AdamW's state (``exp_avg``, ``exp_avg_sq``, ``step``) plus the
  packed leaves it steps, measured on the optimiser object after the run;
* **steps/s**: steps over the training loop's wall time (``edit.params["run"]["seconds"]``: the
  forwards, backward, gradient packing, AdamW and the scatter back; tokenisation included).

Frozen entries hold no optimiser state, so the memory ratio follows the covered entries; the
step time is dominated by the forward and backward through the whole model, which a circuit does
not shorten (gradients are still propagated through every later layer to reach it).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch
from _common import gpt2_shape

import mechedit
from mechedit.components import Component
from mechedit.edit import EditCE, FinetuneConfig, finetune
from mechedit.zoo.random_model import random_checkpoint


def optimiser_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            total += p.numel() * p.element_size()
            for value in opt.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 2-layer d_model 64 model")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = gpt2_shape(args.small)
    with tempfile.TemporaryDirectory() as tmp:
        model = mechedit.load(random_checkpoint(Path(tmp) / "model", "gpt2", **shape))
    rng = random.Random(0)
    n_words = 59 if args.small else 50252
    rows = [
        (" ".join(f"w{rng.randrange(n_words)}" for _ in range(args.tokens - 2)), f"w{rng.randrange(n_words)}")
        for _ in range(args.rows)
    ]
    last = model.cfg.n_layers - 1
    circuits = {
        f"MLP blocks {last - 1}, {last}": [Component("mlp", last - 1), Component("mlp", last)],
        "24 MLP neurons": [
            Component("neuron", layer, neuron=j) for layer in dict.fromkeys((0, last // 2, last)) for j in range(8 if last > 1 else 12)
        ],
        "all parameters (full fine-tuning)": "all",
    }
    cfg = FinetuneConfig((EditCE(),), lr=1e-4, steps=args.steps, clip_norm=1.0)
    captured: list[torch.optim.Optimizer] = []
    adamw = torch.optim.AdamW

    def spy(params, **kw):
        captured.append(adamw(params, **kw))
        return captured[-1]

    # warm-up: first-call costs (allocator, kernels) should not land on the first circuit timed
    finetune(model, circuits["all parameters (full fine-tuning)"], edit=rows,
             config=FinetuneConfig((EditCE(),), lr=1e-4, steps=1), progress=False)
    results = {}
    torch.optim.AdamW = spy  # the one optimiser finetune builds, to read its state afterwards
    try:
        for name, circuit in circuits.items():
            edit = finetune(model, circuit, edit=rows, config=cfg, progress=False)
            run = edit.params["run"]
            results[name] = {
                "entries": sum(edit.params["trained"].values()),
                "bytes": optimiser_bytes(captured[-1]),
                "steps_per_s": run["steps"] / run["seconds"],
            }
            captured.clear()
    finally:
        torch.optim.AdamW = adamw
    full = results["all parameters (full fine-tuning)"]
    print(f"GPT-2 {'tiny' if args.small else 'small'} shape, {args.rows} rows x {args.tokens} tokens, "
          f"{args.steps} steps, {torch.get_num_threads()} threads")
    print("| circuit | trained entries | optimiser state (MiB) | vs full | steps/s | vs full |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['entries']:,} | {r['bytes'] / 2**20:.2f} | {r['bytes'] / full['bytes']:.4f}x | "
              f"{r['steps_per_s']:.3f} | {r['steps_per_s'] / full['steps_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
