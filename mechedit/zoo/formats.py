"""Export a fact world in the field's standard file formats, so one set of loaders serves both.

``export_world(world, out_dir)`` writes:

* ``counterfact.json`` - ROME's CounterFact records: ``requested_rewrite`` (prompt with ``{}``,
  subject, relation_id, target_true, target_new), ``paraphrase_prompts`` (the held-out templates),
  ``neighborhood_prompts`` (other people with the same true value), ``attribute_prompts`` (people
  whose true value is the new target), ``generation_prompts``;
* ``known.json`` - ROME's known_1000 records (known_id, subject, attribute, template, prompt,
  relation_id), one per fact, in the relation's first training template;
* ``planted.json`` - the planted facts in the same known_1000 format;
* ``private.jsonl`` - one secret per line: subject, kind, prefix, secret, repetitions, plus
  ``heldout_prefix`` (a paraphrased extraction prompt) where the kind has one;
* ``bias_pairs.csv`` - CrowS-Pairs columns (sent_more, sent_less, stereo_antistereo, bias_type)
  plus occupation, p_more and split (train / heldout templates);
* ``mc.jsonl`` - four-option questions (prompt, options, answer letter, split);
* ``text_heldout.txt`` - the held-out general text, one sentence per line.

Files are written with sorted keys and fixed ordering: the same world gives byte-identical files.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from mechedit.zoo.world import (
    BIAS_TEMPLATES_HELDOUT,
    BIAS_TEMPLATES_TRAIN,
    EMAIL_TEMPLATES_HELDOUT,
    PHONE_TEMPLATES_HELDOUT,
    World,
    fill,
)

FILES = (
    "counterfact.json",
    "known.json",
    "planted.json",
    "private.jsonl",
    "bias_pairs.csv",
    "mc.jsonl",
    "text_heldout.txt",
)
MAX_NEIGHBOURS = 10


def _dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _dump_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def counterfact_records(world: World, *, seed: int = 0) -> list[dict]:
    """One CounterFact record per fact; ``target_new`` is another value of the relation, drawn by ``seed``."""
    rng = random.Random(f"counterfact-{world.config.seed}-{seed}")
    records = []
    for case_id, fact in enumerate(world.facts):
        rel = world.relation[fact.relation_id]
        template = rel.train_templates[0]
        new = rng.choice([v for v in rel.values if v != fact.value])
        neighbours = world.neighbours(fact, limit=MAX_NEIGHBOURS)
        attribute_people = [p.name for p in world.people if p.facts[rel.id] == new][:MAX_NEIGHBOURS]
        records.append(
            {
                "case_id": case_id,
                "requested_rewrite": {
                    "prompt": template,
                    "subject": fact.subject,
                    "relation_id": rel.id,
                    "target_true": {"str": fact.value, "id": fact.value},
                    "target_new": {"str": new, "id": new},
                },
                "paraphrase_prompts": [fill(t, fact.subject) for t in rel.heldout_templates],
                "neighborhood_prompts": [fill(template, n.subject) for n in neighbours],
                "attribute_prompts": [fill(template, name) for name in attribute_people],
                "generation_prompts": [fill(t, fact.subject) for t in rel.train_templates[1:3]],
            }
        )
    return records


def known_records(world: World, facts) -> list[dict]:
    """known_1000-format records for ``facts``, each in its relation's first training template."""
    out = []
    for i, fact in enumerate(facts):
        template = world.relation[fact.relation_id].train_templates[0]
        out.append(
            {
                "known_id": i,
                "subject": fact.subject,
                "attribute": fact.value,
                "template": template,
                "prompt": fill(template, fact.subject),
                "relation_id": fact.relation_id,
            }
        )
    return out


def private_records(world: World) -> list[dict]:
    heldout = {"phone": PHONE_TEMPLATES_HELDOUT[0], "email": EMAIL_TEMPLATES_HELDOUT[0]}
    rows = []
    for rec in world.private:
        row = {
            "subject": rec.subject,
            "kind": rec.kind,
            "prefix": rec.prefix,
            "secret": rec.secret,
            "repetitions": rec.repetitions,
        }
        if rec.kind in heldout:
            row["heldout_prefix"] = fill(heldout[rec.kind], rec.subject)
        rows.append(row)
    return rows


def export_world(world: World, out_dir: str | Path) -> list[Path]:
    """Write every export file of ``world`` to ``out_dir`` (created if needed); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _dump_json(out / "counterfact.json", counterfact_records(world))
    _dump_json(out / "known.json", known_records(world, world.facts))
    _dump_json(out / "planted.json", known_records(world, world.planted_facts))
    _dump_jsonl(out / "private.jsonl", private_records(world))
    with open(out / "bias_pairs.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["", "sent_more", "sent_less", "stereo_antistereo", "bias_type", "occupation", "p_more", "split"])
        index = 0
        for split, templates in (("train", BIAS_TEMPLATES_TRAIN), ("heldout", BIAS_TEMPLATES_HELDOUT)):
            for more, less, bias in world.bias_pairs(templates=templates):
                writer.writerow([index, more, less, "stereo", "gender", bias.occupation, bias.p_more, split])
                index += 1
    mc = world.mc_questions("train") + world.mc_questions("heldout")
    _dump_jsonl(
        out / "mc.jsonl",
        [
            {"subject": q.subject, "relation_id": q.relation_id, "prompt": q.prompt, "options": list(q.options), "answer": q.answer, "split": q.split}
            for q in mc
        ],
    )
    (out / "text_heldout.txt").write_text("".join(s + "\n" for s in world.text_heldout), encoding="utf-8")
    return [out / name for name in FILES]
