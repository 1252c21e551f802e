"""``--data crows_pairs``: CrowS-Pairs by its hub name reads as the same contrastive pairs as the CSV.

Offline: ``datasets.load_dataset`` is replaced by one that serves rows of the real CSV in the hub's
format (class indices for ``stereo_antistereo`` / ``bias_type``, nested annotations)."""

from __future__ import annotations

import ast
import csv

import pytest

from mechedit.cli.inputs import HUB_CONTRASTIVE, crows_pairs_from_hub, read_contrastive
from mechedit.data_pairs import load_crows_pairs

# the hub dataset's class names, in its order (nyu-mll/crows_pairs features)
BIAS_TYPES = ["race-color", "socioeconomic", "gender", "disability", "nationality", "sexual-orientation",
              "physical-appearance", "religion", "age"]
N = 40


def _hub_dataset(csv_path, n: int):
    """The first ``n`` rows of the CrowS-Pairs CSV as a ``datasets.Dataset`` with the hub's features."""
    import datasets

    with open(csv_path, encoding="utf-8", newline="") as fh:
        rows = [r for _, r in zip(range(n), csv.DictReader(fh), strict=False)]
    features = datasets.Features({
        "id": datasets.Value("int32"),
        "sent_more": datasets.Value("string"),
        "sent_less": datasets.Value("string"),
        "stereo_antistereo": datasets.ClassLabel(names=["stereo", "antistereo"]),
        "bias_type": datasets.ClassLabel(names=BIAS_TYPES),
        "annotations": datasets.Sequence(datasets.Sequence(datasets.ClassLabel(names=BIAS_TYPES))),
        "anon_writer": datasets.Value("string"),
        "anon_annotators": datasets.Sequence(datasets.Value("string")),
    })
    data = {
        "id": [int(r[""]) for r in rows],
        "sent_more": [r["sent_more"] for r in rows],
        "sent_less": [r["sent_less"] for r in rows],
        "stereo_antistereo": [["stereo", "antistereo"].index(r["stereo_antistereo"]) for r in rows],
        "bias_type": [BIAS_TYPES.index(r["bias_type"]) for r in rows],
        "annotations": [[[BIAS_TYPES.index(t) for t in a] for a in ast.literal_eval(r["annotations"])] for r in rows],
        "anon_writer": [r["anon_writer"] for r in rows],
        "anon_annotators": [ast.literal_eval(r["anon_annotators"]) for r in rows],
    }
    return datasets.Dataset.from_dict(data, features=features)


@pytest.fixture
def crows_csv(shared_data):
    return shared_data / "crows_pairs" / "crows_pairs_anonymized.csv"


def _key(pair):
    return pair.advantaged, pair.disadvantaged, pair.group, pair.meta["stereo_antistereo"]


@pytest.mark.parametrize("name", ["crows_pairs", "nyu-mll/crows_pairs"])
def test_a_crows_pairs_hub_name_reads_as_the_csv_does(crows_csv, monkeypatch, name):
    import datasets

    calls = []

    def load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs.get("split")))
        return _hub_dataset(crows_csv, N)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    pairs = read_contrastive(name, limit=30)
    assert calls == [("nyu-mll/crows_pairs", "test")]
    want = load_crows_pairs(crows_csv)[:30]
    assert [_key(p) for p in pairs] == [_key(p) for p in want]
    assert {p.meta["stereo_antistereo"] for p in pairs} == {"stereo", "antistereo"}  # names, not class indices
    assert pairs[0].meta["id"] == 0 and "annotations" not in pairs[0].meta  # scalars only


def test_a_hub_row_without_its_sentences_is_named(crows_csv):
    ds = _hub_dataset(crows_csv, 3).map(lambda row, i: {"sent_less": "" if i == 2 else row["sent_less"]},
                                        with_indices=True)
    with pytest.raises(ValueError, match="nyu-mll/crows_pairs: record 2: 'sent_less' is missing"):
        crows_pairs_from_hub(ds, "nyu-mll/crows_pairs")


def test_offline_a_hub_name_fails_with_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    import datasets

    from mechedit.cli import main

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/crows_pairs' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert set(HUB_CONTRASTIVE) == {"crows_pairs", "nyu-mll/crows_pairs"}
    # locate reads its data before it loads the model
    code = main(["--quiet", "locate", "pcgu", "--model", "factworld", "--data", "crows_pairs", "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "loading nyu-mll/crows_pairs from the Hugging Face hub failed" in err and "CSV file instead" in err
    assert not list(tmp_path.iterdir())
