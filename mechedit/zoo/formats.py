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

``export_records(world, out_dir, fmt)`` (``mechedit world export``) writes instead the record files
the command line's ``--data`` reads, as JSON Lines, JSON or CSV: ``facts`` and ``paraphrases`` (one
row per fact and training / held-out template), ``planted``, ``private`` and ``bias_pairs.csv``.
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


def new_targets(world: World, facts, *, seed: int = 0, stream: str = "counterfact") -> list[str]:
    """A seeded ``target_new`` per fact: another value of its relation (CounterFact's rewrite target).

    ``stream`` names the random stream; ``world.facts`` with the default stream give the targets
    of ``counterfact.json``.
    """
    rng = random.Random(f"{stream}-{world.config.seed}-{seed}")
    return [rng.choice([v for v in world.relation[f.relation_id].values if v != f.value]) for f in facts]


def counterfact_records(world: World, *, seed: int = 0) -> list[dict]:
    """One CounterFact record per fact; ``target_new`` is another value of the relation, drawn by ``seed``."""
    records = []
    for case_id, (fact, new) in enumerate(zip(world.facts, new_targets(world, world.facts, seed=seed))):
        rel = world.relation[fact.relation_id]
        template = rel.train_templates[0]
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


def bias_rows(world: World) -> list[dict]:
    """CrowS-Pairs rows of the planted bias: each occupation x bias template, training then held out.

    Columns: ``""`` (row index, as in CrowS-Pairs), ``sent_more`` (the favoured pronoun),
    ``sent_less``, ``stereo_antistereo``, ``bias_type``, ``occupation``, ``p_more``, ``split``.
    """
    pairs = [
        (split, *pair)
        for split, templates in (("train", BIAS_TEMPLATES_TRAIN), ("heldout", BIAS_TEMPLATES_HELDOUT))
        for pair in world.bias_pairs(templates=templates)
    ]
    return [
        {"": i, "sent_more": more, "sent_less": less, "stereo_antistereo": "stereo", "bias_type": "gender",
         "occupation": bias.occupation, "p_more": bias.p_more, "split": split}
        for i, (split, more, less, bias) in enumerate(pairs)
    ]


def export_world(world: World, out_dir: str | Path) -> list[Path]:
    """Write every export file of ``world`` to ``out_dir`` (created if needed); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _dump_json(out / "counterfact.json", counterfact_records(world))
    _dump_json(out / "known.json", known_records(world, world.facts))
    _dump_json(out / "planted.json", known_records(world, world.planted_facts))
    _dump_jsonl(out / "private.jsonl", private_records(world))
    _write_rows(out / "bias_pairs.csv", bias_rows(world), "csv")
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


# --- the command line's record files ----------------------------------------------------------------

RECORD_FORMATS = ("jsonl", "json", "csv")


def fact_rows(world: World, facts, *, heldout: bool = False, stream: str = "counterfact") -> list[dict]:
    """One row per fact x template: what ``mechedit locate/edit/eval --data FILE`` reads as facts.

    Fields: ``id`` (row number), ``fact_id`` (index into ``facts``), ``subject``, ``relation_id``,
    ``template`` (index into the relation's ``templates``), ``prompt`` (the template filled, ending
    before the answer), ``target`` (the true value), ``target_new`` (``new_targets``' seeded other
    value) and ``split`` (``train`` or ``heldout`` templates). The training templates give exactly
    the prompts of the selection ``factworld:RELATION``, in the same order.
    """
    rows = []
    for fact_id, (fact, new) in enumerate(zip(facts, new_targets(world, facts, stream=stream))):
        rel = world.relation[fact.relation_id]
        for k, template in enumerate(rel.templates):
            if (k in rel.heldout) != heldout:
                continue
            rows.append({
                "id": len(rows), "fact_id": fact_id, "subject": fact.subject, "relation_id": fact.relation_id,
                "template": k, "prompt": fill(template, fact.subject), "target": fact.value, "target_new": new,
                "split": "heldout" if heldout else "train",
            })
    return rows


def _write_rows(path: Path, rows: list[dict], fmt: str) -> Path:
    from mechedit.artifacts import write_text_atomic

    if fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif fmt == "json":
        text = json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
    else:
        import io

        buf = io.StringIO()
        # every row gets every column (a canary has no heldout_prefix): empty cells read back as null
        columns = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    return write_text_atomic(path, text)


def export_records(world: World, out_dir: str | Path, fmt: str = "jsonl") -> list[Path]:
    """Write the world as the record files the command line's ``--data`` reads; return their paths.

    ``fmt`` (``RECORD_FORMATS``) is the format of ``facts``, ``paraphrases``, ``planted`` (when the
    world has planted people) and ``private`` (``private_records``' fields: ``prefix`` + ``secret``
    is what ``--suite privacy`` and DEPN read); ``bias_pairs.csv`` is always a CrowS-Pairs CSV, the
    one format contrastive pairs are read from. ``facts`` holds every fact in its training
    templates, ``paraphrases`` in its held-out ones (``fact_rows``). Each file is written to a
    temporary name and renamed; the same world gives byte-identical files.
    """
    if fmt not in RECORD_FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(RECORD_FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _write_rows(out / f"facts.{fmt}", fact_rows(world, world.facts), fmt),
        _write_rows(out / f"paraphrases.{fmt}", fact_rows(world, world.facts, heldout=True), fmt),
    ]
    if world.planted:
        paths.append(_write_rows(out / f"planted.{fmt}", fact_rows(world, world.planted_facts, stream="planted"), fmt))
    paths.append(_write_rows(out / f"private.{fmt}", private_records(world), fmt))
    paths.append(_write_rows(out / "bias_pairs.csv", bias_rows(world), "csv"))
    return paths
