"""DEPN's Table 1 on the fact worlds: DEPN and its controls, before and after, one row per method.

    PYTHONPATH=. python bench/depn_table.py [--models factworld factworld-mlm] [--secrets 12] [--top-z 25]

Secrets: every 5th of the 60 phone numbers (2, 4 and 8 training copies mixed). IG with
``--steps`` (6 by default, DEPN's grid), ``threshold`` 0.1, ``top_z`` neurons per method.
Exposure is DEPN's lexicographic rank (exact, one pass per secret). Utility: perplexity on 50
held-out texts (pseudo-perplexity on the masked LM) and accuracy on 300 trained facts. Rows and
columns: ``mechedit.evaluate.depn_controls``.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

import mechedit
from mechedit import zoo
from mechedit.evaluate import depn_controls
from mechedit.models import is_masked_lm
from mechedit.prompts import FactPrompt
from mechedit.tokens import get_tokenizer


def facts_for(model, world, n: int) -> list[FactPrompt]:
    """Non-private fact prompts (train template 0); on a masked LM with the answer masked."""
    suffix = f" {get_tokenizer(model).mask_token} ." if is_masked_lm(model) else ""
    return [
        FactPrompt(prompt=zoo.world.fill(world.relation[f.relation_id].train_templates[0], f.subject) + suffix, target=f.value)
        for f in world.facts[:n]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["factworld", "factworld-mlm"])
    parser.add_argument("--every", type=int, default=5, help="take every n-th phone number")
    parser.add_argument("--top-z", type=int, nargs="+", default=[25])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threshold", type=float, default=0.1)
    args = parser.parse_args()
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    world = zoo.load_world("factworld")
    phones = [r for r in world.private if r.kind == "phone"][:: args.every]
    for name in args.models:
        model = mechedit.load(name)
        for z in args.top_z:
            start = time.perf_counter()
            table = depn_controls(
                model, phones, top_z=z, threshold=args.threshold, steps=args.steps,
                heldout_texts=list(world.text_heldout[:50]), facts=facts_for(model, world, 300),
            )
            print(f"\n{name}: {len(phones)} phone numbers, top_z={z}, t={args.threshold}, "
                  f"{args.steps} IG steps ({time.perf_counter() - start:.0f} s)")
            print(table.round(3).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
