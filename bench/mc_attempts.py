"""Experiments on a fact-world recipe that answers multiple choice (MC) from stored facts (issue 7).

One run: train a fact-world model under a recipe given on the command line, measure MC on
held-out and MC-trained people, facts on training and held-out templates and induction copying
after every ``--every`` epochs, append a JSON line per measurement to ``OUT/log.jsonl`` and stop
when ``--stop-after`` minutes have passed (the trend is clear long before a full run ends).

    PYTHONPATH=$PWD python bench/mc_attempts.py --out /tmp/mc_runs/a --people 60 \\
        --layout options-first --mc-per-fact 4 --warmup-induction 600 --induction-fraction 0.1

``--evaluate OUT/model`` prints a saved attempt's final figures instead: MC (mean of 5 question
seeds) and its controls, lookup drills, induction, facts.

Results of every attempt are tabled in ``mechedit/zoo/MC_ATTEMPTS.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from mechedit.zoo.measure import Encoder, fact_accuracy, mc_accuracy, mc_controls, next_token_logits
from mechedit.zoo.train import (
    ModelShape,
    TrainConfig,
    induction_accuracy,
    lookup_drills,
    train_factworld,
)
from mechedit.zoo.world import MC_LETTERS, WorldConfig, fill, load_occupations


@torch.no_grad()
def lens_recall(model, world, enc: Encoder, prompts: list[str], facts) -> list[float]:
    """Per residual stream before each block and after the last (``n_layer + 1`` entries): the share of
    prompts whose true value is the top value of its relation through the logit lens (final
    LayerNorm, unembedding) at the prompt's last position - where the recalled value is readable."""
    ids, lengths = enc.batch(prompts)
    hidden = model(ids, output_hidden_states=True).hidden_states
    rows = torch.arange(len(ids))
    allowed = torch.zeros(len(facts), model.config.vocab_size, dtype=torch.bool)
    for i, f in enumerate(facts):  # each prompt's candidates: its relation's values
        allowed[i, [enc.vocab[v] for v in world.relation[f.relation_id].values]] = True
    gold = torch.tensor([enc.vocab[f.value] for f in facts])
    out = []
    for k, h in enumerate(hidden):
        last = h[rows, lengths - 1]
        logits = model.lm_head(last if k == len(hidden) - 1 else model.transformer.ln_f(last))
        pred = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
        out.append(round((pred == gold).float().mean().item(), 3))
    return out


@torch.no_grad()
def mechanism(model, world, tokenizer) -> dict:
    """The two halves of an MC answer, apart: the value recalled inside an MC prompt (``lens_mc``,
    per layer; ``lens_facts`` the same after the bare template) and the letter found for a value
    named (``drill``, top-1 over A-D on 400 fresh lookup drills; chance 0.25)."""
    enc = Encoder(tokenizer)
    rows = [r.split() for r in lookup_drills(world, 400, random.Random(99))]
    gold = torch.tensor([MC_LETTERS.index(r[-1]) for r in rows])
    letters = torch.tensor([enc.vocab[x] for x in MC_LETTERS])
    drill_logits = next_token_logits(model, enc, [" ".join(r[:-1]) for r in rows])[:, letters]
    questions = world.mc_questions("heldout", seed=0)
    facts = [next(f for f in world.facts if f.subject == q.subject and f.relation_id == q.relation_id) for q in questions]
    templated = [fill(world.relation[f.relation_id].train_templates[0], f.subject) for f in facts]
    return {
        "lens_facts": lens_recall(model, world, enc, templated, facts),
        "lens_mc": lens_recall(model, world, enc, [q.prompt for q in questions], facts),
        "drill": (drill_logits.argmax(-1) == gold).float().mean().item(),
    }


def evaluate(folder: str) -> dict:
    """Final figures of a saved attempt (fractions in [0, 1]; entropy in bits)."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from mechedit.zoo.metadata import read_metadata, world_from_metadata

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    world = world_from_metadata(read_metadata(folder))
    return {
        **mechanism(model, world, tok),
        "induction": induction_accuracy(model, tok, world.vocabulary()),
        "mc_heldout": sum(mc_accuracy(model, world, tok, "heldout", seed=s) for s in range(5)) / 5,
        "mc_train": sum(mc_accuracy(model, world, tok, "train", seed=s) for s in range(5)) / 5,
        "facts_train": fact_accuracy(model, world, tok, world.facts, "train"),
        "facts_heldout": fact_accuracy(model, world, tok, world.facts, "heldout"),
        "controls": mc_controls(model, world, tok, "heldout"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--evaluate", metavar="MODEL_DIR", help="print a saved attempt's final figures and exit")
    ap.add_argument("--people", type=int, default=240)
    ap.add_argument("--small-extras", action="store_true", help="shrink private records, bias and general text")
    ap.add_argument("--tiny-extras", action="store_true", help="shrink them further (for a signal within minutes)")
    ap.add_argument("--layout", default="options-first")
    ap.add_argument("--mc-per-fact", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-induction", type=int, default=0)
    ap.add_argument("--induction-fraction", type=float, default=0.0)
    ap.add_argument("--lookup-drills", type=float, default=0.0, help="fraction of lookup-drill rows per epoch")
    ap.add_argument("--lens-layer", type=int, help="add the logit-lens loss at the residual stream before this block")
    ap.add_argument("--lens-weight", type=float, default=1.0)
    ap.add_argument("--pack", action="store_true", help="lay sentences end to end in 64-token rows")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--every", type=int, default=2, help="measure MC every this many epochs")
    ap.add_argument("--stop-after", type=float, default=30.0, help="minutes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.evaluate:
        print(json.dumps(evaluate(args.evaluate)))
        return
    if not args.out:
        ap.error("--out is required to train")

    extras = dict(n_private=10, bias_sentences_per_occupation=10, n_text_train=500, n_text_heldout=100) if args.small_extras else {}
    if args.tiny_extras:
        extras = dict(n_private=6, bias_sentences_per_occupation=4, n_text_train=100, n_text_heldout=50)
    wc = WorldConfig(seed=args.seed, n_people=args.people, mc_layout=args.layout, mc_per_fact=args.mc_per_fact, **extras)
    shape = ModelShape(n_layer=args.layers, n_embd=args.d_model, n_head=args.heads, n_inner=4 * args.d_model)
    tc = TrainConfig(
        epochs=args.epochs, lr=args.lr, seed=args.seed, threads=1, shape=shape,
        warmup_induction_steps=args.warmup_induction, induction_fraction=args.induction_fraction,
        lookup_drill_fraction=args.lookup_drills, lens_layer=args.lens_layer, lens_weight=args.lens_weight,
        pack=args.pack, batch_size=args.batch_size,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args)))
    log = out / "log.jsonl"
    start = time.time()

    def on_epoch(model, world, tokenizer, entry) -> bool:
        entry["minutes"] = round((time.time() - start) / 60, 2)
        if entry["epoch"] % args.every == args.every - 1:
            entry["mc_heldout"] = mc_accuracy(model, world, tokenizer, "heldout", seed=7)
            entry["mc_train"] = mc_accuracy(model, world, tokenizer, "train", seed=7)
            entry["facts_train"] = fact_accuracy(model, world, tokenizer, world.facts, "train")
            entry["facts_heldout"] = fact_accuracy(model, world, tokenizer, world.facts, "heldout")
            entry.update(mechanism(model, world, tokenizer))
        with log.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return entry["minutes"] > args.stop_after

    torch.set_num_threads(1)
    train_factworld(out / "model", world_config=wc, train_config=tc, occupations=load_occupations(), progress=False, measure=False, on_epoch=on_epoch)
    with log.open("a") as fh:
        fh.write(json.dumps({"done": True, "minutes": round((time.time() - start) / 60, 2)}) + "\n")


if __name__ == "__main__":
    main()
