"""Exact activation patching: mechedit (resumed runs) vs TransformerLens 4.3's ``patching`` module.

    python bench/bench_activation_patching.py            # GPT-2-small shape, random weights
    python bench/bench_activation_patching.py --small    # a quick run on a tiny model

Both run in this process on the same model and token tensors, with the same torch threads.
The model has GPT-2 small's shape and vocabulary size (12 layers, d_model 768, 12 heads,
d_mlp 3072, 50,257 tokens; random weights written as a local HF checkpoint). The pairs are
``--pairs`` prompts of ``--tokens`` tokens (BOS included) whose clean and corrupt versions differ
at 1-3 "subject" positions in the middle; the worst-case rows use pairs differing from position 1
on (the first token after BOS), where nothing before the patch can be reused.

TransformerLens runs one full forward of all pairs per cell, so its time is linear in the cells:
it is timed on a random sample of ``--tl-cells`` cells (through ``index_df``) plus its clean
cache and unpatched corrupt run, and extrapolated to the whole grid; its values on the sampled
cells give the max |difference| from mechedit. mechedit runs the whole grid (``method="fast"``),
except that for heads it runs the first ``--heads`` heads of every layer and scales its time by
``n_heads / --heads`` (its cost is linear in the rows, cells x pairs; the scaling also multiplies
its two fixed reference runs, so it overstates mechedit's time).

Peak memory: the growth of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` before each measurement, so it sees torch's CPU allocations, which
``tracemalloc`` does not) over the resident set just before. glibc is told to serve every
allocation above 64 KiB with ``mmap`` so that freed tensors leave the resident set at once and
one measurement does not hide in memory freed by the one before. Linux only. TL's peak includes
its clean cache (``run_with_cache``) and the sampled cells' forwards; mechedit's, its two
reference runs and every resumed batch.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformer_lens import patching as tl_patching

import mechedit
from mechedit.locate.activation_patching import activation_patching
from mechedit.prompts import PromptPair, TokenizedPairs
from mechedit.tokens import tokenize_pairs
from mechedit.zoo.random_model import random_checkpoint

GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_words=50252)
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_words=1000)


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def _malloc_returns_freed_tensors() -> bool:
    """Ask glibc to mmap allocations above 64 KiB (freed at once); False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 64 * 1024))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth_mib(fn: Callable[[], Any]) -> float:
    """Peak resident set during ``fn()`` minus the resident set before it, in MiB (>= 0).

    The reset peak can read a few KiB under the resident set read just after it, so a run that
    allocates nothing new would come out slightly negative: it is 0.
    """
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    fn()
    return max(0.0, (_status_kib("VmHWM") - before) / 1024)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def make_pairs(n_pairs: int, n_words: int, vocab_words: int, first: int, seed: int) -> list[PromptPair]:
    """Random word prompts; corrupt swaps 1-3 consecutive words from word ``first`` (by pair)."""
    rng = random.Random(seed)

    def text(ws: list[int]) -> str:
        return " ".join(f"w{w}" for w in ws)

    pairs = []
    for i in range(n_pairs):
        clean = [rng.randrange(vocab_words) for _ in range(n_words)]
        answer, wrong = rng.sample(range(vocab_words), 2)
        corrupt = list(clean)
        for k in range(first, first + 1 + i % 3):
            while corrupt[k] == clean[k]:
                corrupt[k] = rng.randrange(vocab_words)
        pairs.append(PromptPair(clean=text(clean), corrupt=text(corrupt), answer=f"w{answer}",
                                wrong_answer=f"w{wrong}", pair_id=i))
    return pairs


# --------------------------------------------------------------------------------------------
# The two tools
# --------------------------------------------------------------------------------------------

# site -> (mechedit site, TL function, TL's axis order as mechedit axes)
SITES = {
    "resid": ("resid_pre", tl_patching.get_act_patch_resid_pre, ("layer", "pos")),
    "head": ("head", tl_patching.get_act_patch_attn_head_out_by_pos, ("layer", "pos", "head")),
}


def tl_metric(batch: TokenizedPairs) -> Callable[[torch.Tensor], torch.Tensor]:
    rows = torch.arange(len(batch))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at_last = logits[rows, batch.last_positions]
        return (at_last[rows, batch.answer_ids] - at_last[rows, batch.wrong_ids]).mean()

    return metric


def run_tl(model, batch: TokenizedPairs, site: str, cells: pd.DataFrame) -> tuple[torch.Tensor, float, float]:
    """TL's ``metric(patched) - metric(corrupt)`` on ``cells``; seconds of setup and of the cells.

    Setup is TL's clean cache and the unpatched corrupt run.
    """
    metric = tl_metric(batch)
    _, tl_fn, _ = SITES[site]
    with torch.no_grad():
        t0 = time.perf_counter()
        _, cache = model.run_with_cache(batch.clean_tokens)
        base = metric(model(batch.corrupt_tokens))
        t1 = time.perf_counter()
        # index_df replaces the partial's full grid with the sampled cells
        patched = tl_fn(model, batch.corrupt_tokens, cache, metric, index_axis_names=None, index_df=cells)
        t2 = time.perf_counter()
    return patched - base, t1 - t0, t2 - t1


def run_mechedit(model, batch: TokenizedPairs, site: str, args):
    """mechedit's scores on the whole grid (heads: the first ``--heads`` heads of every layer)."""
    units = None if site == "resid" or args.heads >= model.cfg.n_heads else list(range(args.heads))
    return activation_patching(
        model, batch, site=SITES[site][0], units=units, method="fast", batch_rows=args.batch_rows, progress=False
    )


def sample_cells(model, site: str, n_pos: int, n_heads: int, n: int, seed: int) -> pd.DataFrame:
    """``n`` random cells of ``site``'s grid (heads ``< n_heads``), in TL's axis order."""
    sizes = {"layer": model.cfg.n_layers, "pos": n_pos, "head": n_heads}
    axes = SITES[site][2]
    total = 1
    for a in axes:
        total *= sizes[a]
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(total, generator=g)[: min(n, total)].sort().values
    cols = {}
    for a in reversed(axes):
        cols[a] = (flat % sizes[a]).tolist()
        flat = flat // sizes[a]
    return pd.DataFrame({a: cols[a] for a in axes})


def plain_forward_seconds(model, batch: TokenizedPairs) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        model(batch.corrupt_tokens)
        return time.perf_counter() - t


def compare(model, batch: TokenizedPairs, site: str, args) -> dict:
    """Time and peak memory of both tools on ``site``: mechedit on the grid, TL on a sample."""
    n_pos = batch.clean_tokens.shape[1]
    n_heads = model.cfg.n_heads
    cells = sample_cells(model, site, n_pos, min(args.heads, n_heads), args.tl_cells, args.seed)
    n_total = model.cfg.n_layers * n_pos * (n_heads if site == "head" else 1)
    got: dict[str, Any] = {}

    def mine() -> None:
        t = time.perf_counter()
        got["mine"] = run_mechedit(model, batch, site, args)
        got["t_mine"] = time.perf_counter() - t

    def theirs() -> None:
        got["tl"], got["t_setup"], got["t_cells"] = run_tl(model, batch, site, cells)

    # the machine's speed drifts with other load: time a plain forward before and after each tool
    # and also report each tool's time in those forwards
    fwd = [plain_forward_seconds(model, batch)]
    mem_mine = peak_growth_mib(mine)
    fwd.append(plain_forward_seconds(model, batch))
    mem_tl = peak_growth_mib(theirs)
    fwd.append(plain_forward_seconds(model, batch))
    # mechedit ran the first --heads heads: its time scales with the rows (heads x pos x pairs)
    t_mine = got["t_mine"] * (n_heads / min(args.heads, n_heads) if site == "head" else 1)
    t_tl = got["t_setup"] + got["t_cells"] / len(cells) * n_total
    order = ("layer", "head", "pos") if site == "head" else ("layer", "pos")
    index = tuple(torch.tensor(cells[a].tolist()) for a in order)
    diff = float((got["mine"].values[index] - got["tl"]).abs().max())
    return dict(t_mine=t_mine, t_tl=t_tl, n_cells=n_total, n_sampled=len(cells), diff=diff,
                fwd_mine=(fwd[0] + fwd[1]) / 2, fwd_tl=(fwd[1] + fwd[2]) / 2,
                scale=float(got["tl"].abs().max()), mem_mine=mem_mine, mem_tl=mem_tl)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model for a quick check")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per prompt, BOS included")
    parser.add_argument("--tl-cells", type=int, default=12, help="cells TL is timed on per row")
    parser.add_argument("--heads", type=int, default=3, help="heads per layer mechedit runs (time scaled up)")
    parser.add_argument("--batch-rows", type=int, default=256, help="mechedit's rows per resumed batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-worst-case", action="store_true", help="skip the differ-from-position-1 rows")
    parser.add_argument("--sites", nargs="+", choices=sorted(SITES), default=list(SITES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    malloc_ok = _malloc_returns_freed_tensors()
    shape = TINY if args.small else GPT2_SMALL
    with tempfile.TemporaryDirectory() as tmp:
        model = mechedit.load(random_checkpoint(tmp, "gpt2", seed=args.seed, **shape))
    n_words = args.tokens - 1  # the bridge prepends BOS on GPT-2
    # the subject: 1-3 words in the middle; worst case: from the first word (position 1) on
    typical = make_pairs(args.pairs, n_words, shape["vocab_words"], n_words // 2 - 1, args.seed)
    worst = make_pairs(args.pairs, n_words, shape["vocab_words"], 0, args.seed + 1)
    batches = {"typical": tokenize_pairs(model, typical)}
    if not args.no_worst_case:
        batches["worst case"] = tokenize_pairs(model, worst)
    for b in batches.values():
        if b.clean_tokens.shape[1] != args.tokens or not bool(b.attention_mask.all()):
            raise RuntimeError(f"expected unpadded prompts of {args.tokens} tokens, got {tuple(b.clean_tokens.shape)}")
    first_diff = {k: int((b.clean_tokens != b.corrupt_tokens).any(0).nonzero()[0]) for k, b in batches.items()}

    # warm-up: one cell of each tool
    first = batches["typical"]
    activation_patching(model, first, layers=[0], positions=[args.tokens - 1], method="fast", progress=False)
    run_tl(model, first, "resid", sample_cells(model, "resid", args.tokens, 1, 1, args.seed))

    def forward() -> None:
        with torch.no_grad():
            model(first.corrupt_tokens)

    plain = peak_growth_mib(forward)
    rows = []
    for case, batch in batches.items():
        for site in args.sites:
            rows.append((case, site, compare(model, batch, site, args)))

    cfg = model.cfg
    print(f"model: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, d_mlp {cfg.d_mlp}, "
          f"vocab {cfg.d_vocab} (random weights); {args.pairs} pairs x {args.tokens} tokens; torch threads "
          f"{torch.get_num_threads()}; first differing position: "
          + ", ".join(f"{k} {v}" for k, v in first_diff.items()))
    print()
    print("| pairs | exact patching | cells | TL 4.3 s (forwards) | mechedit fast s (forwards) | speed-up: s "
          "(forwards) | max abs diff | peak MiB TL / mechedit (plain forward = 1) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")

    def ratio(mib: float) -> str:
        return f"{mib / plain:.1f}" if plain >= 1 else "n/a"  # a tiny model's forward may not grow it

    for case, site, r in rows:
        what = "layer x pos, resid_pre" if site == "resid" else "layer x head x pos, attn.hook_z"
        f_tl, f_mine = r["t_tl"] / r["fwd_tl"], r["t_mine"] / r["fwd_mine"]
        print(f"| {case} | {what} | {r['n_cells']} | {r['t_tl']:.0f} ({f_tl:.0f}) | {r['t_mine']:.0f} ({f_mine:.0f}) | "
              f"{r['t_tl'] / r['t_mine']:.1f}x ({f_tl / f_mine:.1f}x) | {r['diff']:.0e} (of {r['scale']:.0e}) | "
              f"{r['mem_tl']:.0f} / {r['mem_mine']:.0f} ({ratio(r['mem_tl'])} / {ratio(r['mem_mine'])}) |")
    print()
    heads = min(args.heads, cfg.n_heads)
    print(f"TL: timed on {args.tl_cells} random cells per row (one full forward of all pairs per cell) plus "
          "its clean cache and unpatched corrupt run, extrapolated linearly to all cells; max abs diff "
          "is over those cells (in parentheses: the largest |score| there).")
    if "head" in args.sites and heads < cfg.n_heads:
        print(f"mechedit heads: ran heads 0-{heads - 1} of every layer, time scaled by {cfg.n_heads}/{heads} "
              "(its rows are cells x pairs, batched; the two reference runs are scaled too).")
    print("(forwards): the time in units of a plain forward of the corrupt prompts timed just before and "
          "after the tool, which cancels slow drifts in the machine's load.")
    print(f"Peak memory: growth of the resident set's peak (VmHWM, reset through /proc/self/clear_refs) over "
          f"the resident set before, MiB; a plain forward of the {args.pairs} corrupt prompts grows it by "
          f"{plain:.0f} MiB. glibc mmap threshold 64 KiB: {'set' if malloc_ok else 'NOT set (not glibc?)'}.")


if __name__ == "__main__":
    main()
