"""Edge attribution (EAP) vs TransformerLens's edge-granularity ``attribution_patch``.

    python bench/bench_edge_attribution.py              # GPT-2-small shape, random weights
    python bench/bench_edge_attribution.py --small      # a quick run on a tiny model
    python bench/bench_edge_attribution.py --tl-pairs 8 # time TransformerLens on 8 of the pairs

The same random GPT-2 and 32 pairs of 16 tokens as ``bench_attribution_patching.py``. Both sides
score TransformerLens's edge graph: writers (embedding, every head, every MLP) to readers (every
head's q/k/v input, every MLP's input, the logits), one edge per position (``per_position=True``
for mechedit; 519,856 edges per pair at full size). TransformerLens loops over the pairs, one
forward + backward each with its split-q/k/v flags on, and keeps one Python float per edge;
mechedit runs the batch at once and keeps a tensor. Its time grows linearly with the pairs, so
``--tl-pairs n`` times it on the first ``n`` pairs and scales to all of them (the table says so).
Also: the floor (no-grad forward of the clean batch + forward/backward of the corrupt batch, no
hooks), EAP summed over positions, and EAP-IG (k = 5). Edge scores are compared on the pairs
TransformerLens ran (max |diff|). Times: best of ``--repeats`` after a warm-up on 2 pairs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attribution_patching import best_time, floor, make_pairs  # noqa: E402

import mechedit  # noqa: E402
from mechedit.edges import tl_node_label  # noqa: E402
from mechedit.locate import edge_attribution_patching  # noqa: E402
from mechedit.tokens import tokenize_pairs  # noqa: E402
from mechedit.zoo.random_model import random_checkpoint  # noqa: E402


def tl_edges(model, batch, n: int) -> dict:
    """TransformerLens edge scores of the first ``n`` pairs, averaged (one call per pair)."""
    from transformer_lens.tools.analysis.attribution_patching import (
        EdgeAttributionConfig,
        attribution_patch,
    )

    totals: dict = {}
    for i in range(n):
        a, w = int(batch.answer_ids[i]), int(batch.wrong_ids[i])
        result = attribution_patch(
            model, batch.clean_tokens[i : i + 1], batch.corrupt_tokens[i : i + 1],
            lambda logits, a=a, w=w: (logits[:, -1, a] - logits[:, -1, w]).sum(),
            EdgeAttributionConfig(granularity="edge"),
        )
        for edge, score in result.edge_scores.items():
            totals[edge] = totals.get(edge, 0.0) + score
    return {edge: total / n for edge, total in totals.items()}


def edge_diff(tl: dict, mine) -> tuple[float, float]:
    index_w = {name: i for i, name in enumerate(mine.writers)}
    index_r = {name: j for j, name in enumerate(mine.readers)}
    keys = list(tl)
    pos = torch.tensor([w.position for w, _ in keys])
    wi = torch.tensor([index_w[tl_node_label(w)] for w, _ in keys])
    ri = torch.tensor([index_r[tl_node_label(r)] for _, r in keys])
    theirs = torch.tensor([tl[k] for k in keys], dtype=torch.float64)
    ours = mine.values[pos, wi, ri].double()
    return float((ours - theirs).abs().max()), float(theirs.abs().max())


def run(args) -> None:
    torch.set_num_threads(args.threads)
    model = mechedit.load(args.checkpoint)
    pairs = make_pairs(args.pairs, args.tokens - 1, args.vocab_words)
    batch = tokenize_pairs(model, pairs)
    warm_pairs = pairs[:2]
    warm_batch = tokenize_pairs(model, warm_pairs)
    n_tl = min(args.tl_pairs or args.pairs, args.pairs)
    r = args.repeats

    def eap(ps, **kw):
        return edge_attribution_patching(model, ps, batch_size=len(ps), progress=False, hook_check=False, **kw)

    t_floor = best_time(lambda: floor(model, batch), r, lambda: floor(model, warm_batch))
    t_eap = best_time(lambda: eap(pairs, per_position=True), r, lambda: eap(warm_pairs, per_position=True))
    t_sum = best_time(lambda: eap(pairs), r, lambda: eap(warm_pairs))
    t_ig = best_time(lambda: eap(pairs, ig_steps=args.ig_steps), r, lambda: eap(warm_pairs, ig_steps=args.ig_steps))
    held = {}
    t_tl_part = best_time(lambda: held.update(tl=tl_edges(model, batch, n_tl)), 1, lambda: tl_edges(model, warm_batch, 1))
    t_tl = t_tl_part * args.pairs / n_tl
    worst, largest = edge_diff(held["tl"], eap(pairs[:n_tl], per_position=True))

    cfg = model.cfg
    load = os.getloadavg()
    scaled = "" if n_tl == args.pairs else f" (timed on {n_tl} pairs: {t_tl_part:.1f} s, scaled x{args.pairs / n_tl:g})"
    print(f"model: GPT-2 shape, {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, vocabulary "
          f"{cfg.d_vocab} (random weights); {args.pairs} pairs x {args.tokens} tokens; {len(held['tl'])} edges; "
          f"torch threads {torch.get_num_threads()}; best of {r}; load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print()
    print("| measurement | seconds | ratio | target |")
    print("|---|---:|---:|---|")
    print(f"| TransformerLens `attribution_patch`, edge granularity (per pair){scaled} | {t_tl:.1f} | 1.0 | |")
    print(f"| mechedit EAP, same edges per position | {t_eap:.2f} | {t_tl / t_eap:.1f}x faster | >= 5x |")
    print(f"| mechedit EAP, edges summed over positions | {t_sum:.2f} | {t_tl / t_sum:.1f}x faster | |")
    print(f"| floor: no-grad fwd (clean) + fwd/bwd (corrupt), no hooks | {t_floor:.2f} | | |")
    print(f"| mechedit EAP (per position) / floor | | {t_eap / t_floor:.2f} | |")
    print(f"| EAP-IG over inputs, k = {args.ig_steps} / EAP (summed) | {t_ig:.2f} | {t_ig / t_sum:.2f} | <= 6 |")
    print()
    print(f"edge scores on the {n_tl} pairs TransformerLens ran: max |diff| {worst:.2e} (largest |score| {largest:.2e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model for a quick check")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per prompt, BOS included")
    parser.add_argument("--tl-pairs", type=int, default=0, help="time TransformerLens on this many pairs (0: all)")
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the brief: 2 cores)")
    args = parser.parse_args()
    shape = dict(n_layer=2, n_embd=64, n_head=4) if args.small else dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024)
    args.vocab_words = 1000 if args.small else 50252
    with tempfile.TemporaryDirectory() as tmp:
        args.checkpoint = random_checkpoint(tmp, "gpt2", vocab_words=args.vocab_words, **shape)
        run(args)


if __name__ == "__main__":
    main()
