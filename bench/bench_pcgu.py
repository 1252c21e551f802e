"""One PCGU selection step: the vectorised ranking's cost over one backward pass, and a Python loop.

    python bench/bench_pcgu.py            # GPT-2-small shape (50,257 vocabulary), random weights
    python bench/bench_pcgu.py --small    # a quick run on a tiny model

Setup: 16 contrastive pairs of ~16 tokens (random words, one word swapped), summed gradients of
both sides over every trainable tensor (``locate.pcgu.side_gradients``). Timed, best of
``--repeats``:

* **backward**: one ``torch.autograd.grad`` of one side's summed score with respect to every
  parameter (the forward is run before the clock starts);
* **ranking** (mechedit): ``partition_cosines`` (per-tensor einops reductions) + the global
  lowest-k ``select_lowest``, input aggregation, k = 10,000;
* **loop**: the same selection written straightforwardly, one tensor and one partition at a time
  (slice, dot, two norms, Python list, ``sorted``), timed on a sample of partitions of every
  tensor and extrapolated to all of them.

The target is ranking / backward <= 0.5. The selected partitions of both are compared.

    python bench/bench_pcgu.py --factworld factworld --lr 2e-3 --k 0.2 --epochs 3

runs the whole unlearning instead on a fact-world model (``world_bias_splits``: train / dev /
held-out test pairs) with both baselines at the same steps (at ``--baseline-lr``, by default
PCGU's ``--lr``) and prints the before/after table (``evaluate.bias.bias_edit_table``).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from _common import best_of, gpt2_shape

import mechedit
from mechedit.data_pairs import ContrastivePair
from mechedit.gradients import _selected_parameters, _storage_sharers
from mechedit.locate.pcgu import (
    PCGUConfig,
    partition_cosines,
    partition_specs,
    select_lowest,
    side_gradients,
)
from mechedit.pair_scores import side_scores, tokenize_pair_sides
from mechedit.zoo.random_model import random_checkpoint


def loop_cosines(g_adv, g_dis, specs, sample: int | None) -> tuple[list[float], float]:
    """Per tensor, per partition: the straightforward selection's cosines; seconds for all units.

    With ``sample``, only the first ``sample`` units of each tensor are computed and the time is
    scaled by units / sample per tensor.
    """
    values, seconds = [], 0.0
    for spec in specs:
        a, d = g_adv[spec.name], g_dis[spec.name]
        n = spec.n_units if sample is None else min(sample, spec.n_units)
        start = time.perf_counter()
        for unit in range(n):
            pa = a.reshape(-1) if spec.axis is None else a.select(spec.axis, unit).reshape(-1)
            pd = d.reshape(-1) if spec.axis is None else d.select(spec.axis, unit).reshape(-1)
            na, nd = float(pa.norm()), float(pd.norm())
            values.append(float("nan") if na == 0 or nd == 0 else float(pa @ pd) / (na * nd))
        seconds += (time.perf_counter() - start) * spec.n_units / n
    return values, seconds


def factworld_table(
    name: str,
    *,
    lr: float,
    k: float,
    epochs: int,
    batch_size: int,
    baseline_lr: float | None = None,
    scales: tuple[float, ...] | None = None,
) -> None:
    """Print the before/after table of PCGU and both baselines on fact-world model ``name``."""
    from mechedit import zoo
    from mechedit.data_pairs import world_bias_splits
    from mechedit.edit.pcgu import PCGUUpdateConfig, pcgu_update
    from mechedit.evaluate.bias import bias_edit_table

    model = mechedit.load(name)
    world = zoo.load_world(name)
    splits = world_bias_splits(world)
    cfg = PCGUUpdateConfig(
        ranking=PCGUConfig(k=k), lr=lr, baseline_lr=baseline_lr, epochs=epochs, batch_size=batch_size,
        **({"task_vector_scales": scales} if scales else {}),
    )
    result = pcgu_update(model, splits["train"], splits["dev"], config=cfg, baselines=("finetune", "task_vector"))
    table = bias_edit_table(model, world, result, splits["test"])
    print(f"{name}: {len(splits['train'])} train / {len(splits['dev'])} dev / {len(splits['test'])} test pairs, "
          f"lr {lr} (baselines {baseline_lr or lr}), k {k}, {epochs} epochs of batch {batch_size}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    for method, run in result.runs.items():
        print(method, "dev history:", [round(h["dev_bias"], 3) for h in run.history])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factworld", default=None, help="run the unlearning table on this fact-world model")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--baseline-lr", type=float, default=None, help="the baselines' lr (default: --lr)")
    parser.add_argument("--tv-scales", type=float, nargs="+", default=None, help="the task vector's lambda grid")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="a 2-layer d_model 64 model")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--k", type=float, default=10_000, help="count (>= 1) or fraction (< 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-sample", type=int, default=200, help="units per tensor timed in the loop (0: all)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    k_arg = int(args.k) if args.k >= 1 else args.k
    if args.factworld:
        factworld_table(
            args.factworld, lr=args.lr, k=k_arg, epochs=args.epochs, batch_size=args.batch_size,
            baseline_lr=args.baseline_lr, scales=tuple(args.tv_scales) if args.tv_scales else None,
        )
        return
    shape = gpt2_shape(args.small)
    with tempfile.TemporaryDirectory() as tmp:
        model = mechedit.load(random_checkpoint(Path(tmp) / "model", "gpt2", **shape))
    rng = random.Random(0)
    n_words = 59 if args.small else 50252
    pairs = []
    for _ in range(args.pairs):
        words = [f"w{rng.randrange(n_words)}" for _ in range(args.tokens - 1)]  # + BOS = tokens
        other = list(words)
        at = rng.randrange(len(words))
        other[at] = f"w{(int(words[at][1:]) + 1) % n_words}"
        pairs.append(ContrastivePair(" ".join(words), " ".join(other)))
    batch = tokenize_pair_sides(model, pairs, "causal")
    specs = partition_specs(model, "input")
    names = [s.name for s in specs]
    n_units = sum(s.n_units for s in specs)
    k = min(int(args.k), n_units // 2)
    cfg = PCGUConfig(k=k, batch_size=args.pairs)
    g_adv = side_gradients(model, batch, names, "advantaged", cfg)
    g_dis = side_gradients(model, batch, names, "disadvantaged", cfg)

    # The leaves parameter_gradients differentiates: the bridge's q/k/v views of c_attn included.
    targets = list(_selected_parameters(model, names).values())
    params = list({id(p): p for group in _storage_sharers(model, targets) for p in group}.values())

    def backward() -> None:
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                logits = model(batch.inputs["advantaged"])
                score = side_scores(logits, batch, "advantaged").sum()
                start = time.perf_counter()
                torch.autograd.grad(score, params, allow_unused=True)
                return time.perf_counter() - start
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    backward_s = min(backward() for _ in range(args.repeats))

    def rank():
        cosine, zero = partition_cosines(g_adv, g_dis, specs)
        return cosine, select_lowest(cosine, zero, k)

    rank_s, (cosine, chosen) = best_of(args.repeats, rank)
    sample = None if args.loop_sample == 0 else args.loop_sample
    loop_values, loop_s = loop_cosines(g_adv, g_dis, specs, sample)
    start = time.perf_counter()
    order = sorted((v, i) for i, v in enumerate(loop_values) if v == v)[:k]
    loop_s += (time.perf_counter() - start) * (n_units / max(1, len(loop_values)))
    same = "n/a (sampled)"
    if sample is None:
        same = str(sorted(i for _, i in order) == sorted(chosen.tolist()))

    print(f"GPT-2 {'tiny' if args.small else 'small'} shape: {n_units:,} partitions over {len(specs)} tensors, "
          f"{args.pairs} pairs x {args.tokens} tokens, k = {k:,}, threads {torch.get_num_threads()}")
    print("| step | seconds | / one backward |")
    print("|---|---:|---:|")
    print(f"| one backward (all parameters) | {backward_s:.3f} | 1.00 |")
    print(f"| ranking, vectorised (cosines + global lowest-k) | {rank_s:.3f} | {rank_s / backward_s:.2f} |")
    print(f"| ranking, per-tensor per-partition Python loop{' (extrapolated)' if sample else ''} | {loop_s:.3f} | {loop_s / backward_s:.2f} |")
    print(f"vectorised / loop speed-up: {loop_s / rank_s:.0f}x; same selection: {same}")


if __name__ == "__main__":
    main()
