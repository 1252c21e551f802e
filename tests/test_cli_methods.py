"""``mechedit edit --method pcgu|f-learning`` and ``mechedit eval --suite robustness``: real outcomes
(the bias margin falls, the new answer wins, attacks are measured), revertible bit for bit."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

import mechedit
from mechedit import zoo
from mechedit.circuit import Circuit
from mechedit.cli import main
from mechedit.components import Component
from mechedit.edit import WeightEdit, zero_neurons
from mechedit.hf import hf_state_dict
from mechedit.provenance import weights_hash

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, *argv) -> tuple[int, dict | None, str]:
    """``(exit code, the --json summary or None, stderr)`` of ``mechedit --json --quiet ARGV``."""
    code = main(["--json", "--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def _pairs_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sent_more", "sent_less", "stereo_antistereo", "bias_type"])
        writer.writeheader()
        writer.writerows({"sent_more": a, "sent_less": b, "stereo_antistereo": "stereo", "bias_type": "toy"} for a, b in rows)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random GPT-2 checkpoint (words w0..w58), contrastive pairs and facts with new answers in its words."""
    from mechedit.zoo.random_model import random_checkpoint

    root = tmp_path_factory.mktemp("tiny_methods")
    model_dir = random_checkpoint(root / "model", "gpt2", n_layer=2, n_embd=64, n_head=4)
    _pairs_csv(root / "train.csv", [(f"w{i} w{i + 1} w{i + 2} w40 w{i + 3}", f"w{i} w{i + 1} w{i + 2} w41 w{i + 3}")
                                    for i in range(1, 13)])
    _pairs_csv(root / "dev.csv", [(f"w{i} w{i + 2} w40 w{i + 4}", f"w{i} w{i + 2} w41 w{i + 4}") for i in range(20, 28)])
    facts = [{"prompt": f"w{i} w{i + 1} w{i + 2}", "target": f"w{i + 5}", "target_new": f"w{i + 30}", "id": i}
             for i in range(1, 5)]
    (root / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in facts))
    model = mechedit.load(model_dir)
    Circuit.of(model, [Component("mlp", 1)]).save(root / "mlp1.json")
    zero_neurons(model, [(0, 3)]).save(root / "zero")
    return root, model_dir


def _apply_and_revert(capsys, tmp_path: Path, model_dir: Path, edit_dir: Path) -> None:
    """``apply`` writes exactly the edit's weights into a copy of the checkpoint; ``revert`` restores it bit for bit."""
    work = tmp_path / "work"
    shutil.copytree(model_dir, work)
    before = {k: v.clone() for k, v in hf_state_dict(mechedit.load(work)).items()}
    edit = WeightEdit.load(edit_dir)
    code, _, err = run_cli(capsys, "apply", edit_dir, "--model", work)
    assert code == 0, err
    assert weights_hash(mechedit.load(work)) == edit.result.weights_hash != edit.base.weights_hash
    code, _, err = run_cli(capsys, "revert", edit_dir, "--model", work)
    assert code == 0, err
    after = hf_state_dict(mechedit.load(work))
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_pcgu_edit_lowers_the_advantaged_margin_and_reverts_bit_for_bit(capsys, tmp_path, tiny):
    root, model_dir = tiny
    out = tmp_path / "pcgu"
    code, summary, err = run_cli(capsys, "edit", "--model", model_dir, "--method", "pcgu", "--data", root / "train.csv",
                                 "--dev", root / "dev.csv", "--set", "k=0.2", "--set", "lr=0.05", "--set", "epochs=2",
                                 "--set", "batch_size=6", "--out", out)
    assert code == 0, err
    assert summary["kind"] == "WeightEdit" and summary["circuit"] is None and summary["n_pairs"] == 12
    assert 1 <= summary["checkpoint"] <= summary["steps"] == 4
    edit = WeightEdit.load(out)
    assert edit.kind == "pcgu_pcgu" and edit.params["lr"] == 0.05 and edit.params["ranking"]["k"] == 0.2

    # PCGU steps down the advantaged side's score: the margin advantaged - disadvantaged must fall
    code, bias, err = run_cli(capsys, "eval", "--model", model_dir, "--edit", out, "--suite", "bias",
                              "--data", root / "train.csv")
    assert code == 0, err
    assert bias["after"]["mean_difference"] < bias["before"]["mean_difference"] - 0.05, bias
    assert bias["after"]["rate"] < bias["before"]["rate"]  # measured 0.92 -> 0.0 (the dev split sets the checkpoint)

    # with a circuit, the update stays inside the circuit's tensors
    code, summary, err = run_cli(capsys, "edit", "--model", model_dir, "--method", "pcgu", "--circuit", root / "mlp1.json",
                                 "--data", root / "train.csv", "--dev", root / "dev.csv", "--set", "k=0.2",
                                 "--set", "lr=0.05", "--set", "epochs=1", "--out", tmp_path / "pcgu-mlp1")
    assert code == 0, err
    names = WeightEdit.load(tmp_path / "pcgu-mlp1").names
    assert names and all(n.startswith("transformer.h.1.mlp.") for n in names), names

    _apply_and_revert(capsys, tmp_path, model_dir, out)


def test_f_learning_edit_on_a_random_checkpoint_teaches_the_new_answers_and_reverts(capsys, tmp_path, tiny):
    from mechedit.edit import exact_match

    root, model_dir = tiny
    out = tmp_path / "fl"
    code, summary, err = run_cli(capsys, "edit", "--model", model_dir, "--circuit", root / "mlp1.json", "--method",
                                 "f-learning", "--data", root / "facts.jsonl", "--set", 'old={"steps": 3, "lr": 0.01}',
                                 "--set", 'learn={"steps": 60, "lr": 0.03, "eval_every": 2}', "--out", out)
    assert code == 0, err
    edit = WeightEdit.load(out)
    assert edit.kind == "f_learning" and summary["delta_norm"] == edit.params["delta_norm"] > 0
    assert edit.params["config"]["old"]["steps"] == 3 and edit.params["config"]["learn"]["lr"] == 0.03
    assert all(n.startswith("transformer.h.1.mlp.") for n in edit.names)
    model = mechedit.load(model_dir)
    rows = [json.loads(line) for line in (root / "facts.jsonl").read_text().splitlines()]
    new = [(r["prompt"], r["target_new"]) for r in rows]
    assert exact_match(model, new) == 0.0
    with edit.applied(model):
        assert exact_match(model, new) == 1.0
    _apply_and_revert(capsys, tmp_path, model_dir, out)


@pytest.fixture(scope="module")
def factworld_mlps(tmp_path_factory):
    """The fact-world model's six MLPs as a circuit file (F-Learning's usual site)."""
    path = tmp_path_factory.mktemp("fw") / "mlps.json"
    Circuit.of(mechedit.load("factworld"), [Component("mlp", layer) for layer in range(6)]).save(path)
    return path


def test_f_learning_makes_the_new_city_the_top_prediction_in_the_fact_world(capsys, tmp_path, factworld_mlps):
    from mechedit.zoo.prompts import fact_prompts

    world = zoo.load_world("factworld")
    fact = next(f for f in world.facts if f.relation_id == "P19")
    new = next(v for v in world.relation["P19"].values if v != fact.value)
    code, summary, err = run_cli(capsys, "edit", "--model", "factworld", "--circuit", factworld_mlps, "--method",
                                 "f-learning", "--data", f"factworld:P19:{fact.subject}", "--new", new,
                                 "--set", 'old={"steps": 5}', "--set", 'learn={"steps": 40, "eval_every": 2}',
                                 "--out", tmp_path / "fl")
    assert code == 0, err
    model = mechedit.load("factworld")
    edit = WeightEdit.load(tmp_path / "fl")
    prompts = fact_prompts(world, fact)
    new_id, old_id = model.to_single_token(" " + new), model.to_single_token(" " + fact.value)

    def top(prompt: str) -> int:
        with torch.no_grad():
            return int(model(model.to_tokens(prompt))[0, -1].argmax())

    assert all(top(p.prompt) == old_id for p in prompts)
    with edit.applied(model):
        assert all(top(p.prompt) == new_id for p in prompts)


def test_eval_robustness_reports_the_headline_and_writes_the_report(capsys, tmp_path, factworld_mlps):
    from mechedit.evaluate.robustness import RobustnessReport

    people = "factworld:P19"
    code, _, err = run_cli(capsys, "edit", "--model", "factworld", "--circuit", factworld_mlps, "--method", "finetune",
                           "--data", people, "--limit", 2, "--set", "steps=15", "--set", "lr=0.001", "--out", tmp_path / "ft")
    assert code == 0, err
    out = tmp_path / "reports" / "robustness.json"
    code, summary, err = run_cli(capsys, "eval", "--model", "factworld", "--edit", tmp_path / "ft", "--suite", "robustness",
                                 "--data", people, "--limit", 2, "--set", 'attacks=["relearn_full", "latent_universal"]',
                                 "--set", "relearn_steps=2", "--set", "latent_steps=2", "--set", "neighbours_per_fact=1",
                                 "--set", "mc_rotations=false", "--set", "same_subject=false", "--set", "fluency_texts=20",
                                 "--out", out)
    assert code == 0, err
    head = summary["headline"]
    assert head["measure"] == "choice_accuracy_true" and head["case"] == "forget"
    assert head["forget"]["original"] == 1.0 and head["forget"]["edited"] <= 0.5  # the edit did forget
    assert head["retain"]["n"] > 0 and set(head["recovery"]) == {"relearn_full", "latent_universal"}
    report = RobustnessReport.load(out)
    assert summary["files"]["report"] == str(out)
    for attack, value in head["recovery"].items():
        want = report.recovery(attack)
        assert value == pytest.approx(want, nan_ok=True) or (value is None and want != want)
    assert report.context["config"]["relearn_steps"] == 2 and len(report.context["split"]["heldout_subjects"]) == 1
    sizes = report.context["cases"]["forget"]["sizes"]
    assert sizes["same_subject"] == 0 and sizes["fluency"] == 20


def test_the_robustness_headline_of_an_edit_case():
    from mechedit.cli.evaluate import robustness_headline
    from mechedit.evaluate.robustness import RobustnessReport, RobustnessRow

    nan = float("nan")
    rows = (
        RobustnessRow("edit", "efficacy", "choice_accuracy_true", "none", 1.0, 0.2, nan, 8),
        RobustnessRow("edit", "efficacy", "exact_true", "none", 1.0, 0.0, nan, 8),
        RobustnessRow("retain", "efficacy", "choice_accuracy_true", "none", 1.0, 0.9, nan, 16),
        RobustnessRow("forget_heldout", "efficacy", "choice_accuracy_true", "relearn_full", 1.0, 0.2, 0.6, 4),
        RobustnessRow("forget_heldout", "efficacy", "exact_true", "relearn_full", 1.0, 0.0, 1.0, 4),
    )
    head = robustness_headline(RobustnessReport(rows, {"config": {"attacks": ["relearn_full", "latent_universal"]}}))
    assert head["case"] == "edit" and head["forget"] == {"original": 1.0, "edited": 0.2, "n": 8}
    assert head["retain"]["edited"] == 0.9
    assert head["recovery"] == {"relearn_full": pytest.approx(0.5)}  # (0.6 - 0.2) / (1.0 - 0.2); no rows: no entry


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["edit", "--model", "{model}", "--method", "pcgu", "--data", "{train}", "--out", "{out}/e"], "needs --dev"),
        (["edit", "--model", "{model}", "--method", "pcgu", "--data", "{train}", "--dev", "{dev}", "--set", "kk=3",
          "--out", "{out}/e"], "takes no option 'kk'"),
        (["edit", "--model", "{model}", "--method", "pcgu", "--data", "{train}", "--new", "w3", "--out", "{out}/e"],
         "takes no --new"),
        (["edit", "--model", "factworld", "--method", "f-learning", "--circuit", "{circuit}", "--data",
          "factworld:P19", "--out", "{out}/e"], "needs --new"),
        (["edit", "--model", "{model}", "--method", "f-learning", "--data", "{facts}", "--out", "{out}/e"],
         "needs --circuit"),
        (["edit", "--model", "{model}", "--method", "f-learning", "--circuit", "{circuit}", "--data", "{facts}",
          "--set", 'learn={{"stepz": 3}}', "--out", "{out}/e"], "learn takes no option 'stepz'"),
        (["edit", "--model", "{model}", "--method", "f-learning", "--circuit", "{circuit}", "--data", "{facts}",
          "--set", "lam=-1", "--out", "{out}/e"], "lam must be"),
        (["edit", "--model", "{model}", "--method", "zero", "--circuit", "{circuit}", "--dev", "{dev}", "--out", "{out}/e"],
         "--dev is for --method pcgu"),
        (["eval", "--model", "{model}", "--suite", "robustness", "--data", "factworld:P19"], "pass --edit"),
        (["eval", "--model", "{model}", "--suite", "robustness", "--edit", "{edit}", "--data", "factworld:P19",
          "--set", "relearn_stepz=2"], "takes no option 'relearn_stepz'"),
        (["eval", "--model", "{model}", "--suite", "bias", "--data", "{train}", "--retain", "factworld:P19"],
         "--retain belongs to the robustness suite"),
    ],
)
def test_bad_input_to_the_new_methods_exits_2_with_one_line(capsys, tmp_path, tiny, argv, message):
    root, model_dir = tiny
    out = tmp_path / "out"
    out.mkdir()
    names = {"model": model_dir, "out": out, "train": root / "train.csv", "dev": root / "dev.csv",
             "facts": root / "facts.jsonl", "circuit": root / "mlp1.json", "edit": root / "zero"}
    code = main(["--quiet", *[a.format(**names) for a in argv]])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert list(out.iterdir()) == []
