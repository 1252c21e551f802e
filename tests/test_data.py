"""The CounterFact / known_1000 loaders."""

from __future__ import annotations

import json

import pytest

from mechedit.data import DataFormatError, load_counterfact, load_known

# ---------------------------------------------------------------------------------------------
# known_1000 (the real file in ../shared/data)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def known(shared_data):
    return load_known(shared_data / "known_1000" / "known_1000.json")


def test_known_1000_loads_every_record(known):
    assert len(known) == 1209
    assert [f.record_id for f in known] == list(range(1209))
    for fact in known:
        start, end = fact.subject_span
        assert fact.prompt[start:end] == fact.subject


@pytest.mark.parametrize(
    ("known_id", "subject", "prompt", "attribute", "relation_id", "span"),
    [
        (
            0,
            "Vinson Massif",
            "Vinson Massif is located in the continent of",
            "Antarctica",
            "P30",
            (0, 13),
        ),
        (1, "Beats Music", "Beats Music is owned by", "Apple", "P127", (0, 11)),
        (
            7,
            "Marshall Islands",
            "In Marshall Islands, the language spoken is a mixture of",
            "English",
            "P37",
            (3, 19),
        ),
        (
            500,
            "Weta Digital",
            "The headquarter of Weta Digital is in",
            "Wellington",
            "P159",
            (19, 31),
        ),
        (1208, "Ballers", "Ballers premieres on", "HBO", "P449", (0, 7)),
    ],
)
def test_known_1000_spot_checks(known, known_id, subject, prompt, attribute, relation_id, span):
    fact = known[known_id]
    assert fact.record_id == known_id
    assert fact.subject == subject
    assert fact.prompt == prompt
    assert fact.relation_id == relation_id
    assert fact.subject_span == span
    assert fact.target == attribute
    assert fact.target_new is None and fact.candidates is None


def test_known_1000_targets_match_the_raw_file(known, shared_data):
    raw = json.loads((shared_data / "known_1000" / "known_1000.json").read_text())
    assert [f.target for f in known] == [r["attribute"] for r in raw]
    assert [f.prompt for f in known] == [r["prompt"] for r in raw]


def test_known_limit(shared_data):
    facts = load_known(shared_data / "known_1000" / "known_1000.json", limit=3)
    assert [f.subject for f in facts] == ["Vinson Massif", "Beats Music", "Audible.com"]


KNOWN_RECORD = {
    "known_id": 4,
    "subject": "Paris",
    "attribute": "France",
    "template": "{} is the capital of",
    "prompt": "Paris is the capital of",
    "relation_id": "P1376",
    "some/model-flag": True,
}


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"attribute": None}, "attribute", "missing"),
        ({"subject": 5}, "subject", "non-empty string"),
        ({"prompt": ""}, "prompt", "non-empty string"),
        ({"subject": "Lyon"}, "subject", "does not occur in prompt"),
    ],
)
def test_known_malformed_record_names_index_and_field(tmp_path, change, field, problem):
    bad = {**KNOWN_RECORD, **change}
    path = tmp_path / "known.json"
    path.write_text(json.dumps([KNOWN_RECORD, KNOWN_RECORD, bad]))
    with pytest.raises(DataFormatError) as info:
        load_known(path)
    message = str(info.value)
    assert "record 2" in message and "known_id=4" in message
    assert f"'{field}'" in message and problem in message


def test_known_missing_key_and_non_object(tmp_path):
    record = {k: v for k, v in KNOWN_RECORD.items() if k != "relation_id"}
    with pytest.raises(DataFormatError, match=r"record 0 .*'relation_id' is missing"):
        load_known([record])
    with pytest.raises(DataFormatError, match="record 1: expected an object"):
        load_known([KNOWN_RECORD, ["not", "a", "dict"]])


def test_known_reads_jsonl_csv_and_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame([KNOWN_RECORD, {**KNOWN_RECORD, "known_id": 5}])
    frame.to_json(tmp_path / "k.jsonl", orient="records", lines=True)
    frame.to_csv(tmp_path / "k.csv", index=False)
    frame.to_parquet(tmp_path / "k.parquet")
    for name in ("k.jsonl", "k.csv", "k.parquet"):
        facts = load_known(tmp_path / name)
        assert [f.record_id for f in facts] == [4, 5]
        assert facts[0].target == "France" and facts[0].subject_span == (0, 5)


# ---------------------------------------------------------------------------------------------
# CounterFact format (a fixture file in ROME's shape)
# ---------------------------------------------------------------------------------------------


def counterfact_records():
    return [
        {
            "case_id": 0,
            "pararel_idx": 2796,  # an extra key, as in ROME's file: ignored
            "requested_rewrite": {
                "prompt": "The mother tongue of {} is",
                "relation_id": "P103",
                "target_new": {"str": "English", "id": "Q1860"},
                "target_true": {"str": "French", "id": "Q150"},
                "subject": "Danielle Darrieux",
            },
            "paraphrase_prompts": [
                "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
                "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
            ],
            "neighborhood_prompts": [
                "The mother tongue of Léon Blum is",
                "The native language of Montesquieu is",
            ],
            "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
            "generation_prompts": ["Danielle Darrieux's mother tongue is"],
        },
        {
            "case_id": 1,
            "requested_rewrite": {
                "prompt": "{}, the capital city of",
                "relation_id": "P1376",
                "target_new": {"str": "Sweden", "id": "Q34"},
                "target_true": {"str": "Finland", "id": "Q33"},
                "subject": "Helsinki",
            },
            "paraphrase_prompts": ["He was born in Helsinki. Helsinki is the capital of"],
            "neighborhood_prompts": ["Tampere is a city in"],
            "attribute_prompts": [],
            "generation_prompts": [],
        },
    ]


@pytest.fixture
def counterfact_file(tmp_path):
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(counterfact_records(), ensure_ascii=False))
    return path


def test_counterfact_rewrite_round_trips(counterfact_file):
    facts = load_counterfact(counterfact_file)
    records = counterfact_records()
    assert len(facts) == len(records)
    for fact, record in zip(facts, records, strict=True):
        rw = record["requested_rewrite"]
        assert fact.prompt == rw["prompt"].format(rw["subject"])
        assert fact.subject == rw["subject"]
        start, end = fact.subject_span
        assert fact.prompt[start:end] == rw["subject"]
        assert start == rw["prompt"].index("{}")
        assert fact.target == rw["target_true"]["str"]
        assert fact.target_new == rw["target_new"]["str"]
        assert fact.candidates == (rw["target_true"]["str"], rw["target_new"]["str"])
        assert fact.answer_index == 0
        assert fact.relation_id == rw["relation_id"]
        assert fact.record_id == record["case_id"]
    assert facts[0].prompt == "The mother tongue of Danielle Darrieux is"
    assert facts[0].subject_span == (21, 38)


def test_counterfact_paraphrase_and_neighbourhood_prompts(counterfact_file):
    para = load_counterfact(counterfact_file, kind="paraphrase")
    assert [f.prompt for f in para] == [
        p for r in counterfact_records() for p in r["paraphrase_prompts"]
    ]
    assert [f.record_id for f in para] == [0, 0, 1]
    # the first occurrence of the subject (both paraphrases of record 1 mention Helsinki twice)
    assert para[2].subject_span == (15, 23)
    assert all(f.target_new is not None for f in para)

    for spelling in ("neighborhood", "neighbourhood"):
        near = load_counterfact(counterfact_file, kind=spelling)
        assert [f.prompt for f in near] == [
            p for r in counterfact_records() for p in r["neighborhood_prompts"]
        ]
        assert all(f.subject is None and f.subject_span is None for f in near)
        assert near[0].target == "French" and near[0].target_new == "English"


def test_counterfact_jsonl_and_in_memory_records(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in counterfact_records()))
    from_file = load_counterfact(path)
    assert from_file == load_counterfact(counterfact_records())
    assert load_counterfact(path, limit=1) == from_file[:1]


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [
        (
            lambda r: r["requested_rewrite"]["target_new"].pop("str"),
            "requested_rewrite.target_new.str",
            "missing",
        ),
        (
            lambda r: r["requested_rewrite"].pop("target_true"),
            "requested_rewrite.target_true.str",
            "missing",
        ),
        (
            lambda r: r["requested_rewrite"].update(subject=7),
            "requested_rewrite.subject",
            "non-empty string",
        ),
        (
            lambda r: r["requested_rewrite"].update(prompt="no slot"),
            "requested_rewrite.prompt",
            "exactly once",
        ),
        (lambda r: r.pop("requested_rewrite"), "requested_rewrite.prompt", "missing"),
        (
            lambda r: r["requested_rewrite"]["target_new"].update(str="Finland"),
            "requested_rewrite",
            "target_new equals target",
        ),
    ],
)
def test_counterfact_malformed_record_names_index_and_field(tmp_path, edit, field, problem):
    records = counterfact_records()
    edit(records[1])
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataFormatError) as info:
        load_counterfact(path)
    message = str(info.value)
    assert "record 1 (case_id=1)" in message
    assert f"'{field}'" in message and problem in message


def test_counterfact_bad_paraphrase_names_the_prompt():
    records = counterfact_records()
    records[1]["paraphrase_prompts"] = ["ok Helsinki is", "Espoo is near"]
    with pytest.raises(
        DataFormatError, match=r"record 1 \(case_id=1\): field 'paraphrase_prompts\[1\]'"
    ):
        load_counterfact(records, kind="paraphrase")
    records[1]["paraphrase_prompts"] = "Helsinki is"
    with pytest.raises(DataFormatError, match="'paraphrase_prompts' must be a list of strings"):
        load_counterfact(records, kind="paraphrase")
    # the rewrite prompts do not need the paraphrases, so a bad paraphrase is no error there
    assert len(load_counterfact(records)) == 2


def test_counterfact_unknown_kind(counterfact_file):
    with pytest.raises(ValueError, match="kind must be one of"):
        load_counterfact(counterfact_file, kind="attribute")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such data file"):
        load_known(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="No such data file"):
        load_counterfact("./data/counterfact.json")


def test_unreadable_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"case_id": 0,')
    with pytest.raises(DataFormatError, match="could not read"):
        load_counterfact(broken)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataFormatError, match="holds no records"):
        load_known(empty)
    pickled = tmp_path / "facts.pkl"
    pickled.write_bytes(b"\x80\x04N.")
    with pytest.raises(DataFormatError, match="never read"):
        load_known(pickled)
    with pytest.raises(DataFormatError, match="is a directory"):
        load_known(tmp_path)
