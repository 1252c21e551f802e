"""Gradient x activation neuron attribution vs exact per-neuron zero-ablation (the reference it replaces).

    python bench/bench_neuron_attribution.py            # GPT-2-small shape, random weights
    python bench/bench_neuron_attribution.py --small    # a quick run on a tiny model

Both run in this process on the same model and prompts. Exact ablation is batched (one row per
(neuron, prompt)), timed on a sample of neurons and extrapolated to all of them; attribution scores
every neuron of every layer in one forward and one backward pass per prompt batch. The table also
gives how well the first-order scores rank the sampled neurons' exact effects (Spearman).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import mechedit
from mechedit.locate import NeuronAttributionConfig, neuron_attribution
from mechedit.metrics import target_logprob
from mechedit.prompts import FactPrompt
from mechedit.tokens import tokenize_facts
from mechedit.zoo import random_gpt2_checkpoint


def exact_drops(model, facts, layer: int, neurons: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Exact mean drop in target log-prob when each of ``neurons`` (of ``layer``) is zeroed alone."""
    batch = tokenize_facts(model, facts)
    n_prompts = batch.tokens.shape[0]
    name = f"blocks.{layer}.mlp.hook_post"
    with torch.no_grad():
        base = target_logprob(model(batch.tokens), batch.target_ids, batch.last_positions).mean()
        out = []
        for start in range(0, len(neurons), chunk):
            idx = neurons[start : start + chunk]
            rows = idx.repeat_interleave(n_prompts)  # the neuron each row zeroes

            def zero(act, hook, rows=rows):
                act = act.clone()
                act[torch.arange(len(rows)), :, rows] = 0.0
                return act

            tokens = batch.tokens.repeat(len(idx), 1)
            logits = model.run_with_hooks(tokens, fwd_hooks=[(name, zero)])
            lp = target_logprob(logits, batch.target_ids.repeat(len(idx)), batch.last_positions.repeat(len(idx)))
            out.append(base - lp.view(len(idx), n_prompts).mean(1))
    return torch.cat(out)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model for a quick check")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--sample", type=int, default=64, help="neurons timed exactly")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_embd=64, n_head=4) if args.small else dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024)
    with tempfile.TemporaryDirectory() as tmp:
        model = mechedit.load(random_gpt2_checkpoint(tmp, vocab_words=1000 if args.small else 50252, **shape))
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 1000, (args.prompts, args.tokens), generator=g)
    facts = [FactPrompt(prompt=" ".join(f"w{i}" for i in row[:-1].tolist()), target=f"w{row[-1].item()}") for row in words]
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    total = n_layers * d_mlp

    neuron_attribution(model, facts[:1], progress=False)  # warm-up
    t = time.perf_counter()
    scores = neuron_attribution(model, facts, config=NeuronAttributionConfig(retain_weight=0), progress=False)
    t_attr = time.perf_counter() - t

    layer = n_layers // 2
    sample = torch.randperm(d_mlp, generator=g)[: args.sample]
    exact_drops(model, facts, layer, sample[:2])  # warm-up
    t = time.perf_counter()
    exact = exact_drops(model, facts, layer, sample)
    t_exact = time.perf_counter() - t
    t_exact_all = t_exact / len(sample) * total

    rho = spearman(scores.values[layer, sample], exact)
    print(f"model: {n_layers} layers x {d_mlp} neurons = {total} neurons; {args.prompts} prompts x {args.tokens} tokens; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'method':<42}{'neurons':>9}{'seconds':>11}{'s, all neurons':>16}{'ratio':>9}")
    print(f"{'exact zero-ablation, batched (reference)':<42}{len(sample):>9}{t_exact:>11.2f}{t_exact_all:>16.1f}{1.0:>9.1f}")
    print(f"{'gradient x activation (mechedit)':<42}{total:>9}{t_attr:>11.2f}{t_attr:>16.2f}{t_exact_all / t_attr:>9.0f}x")
    print(f"Spearman rank correlation, attribution vs exact on the {len(sample)} sampled neurons of layer {layer}: {rho:.3f}")


if __name__ == "__main__":
    main()
