"""Attribution patching (AtP) vs TransformerLens's ``attribution_patch``, its floor, IG and memory.

    python bench/bench_attribution_patching.py            # GPT-2-small shape, random weights
    python bench/bench_attribution_patching.py --small    # a quick run on a tiny model

One random GPT-2 (12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary 50,257 at full size;
no download) and 32 clean/corrupt pairs of 16 tokens (BOS + 15 words; corrupt differs at 1-3
positions; logit-difference metric at the last token). Times are the best of ``--repeats``
runs (default 1) after a warm-up on 2 pairs, all in this process:

- TransformerLens ``attribution_patch`` (node granularity: embed, every head's ``hook_z``, every
  ``mlp_out``, per position). Its metric maps one example's logits to a scalar and it loops over
  the pairs one at a time anyway, so it is called once per pair with that pair's metric and the
  node scores averaged; mechedit is timed on the same node set and on the larger set with
  ``resid_pre`` per position, and the node scores are compared (max |diff|).
- The floor: a no-grad forward of the clean batch plus a forward and backward of the corrupt
  batch with the scalar metric, no hooks. The backward computes activation gradients all the way
  down (only the position-embedding table, 16 x 768, asks for a gradient, so no weight-matrix
  gradient is formed), which is what AtP needs and nothing more.
- Integrated gradients over inputs, k = 5, over plain AtP.

Peak memory: each measured thing runs in a fresh subprocess of this script (loading the same
checkpoint); after the load and a ``gc.collect()`` the child resets the kernel's peak-RSS mark
(``echo 5 > /proc/self/clear_refs``), runs the thing once and reports ``VmHWM - VmRSS`` from
``/proc/self/status`` (peak resident memory during the run above what was resident before it).
Torch CPU tensors are allocated by malloc outside Python's tracemalloc, so RSS is what counts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mechedit
from mechedit.locate import attribution_memory, attribution_patching
from mechedit.prompts import PromptPair
from mechedit.tokens import tokenize_pairs
from mechedit.zoo.random_model import random_checkpoint

NODE_SITES = ("embed", "head", "mlp_out")
ALL_SITES = ("embed", "resid_pre", "head", "mlp_out")


def make_pairs(n_pairs: int, n_words: int, vocab_words: int, seed: int = 0) -> list[PromptPair]:
    """``n_pairs`` pairs of ``n_words`` random words; corrupt replaces 1-3 of them."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n_pairs):
        clean = torch.randint(0, vocab_words, (n_words,), generator=g)
        corrupt = clean.clone()
        n_changed = int(torch.randint(1, 4, (1,), generator=g))
        where = torch.randperm(n_words, generator=g)[:n_changed]
        corrupt[where] = (clean[where] + 1 + torch.randint(0, vocab_words - 1, (n_changed,), generator=g)) % vocab_words
        answer, wrong = torch.randperm(vocab_words, generator=g)[:2].tolist()
        pairs.append(PromptPair(
            clean=" ".join(f"w{i}" for i in clean.tolist()),
            corrupt=" ".join(f"w{i}" for i in corrupt.tolist()),
            answer=f"w{answer}", wrong_answer=f"w{wrong}",
        ))
    return pairs


def logit_diff_total(batch):
    rows = torch.arange(len(batch.last_positions))

    def total(logits):
        read = logits[rows, batch.last_positions]
        return (read[rows, batch.answer_ids] - read[rows, batch.wrong_ids]).sum()

    return total


def floor(model, batch) -> None:
    """No-grad clean forward + corrupt forward/backward to the embeddings, no hooks."""
    metric = logit_diff_total(batch)
    with torch.no_grad():
        model(batch.clean_tokens)
    wpe = model.original_model.transformer.wpe.weight
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(p is wpe)
        with torch.enable_grad():
            value = metric(model(batch.corrupt_tokens))
            (grad,) = torch.autograd.grad(value, [wpe])
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    if not bool(grad.abs().sum() > 0):
        raise RuntimeError("the floor's backward did not reach the embeddings")


def tl_node_scores(model, batch) -> dict:
    """TransformerLens node scores averaged over the pairs (one call per pair: its own metric)."""
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    totals: dict = {}
    n = len(batch.last_positions)
    for i in range(n):
        a, w = int(batch.answer_ids[i]), int(batch.wrong_ids[i])
        result = attribution_patch(
            model, batch.clean_tokens[i : i + 1], batch.corrupt_tokens[i : i + 1],
            lambda logits, a=a, w=w: (logits[:, -1, a] - logits[:, -1, w]).sum(),
        )
        for node, score in result.node_scores.items():
            totals[node] = totals.get(node, 0.0) + score
    return {node: total / n for node, total in totals.items()}


def node_diff(tl: dict, atp) -> tuple[float, float]:
    """Max |TL - mechedit| over TL's nodes, and the largest |TL score| (for scale)."""
    worst = largest = 0.0
    for node, score in tl.items():
        if node.kind == "embed":
            mine = atp["embed"].values[0, node.position]
        elif node.kind == "attn_head_out":
            mine = atp["head"].values[node.layer, node.head, node.position]
        else:
            mine = atp["mlp_out"].values[node.layer, node.position]
        worst = max(worst, abs(float(mine) - score))
        largest = max(largest, abs(score))
    return worst, largest


def best_time(fn, repeats: int, warmup=None) -> float:
    (warmup or fn)()  # first-call costs (allocator, lazy init) out of the timing
    times = []
    print(f"{time.strftime('%H:%M:%S')} timing {getattr(fn, '__name__', 'job')}", file=sys.stderr, flush=True)
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _jobs(model, pairs, batch, ig_steps: int):
    return {
        "floor": lambda: floor(model, batch),
        "atp": lambda: attribution_patching(model, pairs, sites=ALL_SITES, batch_size=len(pairs), progress=False),
        "atp_nodes": lambda: attribution_patching(model, pairs, sites=NODE_SITES, batch_size=len(pairs), progress=False),
        "ig": lambda: attribution_patching(model, pairs, sites=ALL_SITES, batch_size=len(pairs), ig_steps=ig_steps,
                                           progress=False),
        "tl": lambda: tl_node_scores(model, batch),
    }


def child(args) -> None:
    """Fresh process: peak RSS above the post-load level while running one job once."""
    torch.set_num_threads(args.threads)
    model = mechedit.load(args.checkpoint)
    pairs = make_pairs(args.pairs, args.tokens - 1, args.vocab_words)
    batch = tokenize_pairs(model, pairs)
    job = _jobs(model, pairs, batch, args.ig_steps)[args.measure]
    gc.collect()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    job()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024}))


def peak_mib(args, what: str) -> float:
    cmd = [sys.executable, __file__, "--child", "--measure", what, "--checkpoint", str(args.checkpoint),
           "--pairs", str(args.pairs), "--tokens", str(args.tokens), "--vocab-words", str(args.vocab_words),
           "--ig-steps", str(args.ig_steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def run(args) -> None:
    torch.set_num_threads(args.threads)
    model = mechedit.load(args.checkpoint)
    pairs = make_pairs(args.pairs, args.tokens - 1, args.vocab_words)
    batch = tokenize_pairs(model, pairs)
    if batch.clean_tokens.shape[1] != args.tokens:
        raise RuntimeError(f"pairs tokenize to {batch.clean_tokens.shape[1]} tokens, not {args.tokens}")
    jobs = _jobs(model, pairs, batch, args.ig_steps)
    warm = _jobs(model, pairs[:2], tokenize_pairs(model, pairs[:2]), args.ig_steps)
    cfg = model.cfg
    r = args.repeats

    t_floor = best_time(jobs["floor"], r, warm["floor"])
    t_atp = best_time(jobs["atp"], r, warm["atp"])
    t_nodes = best_time(jobs["atp_nodes"], r, warm["atp_nodes"])
    t_ig = best_time(jobs["ig"], r, warm["ig"])
    tl_holder = {}
    t_tl = best_time(lambda: tl_holder.update(scores=jobs["tl"]()), r, warm["tl"])
    worst, largest = node_diff(tl_holder["scores"], jobs["atp_nodes"]())
    m_floor = peak_mib(args, "floor")
    m_atp = peak_mib(args, "atp")
    m_ig = peak_mib(args, "ig") if args.ig_memory else float("nan")

    load = os.getloadavg()
    print(f"model: GPT-2 shape, {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, d_mlp {cfg.d_mlp}, "
          f"vocabulary {cfg.d_vocab} (random weights); {args.pairs} pairs x {args.tokens} tokens; torch threads "
          f"{torch.get_num_threads()}; best of {r}; load average after: "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print()
    print("| measurement | seconds | ratio | target |")
    print("|---|---:|---:|---|")
    print(f"| TransformerLens `attribution_patch`, nodes: embed + heads + mlp_out (per pair) | {t_tl:.2f} | 1.0 | |")
    print(f"| mechedit AtP, same nodes | {t_nodes:.2f} | {t_tl / t_nodes:.1f}x faster | >= 5x |")
    print(f"| mechedit AtP, + resid_pre per position | {t_atp:.2f} | {t_tl / t_atp:.1f}x faster | >= 5x |")
    print(f"| floor: no-grad fwd (clean) + fwd/bwd (corrupt), no hooks | {t_floor:.2f} | | |")
    print(f"| mechedit AtP (all sites) / floor | | {t_atp / t_floor:.2f} | <= 1.3 |")
    print(f"| mechedit AtP (TL's nodes) / floor | | {t_nodes / t_floor:.2f} | |")
    print(f"| IG over inputs, k = {args.ig_steps} (all sites) / AtP | {t_ig:.2f} | {t_ig / t_atp:.2f} | <= 6 |")
    print()
    print("| peak memory above the loaded model (fresh process, RSS) | MiB | ratio | target |")
    print("|---|---:|---:|---|")
    print(f"| floor: no-grad fwd + fwd/bwd | {m_floor:.0f} | 1.0 | |")
    print(f"| mechedit AtP (all sites) | {m_atp:.0f} | {m_atp / m_floor:.2f} | <= 2 |")
    estimate = attribution_memory(model, n_tokens=args.tokens, batch_size=args.pairs, sites=ALL_SITES) / 2**20
    print(f"| `attribution_memory` estimate of that run, before it | {estimate:.0f} | {estimate / m_atp:.2f} of measured | |")
    if args.ig_memory:
        print(f"| IG, k = {args.ig_steps} (all sites) | {m_ig:.0f} | {m_ig / m_floor:.2f} | |")
    print()
    print(f"node scores, mechedit vs TransformerLens: max |diff| {worst:.2e} (largest |score| {largest:.2e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model for a quick check")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per prompt, BOS included")
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the brief: 2 cores)")
    parser.add_argument("--ig-memory", action="store_true", help="also measure IG's peak memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-words", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    shape = dict(n_layer=2, n_embd=64, n_head=4) if args.small else dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024)
    args.vocab_words = 1000 if args.small else 50252  # + 5 special tokens: GPT-2's 50,257
    with tempfile.TemporaryDirectory() as tmp:
        args.checkpoint = random_checkpoint(tmp, "gpt2", vocab_words=args.vocab_words, **shape)
        run(args)


if __name__ == "__main__":
    main()
