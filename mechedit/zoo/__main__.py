"""``python -m mechedit.zoo``: train, export and describe the fact-world checkpoints.

    python -m mechedit.zoo train factworld            # ~21 min on 2 CPU cores, deterministic
    python -m mechedit.zoo train factworld-planted            # a few minutes, from factworld
    python -m mechedit.zoo train factworld-planted-subject    # the same, stored as subject enrichment
    python -m mechedit.zoo train factworld-planted --layer 4 --out DIR   # ground truth at another layer
    python -m mechedit.zoo train factworld-mlm        # BERT (masked LM) on the same world
    python -m mechedit.zoo train factworld --config tiny.json --out DIR   # other sizes (mechedit.zoo.build)
    python -m mechedit.zoo export factworld OUT_DIR   # counterfact.json, known.json, ...
    python -m mechedit.zoo measure factworld          # re-measure the figures into metadata.json
    python -m mechedit.zoo ground-truth factworld-planted   # re-measure where the planted MLP acts
    python -m mechedit.zoo card                       # rewrite MODEL_CARD.md from the metadata
    python -m mechedit.zoo show [NAME]                # the card's figures and a few prompts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> None:
    from mechedit.cli.world import train_from_args
    from mechedit.zoo import CHECKPOINTS
    from mechedit.zoo.card import write_card

    default = args.name
    if args.name.startswith("factworld-planted") and args.at:  # --at decides which shipped model
        default = "factworld-planted" if args.at == "all" else "factworld-planted-subject"
    out = Path(args.out) if args.out else CHECKPOINTS / default
    meta = train_from_args(args, out, progress=True)
    print(json.dumps(meta.get("metrics", {}), indent=2))
    if not args.out:
        print(f"model card: {write_card()}")


def _show(args: argparse.Namespace) -> None:
    import mechedit
    from mechedit.zoo import load_world, metadata
    from mechedit.zoo.measure import Encoder, next_token_logits
    from mechedit.zoo.mlm import fact_rows, is_mlm, mask_logits
    from mechedit.zoo.world import fill

    meta = metadata(args.name)
    print(f"{meta['name']}: {meta.get('description', '')}")
    print(json.dumps(meta.get("metrics", {}), indent=2))
    model = mechedit.load(args.name)
    world = load_world(args.name)
    enc = Encoder(model.tokenizer)
    facts = world.facts[: args.n]
    if is_mlm(meta):
        rows = fact_rows(world, facts, "heldout")[:: len(world.relations[0].heldout)]
        predicted = mask_logits(model, model.tokenizer, rows).argmax(-1)
        vocab = {i: w for w, i in enc.vocab.items()}
        print("\nheld-out paraphrases, value masked (prompt -> model's fill-in / truth):")
        for row, pred in zip(rows, predicted.tolist()):
            print(f"  {row.text} -> {vocab[pred]} / {row.answers[0]}")
        return
    prompts = [fill(world.relation[f.relation_id].heldout_templates[0], f.subject) for f in facts]
    predicted = next_token_logits(model, enc, prompts).argmax(-1)
    vocab = {i: w for w, i in enc.vocab.items()}
    print("\nheld-out paraphrases (prompt -> model's answer / truth):")
    for prompt, pred, fact in zip(prompts, predicted.tolist(), facts):
        print(f"  {prompt} -> {vocab[pred]} / {fact.value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mechedit.zoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a zoo checkpoint (writes into the package unless --out)")
    from mechedit.cli.world import add_train_arguments  # the options `mechedit world train` has too

    add_train_arguments(t, out_required=False)
    e = sub.add_parser("export", help="write a zoo world in CounterFact / known_1000 / CrowS-Pairs formats")
    e.add_argument("name")
    e.add_argument("out_dir")
    sub.add_parser("card", help="rewrite MODEL_CARD.md from the checkpoints' metadata")
    m = sub.add_parser("measure", help="re-measure a checkpoint's figures and rewrite its metadata.json")
    m.add_argument("name", help="a zoo name or a checkpoint folder")
    g = sub.add_parser("ground-truth", help="re-measure where a planted model's MLP acts (mlp_out patching) into its metadata.json")
    g.add_argument("name", help="a planted zoo name or checkpoint folder")
    s = sub.add_parser("show", help="print a zoo model's figures and a few of its answers")
    s.add_argument("name", nargs="?", default="factworld")
    s.add_argument("-n", type=int, default=8, help="how many held-out prompts to show")
    args = parser.parse_args(argv)
    if args.command == "train":
        _train(args)
    elif args.command == "export":
        from mechedit.zoo import export

        for path in export(args.name, args.out_dir):
            print(path)
    elif args.command == "measure":
        from mechedit.zoo import NAMES, checkpoint_dir
        from mechedit.zoo import metadata as read_meta
        from mechedit.zoo.mlm import is_mlm
        from mechedit.zoo.mlm import remeasure as remeasure_mlm
        from mechedit.zoo.train import remeasure

        folder = checkpoint_dir(args.name) if args.name in NAMES else Path(args.name)
        measure = remeasure_mlm if is_mlm(read_meta(folder)) else remeasure
        print(json.dumps(measure(folder)["metrics"], indent=2))
    elif args.command == "ground-truth":
        from mechedit.zoo import NAMES, checkpoint_dir
        from mechedit.zoo.ground_truth import KEY, record_ground_truth

        folder = checkpoint_dir(args.name) if args.name in NAMES else Path(args.name)
        print(json.dumps(record_ground_truth(folder)[KEY], indent=2))
    elif args.command == "card":
        from mechedit.zoo.card import write_card

        print(write_card())
    else:
        _show(args)


if __name__ == "__main__":
    sys.exit(main())
