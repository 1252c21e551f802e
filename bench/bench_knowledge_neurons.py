"""Knowledge-neuron scores (integrated gradients) vs the ``knowledge-neurons`` library, and DEPN's speed.

    python bench/bench_knowledge_neurons.py            # GPT-2-small shape, random weights
    python bench/bench_knowledge_neurons.py --small    # a quick run on a tiny model

Part 1: the IG score of every MLP neuron of every layer for one prompt (``--tokens`` tokens, BOS
included, a one-token target), m = ``--steps`` points on the library's grid (linspace(0, 1, m)),
post-activation. ``knowledge-neurons`` 0.0.2's ``get_scores`` (batch 20, its default path: one
layer at a time, whole forward passes) runs on a plain Hugging Face GPT-2 loaded from the same
folder, with ``input_ff_attr = "mlp.act"``; mechedit's ``knowledge_neurons`` runs on the bridge,
resumed (default) and with whole forward passes (``method="full"``). Same process, same weights,
same token ids; the scores are compared (largest difference relative to the largest score).
mechedit's time includes its provenance (a hash of the weights) but not the hook check
(``hook_check=False``: a few seconds of short forwards, once per model, that the library has no
counterpart of).

Part 2: ``depn`` (detection + aggregation) over ``--secrets`` private records of the shipped fact
world (phone numbers, e-mail addresses and canaries, every token of each), m = 20, and the
aggregation alone (``depn_select`` on the per-secret scores), in secrets per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import mechedit
from mechedit import zoo
from mechedit.locate import depn_select, knowledge_neurons
from mechedit.zoo.random_model import random_checkpoint


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compare_with_library(args) -> None:
    from knowledge_neurons import KnowledgeNeurons
    from transformers import AutoTokenizer, GPT2LMHeadModel

    shape = (
        dict(n_layer=2, n_embd=64, n_head=4, vocab_words=1000)
        if args.small
        else dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_words=50252)
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(tmp, "gpt2", **shape)
        model = mechedit.load(folder)
        plain = GPT2LMHeadModel.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in torch.randint(0, shape["vocab_words"], (args.tokens,), generator=g).tolist()]
    prompt, target = " ".join(words[:-1]), words[-1]  # BOS + tokens-1 words, predicting one more

    lib = KnowledgeNeurons(plain, tokenizer, model_type="gpt2", device="cpu")
    lib.input_ff_attr = "mlp.act"  # post-activation, as mechedit (the library's GPT-2 default is c_fc)
    # the folder's tokenizer adds no BOS; the bridge prepends it: "<bos> " gives equal token ids
    steps = args.steps
    knowledge_neurons(model, [(prompt, target)], steps=2, hook_check=False, progress=False)  # warm-up
    ours, t_ours = _timed(lambda: knowledge_neurons(model, [(prompt, target)], steps=steps, alpha_grid="linspace", hook_check=False, progress=False))
    full, t_full = _timed(lambda: knowledge_neurons(model, [(prompt, target)], steps=steps, alpha_grid="linspace", method="full", hook_check=False, progress=False))
    theirs, t_lib = _timed(lambda: lib.get_scores("<bos> " + prompt, target, batch_size=20, steps=steps, pbar=False))
    theirs = theirs.detach().float()
    scale = float(theirs.abs().max())

    def rel(x):
        return float((x.values - theirs).abs().max()) / scale

    n_neurons = model.cfg.n_layers * model.cfg.d_mlp
    print(f"\nIG scores of all {n_neurons:,} MLP neurons ({model.cfg.n_layers} layers x {model.cfg.d_mlp}), one prompt of "
          f"{args.tokens} tokens, m = {steps}, vocabulary {model.cfg.d_vocab:,}, {torch.get_num_threads()} thread(s)\n")
    print("| scores | mechedit (s) | knowledge-neurons 0.0.2 (s) | speed-up | max rel diff |")
    print("|---|---:|---:|---:|---:|")
    print(f"| IG, resumed (default) | {t_ours:.2f} | {t_lib:.2f} | {t_lib / t_ours:.1f}x | {rel(ours):.1e} |")
    print(f"| IG, full forwards (`method=\"full\"`) | {t_full:.2f} | {t_lib:.2f} | {t_lib / t_full:.1f}x | {rel(full):.1e} |")


def depn_throughput(args) -> None:
    model, world = mechedit.load("factworld"), zoo.load_world("factworld")
    records = [r for r in world.private if r.repetitions > 0][: args.secrets]
    n_tokens = sum(len(r.secret.split()) for r in records)
    scores, t_detect = _timed(lambda: knowledge_neurons(model, records, steps=args.depn_steps, per_prompt=True, hook_check=False, progress=False))
    _, t_select = _timed(lambda: depn_select(scores, threshold=0.1, top_z=20))
    print(f"\nDEPN on factworld ({model.cfg.n_layers} layers x {model.cfg.d_mlp} neurons): {len(records)} secrets, "
          f"{n_tokens} secret tokens, m = {args.depn_steps}\n")
    print("| step | time (s) | secrets / s |")
    print("|---|---:|---:|")
    print(f"| detect (IG per secret) + aggregate | {t_detect + t_select:.2f} | {len(records) / (t_detect + t_select):.2f} |")
    print(f"| aggregate only (`depn_select`) | {t_select:.4f} | {len(records) / t_select:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model and few secrets, for a quick check")
    parser.add_argument("--tokens", type=int, default=16, help="prompt length incl. BOS")
    parser.add_argument("--steps", type=int, default=20, help="integration points m")
    parser.add_argument("--secrets", type=int, default=None, help="DEPN secrets (default 100; 4 with --small)")
    parser.add_argument("--depn-steps", type=int, default=None, help="m for DEPN (default 20; 4 with --small)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    args.secrets = args.secrets or (4 if args.small else 100)
    args.depn_steps = args.depn_steps or (4 if args.small else 20)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    compare_with_library(args)
    depn_throughput(args)


if __name__ == "__main__":
    main()
