"""The command line: every command on the fact world and on a random local checkpoint, equal to
the Python API for the same settings; bad input exits with code 2 and one line, leaving nothing."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_fact_records

import mechedit
from mechedit import zoo
from mechedit.circuit import Circuit
from mechedit.cli import main
from mechedit.components import Component
from mechedit.prompts import FactPrompt
from mechedit.scores import Scores
from mechedit.zoo.prompts import fact_pairs, fact_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    """``(exit code, the --json summary or None, stderr)`` of ``mechedit --json --quiet ARGV``."""
    code = main(["--json", "--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


@pytest.fixture(scope="module")
def world():
    return zoo.load_world("factworld")


@pytest.fixture(scope="module")
def factworld():
    return mechedit.load("factworld")


@pytest.fixture(scope="module")
def fact(world):
    return next(f for f in world.facts if f.relation_id == "P19")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random GPT-2 checkpoint (not from the zoo) and prompt files in its w0..w58 words."""
    from mechedit.zoo.random_model import random_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    model_dir = random_checkpoint(root / "model", "gpt2", n_layer=2, n_embd=64, n_head=4)
    facts = tiny_fact_records(8)
    (root / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in facts))
    pairs = [{"clean": f"w{i} w{i + 1} w{i + 2}", "corrupt": f"w{i + 20} w{i + 1} w{i + 2}",
              "answer": f"w{i + 3}", "wrong_answer": f"w{i + 30}"} for i in range(1, 5)]
    (root / "pairs.json").write_text(json.dumps(pairs))
    return root, model_dir


def tiny_circuit(root: Path, model) -> Circuit:
    """The top-6 knowledge neurons of the tiny model's facts, by the API (saved as api.json)."""
    from mechedit.locate import knowledge_neurons

    circuit = knowledge_neurons(model, tiny_facts(root), steps=3, progress=False).top_k(6)
    circuit.save(root / "api.json")
    return circuit


def tiny_facts(root: Path) -> list[FactPrompt]:
    rows = [json.loads(line) for line in (root / "facts.jsonl").read_text().splitlines()]
    return [FactPrompt(prompt=r["prompt"], subject=r["subject"], target=r["target"], record_id=r["id"]) for r in rows]


# --- the console script -------------------------------------------------------------------------


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys\n"
        "from mechedit.cli import main\n"
        "for argv in (['--help'], ['locate', '--help'], ['edit', '--help'], ['eval', '--help'], ['--version'],\n"
        "             ['world', '--help'], ['world', 'train', '--help'], ['world', 'export', '--help'], ['report', '--help'],\n"
        "             ['sweep', '--help']):\n"
        "    assert main(argv) == 0, argv\n"
        "heavy = [m for m in ('torch', 'transformer_lens', 'transformers', 'plotly', 'pandas') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"mechedit {mechedit.__version__}" in done.stdout
    assert "mechedit locate neuron-attribution" in done.stdout  # the examples are in the help
    assert "mechedit world export factworld --out data/factworld" in done.stdout
    assert "--config FILE.json" in done.stdout and "mechedit report runs/" in done.stdout


def test_bad_input_in_a_real_process_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mechedit", "locate", "no-such-method", "--model", "factworld",
         "--data", "factworld:P19", "--out", str(tmp_path / "c.json")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "unknown locator 'no-such-method'" in done.stderr
    assert list(tmp_path.iterdir()) == []


# --- locate -------------------------------------------------------------------------------------


def test_locate_neuron_attribution_equals_the_api(capsys, tmp_path, world, factworld, fact):
    from mechedit.locate import neuron_attribution

    out = tmp_path / "circuits" / "na.json"
    code, summary, err = run_cli(capsys, "locate", "neuron-attribution", "--model", "factworld",
                                 "--data", f"factworld:P19:{fact.subject}", "--top-k", 8, "--out", out)
    assert code == 0, err
    assert summary["n_items"] == len(fact_prompts(world, fact)) and summary["n_components"] == 8
    scores = neuron_attribution(factworld, fact_prompts(world, fact), progress=False)
    saved = Scores.load(summary["files"]["scores"])
    torch.testing.assert_close(saved.values, scores.values, rtol=1e-5, atol=1e-6)
    assert list(Circuit.load(out)) == list(scores.top_k(8))


def test_locate_activation_patching_equals_the_api(capsys, tmp_path, world, factworld):
    from mechedit.locate import activation_patching

    out = tmp_path / "ap.json"
    code, summary, err = run_cli(capsys, "locate", "activation-patching", "--model", "factworld",
                                 "--data", "factworld:P19", "--limit", 2, "--site", "mlp_out",
                                 "--set", "per_position=false", "--threshold", 0.0, "--by", "abs", "--out", out)
    assert code == 0, err
    facts = [f for f in world.facts if f.relation_id == "P19"][:2]
    scores = activation_patching(factworld, fact_pairs(world, facts, rng=0), site="mlp_out",
                                 per_position=False, progress=False)
    torch.testing.assert_close(Scores.load(summary["files"]["scores"]).values, scores.values)
    assert list(Circuit.load(out)) == list(scores.threshold(0.0, by="abs"))
    assert summary["site"] == "mlp_out" and len(Circuit.load(out)) == factworld.cfg.n_layers


def test_locate_fact_lookup_equals_the_api(capsys, tmp_path, world, factworld):
    from mechedit.locate import fact_lookup

    out = tmp_path / "fl.json"
    code, summary, err = run_cli(capsys, "locate", "fact-lookup", "--model", "factworld", "--data", "factworld:P19",
                                 "--limit", 12, "--template", 1, "--set", "n_corrupt=1", "--set", "extraction_layer=1",
                                 "--set", "probes=false", "--out", out)
    assert code == 0, err
    facts = [fact_prompts(world, f)[1] for f in [f for f in world.facts if f.relation_id == "P19"][:12]]
    found = fact_lookup(factworld, facts, n_corrupt=1, extraction_layer=1, probes=False, progress=False)
    torch.testing.assert_close(Scores.load(summary["files"]["scores"]).values, found.mlp_effects.values, equal_nan=True)
    assert list(Circuit.load(out)) == list(found.mlps) == [Component("mlp", 0)]


@pytest.mark.parametrize(
    ("method", "data", "options"),
    [
        ("attribution-patching", "factworld:P19", ["--limit", 2, "--site", "mlp_out", "--top-k", 3]),
        ("causal-tracing", "factworld:P19", ["--limit", 2, "--template", 1, "--set", "n_noise=2", "--top-k", 5]),
        ("knowledge-neurons", "factworld:P19", ["--limit", 1, "--set", "steps=2", "--set", "layers=[1]",
                                                "--per-layer", "--top-k", 4]),
        ("depn", "factworld:secrets:phone", ["--limit", 2, "--set", "steps=2", "--set", "layers=[1]", "--set", "top_z=5"]),
        ("pcgu", "factworld:bias", ["--limit", 6, "--set", "k=4"]),
    ],
)
def test_every_locator_runs_on_the_fact_world(capsys, tmp_path, method, data, options):
    out = tmp_path / f"{method}.json"
    code, summary, err = run_cli(capsys, "locate", method, "--model", "factworld", "--data", data, *options, "--out", out)
    assert code == 0, err
    circuit = Circuit.load(out)
    assert 0 < len(circuit) == summary["n_components"]
    assert circuit.check_model(mechedit.load("factworld"), strict=True)
    if method != "depn":  # DEPN selects from votes and writes no Scores
        scores = Scores.load(summary["files"]["scores"])
        if method == "attribution-patching":
            assert scores.site == "mlp_out" and list(circuit) == list(scores.top_k(3))
        if method == "knowledge-neurons":  # only layer 1 scored: 4 neurons, all there
            assert {c.layer for c in circuit} == {1} and len(circuit) == 4


def test_locate_and_patch_on_a_random_local_checkpoint(capsys, tiny):
    from mechedit.locate import activation_patching, knowledge_neurons
    from mechedit.prompts import PromptPair

    root, model_dir = tiny
    model = mechedit.load(model_dir)
    code, summary, err = run_cli(capsys, "locate", "knowledge-neurons", "--model", model_dir, "--data",
                                 root / "facts.jsonl", "--set", "steps=3", "--top-k", 6, "--out", root / "kn.json")
    assert code == 0, err
    scores = knowledge_neurons(model, tiny_facts(root), steps=3, progress=False)
    torch.testing.assert_close(Scores.load(summary["files"]["scores"]).values, scores.values)
    assert list(Circuit.load(root / "kn.json")) == list(scores.top_k(6))

    code, summary, err = run_cli(capsys, "locate", "activation-patching", "--model", model_dir, "--data",
                                 root / "pairs.json", "--site", "head", "--set", "per_position=false",
                                 "--top-k", 3, "--out", root / "ap.json")
    assert code == 0, err
    pairs = [PromptPair(**p) for p in json.loads((root / "pairs.json").read_text())]
    expected = activation_patching(model, pairs, site="head", per_position=False, progress=False)
    torch.testing.assert_close(Scores.load(summary["files"]["scores"]).values, expected.values)


# --- edit, apply, revert, export, eval ----------------------------------------------------------


def test_edit_and_eval_on_a_random_local_checkpoint_equal_the_api(capsys, tiny):
    from mechedit.edit import WeightEdit, zero_neurons
    from mechedit.evaluate import evaluate_fact_edit

    root, model_dir = tiny
    model = mechedit.load(model_dir)
    circuit = tiny_circuit(root, model)
    code, summary, err = run_cli(capsys, "edit", "--model", model_dir, "--circuit", root / "api.json",
                                 "--method", "zero", "--out", root / "edits" / "zero")
    assert code == 0, err
    assert summary["kind"] == "WeightEdit"
    saved, direct = WeightEdit.load(root / "edits" / "zero"), zero_neurons(model, circuit)
    assert set(saved.names) == set(direct.names) and saved.result.weights_hash == direct.result.weights_hash
    for name in saved.names:
        assert torch.equal(saved.new_tensors[name], direct.new_tensors[name])

    code, summary, err = run_cli(capsys, "eval", "--model", model_dir, "--edit", root / "edits" / "zero",
                                 "--suite", "facts", "--data", root / "facts.jsonl", "--out", root / "report.json")
    assert code == 0, err
    report = evaluate_fact_edit(model, edit=direct, edited=tiny_facts(root))
    expected = json.loads(json.dumps(report.to_frame().to_dict(orient="records")))
    assert _rows_close(summary["rows"], expected)
    assert Path(summary["files"]["report"]).is_file()


def _rows_close(got: list[dict], expected: list[dict]) -> bool:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert {k: v for k, v in g.items() if not isinstance(v, float)} == {
            k: v for k, v in e.items() if not isinstance(v, float)}
        for k, v in e.items():
            if isinstance(v, float):
                assert g[k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True) or (g[k] is None and v != v)
    return True


def test_apply_revert_and_export_a_local_checkpoint(capsys, tmp_path, tiny):
    import shutil

    from mechedit.edit import zero_neurons
    from mechedit.hf import hf_state_dict
    from mechedit.provenance import weights_hash

    root, model_dir = tiny
    work = tmp_path / "model"
    shutil.copytree(model_dir, work)
    edit = zero_neurons(mechedit.load(model_dir), tiny_circuit(root, mechedit.load(model_dir)))
    edit.save(tmp_path / "zero")
    before = {k: v.clone() for k, v in hf_state_dict(mechedit.load(work)).items()}

    zero = tmp_path / "zero"
    assert run_cli(capsys, "apply", zero, "--model", work)[0] == 0
    edited = mechedit.load(work)
    assert weights_hash(edited) == edit.result.weights_hash
    code, _, err = run_cli(capsys, "apply", zero, "--model", work)
    assert code == 2 and "Traceback" not in err  # the folder is no longer the edit's base

    code, summary, err = run_cli(capsys, "export", zero, "--model", model_dir, "--out", tmp_path / "exp")
    assert code == 0, err
    assert weights_hash(mechedit.load(tmp_path / "exp")) == edit.result.weights_hash

    assert run_cli(capsys, "revert", zero, "--model", work)[0] == 0
    after = hf_state_dict(mechedit.load(work))
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit for bit
    assert not (work / "mechedit_reverts" / edit.result.weights_hash[:16]).exists()


def test_edit_methods_and_eval_suites_on_the_fact_world(capsys, tmp_path, world, factworld, fact):
    from mechedit.edit import ActivationEdit, WeightEdit, ablate
    from mechedit.evaluate import pair_preference

    circuit_path = tmp_path / "na.json"
    code, _, err = run_cli(capsys, "locate", "neuron-attribution", "--model", "factworld", "--data",
                           f"factworld:P19:{fact.subject}", "--set", "layers=[2]", "--top-k", 6, "--out", circuit_path)
    assert code == 0, err
    circuit = Circuit.load(circuit_path)
    new = next(v for v in world.relation["P19"].values if v != fact.value)

    code, summary, err = run_cli(capsys, "edit", "--model", "factworld", "--circuit", circuit_path, "--method", "mean",
                                 "--data", "factworld:P19", "--limit", 5, "--out", tmp_path / "mean")
    assert code == 0, err
    mean = ActivationEdit.load(tmp_path / "mean")
    reference = [p.prompt for f in [f for f in world.facts if f.relation_id == "P19"][:5] for p in fact_prompts(world, f)]
    direct = ablate(factworld, circuit, mode="mean", reference=reference)
    tokens = factworld.to_tokens(fact_prompts(world, fact)[0].prompt)
    with mean.applied(factworld):
        got = factworld(tokens)
    with direct.applied(factworld):
        want = factworld(tokens)
    torch.testing.assert_close(got, want)

    code, summary, err = run_cli(capsys, "edit", "--model", "factworld", "--circuit", circuit_path, "--method",
                                 "finetune", "--data", f"factworld:P19:{fact.subject}", "--set", "steps=3",
                                 "--out", tmp_path / "ft")
    assert code == 0, err
    assert WeightEdit.load(tmp_path / "ft").kind == "finetune"

    code, summary, err = run_cli(capsys, "edit", "--model", "factworld", "--circuit", circuit_path, "--method",
                                 "rank-one", "--data", f"factworld:P19:{fact.subject}", "--new", new,
                                 "--set", "v_steps=5", "--out", tmp_path / "rome")
    assert code == 0, err
    rome = WeightEdit.load(tmp_path / "rome")
    assert rome.kind == "rank_one" and all(".h.2." in n for n in rome.names)

    code, summary, err = run_cli(capsys, "eval", "--model", "factworld", "--edit", tmp_path / "rome", "--suite", "facts",
                                 "--data", f"factworld:P19:{fact.subject}", "--new", new,
                                 "--set", "neighbours_per_fact=1", "--set", "mc_rotations=false")
    assert code == 0, err
    efficacy = [r for r in summary["rows"] if r["suite"] == "efficacy" and r["metric"] == "exact_new"]
    assert efficacy and efficacy[0]["before"] == 0.0

    code, summary, err = run_cli(capsys, "eval", "--model", "factworld", "--suite", "privacy", "--data",
                                 "factworld:secrets:phone", "--limit", 2, "--set", "el=false", "--set", "n_samples=20")
    assert code == 0, err
    assert summary["n_secrets"] == 2 and "mrr" in summary["metrics"]

    code, summary, err = run_cli(capsys, "eval", "--model", "factworld", "--edit", tmp_path / "mean", "--suite", "bias",
                                 "--data", "factworld:bias:test", "--limit", 8)
    assert code == 0, err
    from mechedit.cli.inputs import read_contrastive

    pairs = read_contrastive("factworld:bias:test", limit=8)
    assert summary["before"]["rate"] == pair_preference(factworld, pairs).rate
    with direct.applied(factworld):
        assert summary["after"]["rate"] == pair_preference(factworld, pairs).rate


# --- bad input ----------------------------------------------------------------------------------


def _bad_files(tmp: Path) -> dict[str, Path]:
    (tmp / "broken.json").write_text('[{"prompt": "w1 w2", "target": ')
    (tmp / "case.jsonl").write_text(json.dumps({"prompt": "w1 w2 w3", "subject": "W2", "target": "w4"}) + "\n")
    (tmp / "nofacts.json").write_text(json.dumps([{"text": "w1"}]))
    (tmp / "good.jsonl").write_text(json.dumps({"prompt": "w1 w2 w3", "subject": "w2", "target": "w4"}) + "\n")
    return {"broken": tmp / "broken.json", "case": tmp / "case.jsonl", "nofacts": tmp / "nofacts.json",
            "good": tmp / "good.jsonl"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["locate", "nope", "--model", "{model}", "--data", "{case}", "--out", "{out}/c.json"], "unknown locator"),
        (["locate", "fact-lookup", "--model", "{model}", "--data", "{good}", "--set", "threshold=2",
          "--out", "{out}/c.json"], "threshold must be"),
        (["locate", "knowledge-neurons", "--model", "{model}", "--data", "{out}/missing.json", "--out", "{out}/c.json"],
         "No such data file"),
        (["locate", "knowledge-neurons", "--model", "{model}", "--data", "{broken}", "--out", "{out}/c.json"],
         "could not read"),
        (["locate", "knowledge-neurons", "--model", "{model}", "--data", "{nofacts}", "--out", "{out}/c.json"],
         "records are not facts"),
        (["locate", "knowledge-neurons", "--model", "{model}", "--data", "{case}", "--out", "{out}/c.json"],
         "different letter case"),
        (["locate", "activation-patching", "--model", "{model}", "--data", "factworld:P19", "--limit", "1",
          "--site", "blocks.0.nope", "--out", "{out}/c.json"], "site"),
        (["locate", "knowledge-neurons", "--model", "{model}", "--data", "{case}", "--set", "stepz=3",
          "--out", "{out}/c.json"], "takes no option 'stepz'"),
        (["locate", "neuron-attribution", "--model", "factworld", "--data", "factworld:P19:KASIM QUORVATH",
          "--out", "{out}/c.json"], "case-sensitive"),
        (["locate", "knowledge-neurons", "--model", "{out}/no_model", "--data", "{good}", "--out", "{out}/c.json"],
         "No such directory"),
        (["edit", "--model", "{model}", "--circuit", "{out}/none.json", "--method", "zero", "--out", "{out}/e"],
         "no such file"),
        (["edit", "--model", "{model}", "--circuit", "{broken}", "--method", "blur", "--out", "{out}/e"],
         "unknown edit method"),
        (["edit", "--model", "{model}", "--circuit", "{broken}", "--method", "zero", "--out", "{out}/e"], "not valid JSON"),
        (["eval", "--model", "{model}", "--suite", "vibes", "--data", "{case}"], "unknown suite"),
        (["demo", "--subject", "KASIM QUORVATH", "--out", "{out}/demo"], "did you mean 'kasim quorvath'"),
        (["demo", "--relation", "P999", "--out", "{out}/demo"], "unknown relation"),
        (["demo", "--model", "{model}", "--out", "{out}/demo"], "needs the facts to forget"),
        (["demo", "--model", "{model}", "--data", "{out}/none.jsonl", "--out", "{out}/demo"], "none.jsonl"),
        (["demo", "--data", "{good}", "--out", "{out}/demo"], "for a model outside the zoo"),
        (["--device", "gpu0", "locate", "depn", "--model", "{model}", "--data", "{case}", "--out", "{out}/c.json"],
         "not a device"),
        (["locate", "depn", "--model", "{model}", "--data", "{case}", "--out", "{out}/c.json", "--top-k", "x"],
         "invalid int value"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(capsys, tmp_path, tiny, argv, message):
    root, model_dir = tiny
    files = _bad_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(model=model_dir, out=out, **files) for a in argv]
    code = main(["--quiet", *args])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert list(out.iterdir()) == []  # no run folder, circuit or edit left behind


def test_the_readme_worked_example_runs(capsys, tmp_path, monkeypatch):
    import re
    import shlex

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```bash cli-example\n(.*?)```", readme, flags=re.S)
    monkeypatch.chdir(tmp_path)
    for line in block.strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "mechedit", line
        code = main(["--quiet", *argv[1:]])
        _, err = capsys.readouterr()
        assert code == 0, f"{line}: {err}"
    assert len(Circuit.load(tmp_path / "circuits" / "kasim.json")) == 24
    report = json.loads((tmp_path / "reports" / "kasim.json").read_text())
    assert report["rows"]
    assert (tmp_path / "exports" / "factworld-kasim" / "model.safetensors").is_file()


# --- recipes and run folders --------------------------------------------------------------------

RECIPE = """\
name: tiny-forget
model: factworld
data: "factworld:P19:{subject}"
seed: 0
locate:
  method: neuron-attribution
  options: {{layers: [2]}}
select:
  top_k: 8
edit:
  method: zero
evaluate:
  - suite: facts
    options: {{neighbours_per_fact: 1, mc_rotations: false}}
"""


def test_run_recipe_writes_a_folder_equal_to_the_api_and_reruns_from_params(capsys, tmp_path, world, factworld, fact):
    from mechedit.edit import zero_neurons
    from mechedit.evaluate import evaluate_fact_edit, fact_edit_suites
    from mechedit.locate import NeuronAttributionConfig, neuron_attribution

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(subject=fact.subject))
    code, summary, err = run_cli(capsys, "run", recipe, "--runs", tmp_path / "runs")
    assert code == 0, err
    folder = Path(summary["folder"])
    assert folder.parent == tmp_path / "runs" and folder.name.startswith("tiny-forget-")
    assert sorted(p.name for p in folder.iterdir()) == [
        "circuit.json", "circuit.scores.json", "circuit.scores.safetensors", "edit", "params.json",
        "report-facts.json", "report.html", "results.jsonl", "summary.json"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [folder.name]  # no partial folder left

    scores = neuron_attribution(factworld, fact_prompts(world, fact), config=NeuronAttributionConfig(layers=(2,)),
                                progress=False)
    circuit = scores.top_k(8)
    assert list(Circuit.load(folder / "circuit.json")) == list(circuit)
    report = evaluate_fact_edit(factworld, edit=zero_neurons(factworld, circuit),
                                suites=fact_edit_suites(world, [fact], neighbours_per_fact=1, mc_rotations=False))
    rows = json.loads((folder / "summary.json").read_text())["steps"][2]["rows"]
    assert _rows_close(rows, json.loads(json.dumps(report.to_frame().to_dict(orient="records"))))
    # results.jsonl: one line per evaluated prompt; each row of the summary is its items' mean (rank: median)
    items = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert len(items) == sum(r["n"] for r in rows if r["suite"] != "fluency" and r["metric"] == "p_true")
    for row in rows:
        mine = [i[when][row["metric"]] for i in items if (i["case"], i["suite"]) == (row["case"], row["suite"])
                for when in ("after",)]
        if row["suite"] == "fluency":  # a corpus measure: no items
            assert not mine
            continue
        mean = statistics.median(mine) if row["metric"].startswith("rank_") else sum(mine) / len(mine)
        assert len(mine) == row["n"] and mean == pytest.approx(row["after"], abs=1e-6), row

    code, again, err = run_cli(capsys, "run", folder / "params.json", "--runs", tmp_path / "again")
    assert code == 0, err
    again_folder = Path(again["folder"])
    assert list(Circuit.load(again_folder / "circuit.json")) == list(circuit)
    assert json.loads((again_folder / "summary.json").read_text())["steps"][2]["rows"] == rows


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (RECIPE.replace("  top_k: 8", "  top_k: 8\n  topk: 3"), "r.yaml:10: select.topk: unknown key"),
        (RECIPE.replace("  method: zero", "  method: blur"), "r.yaml:11: edit.method"),
        (RECIPE.replace("seed: 0", "seed: zero"), "r.yaml:4: seed"),
        (RECIPE.replace("name: tiny-forget", "name: ../escape"), "r.yaml:1: name"),
        (RECIPE.replace("layers: [2]", "layerz: [2]"), "takes no option 'layerz'"),
        (RECIPE[:60], "r.yaml:"),  # truncated
        ("- just\n- a list\n", "a recipe is a mapping"),
    ],
)
def test_bad_recipes_exit_2_naming_key_and_line(capsys, tmp_path, fact, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("{subject}", fact.subject).replace("{{", "{").replace("}}", "}"))
    code = main(["--quiet", "run", str(recipe), "--runs", str(tmp_path / "runs")])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_crash_mid_run_leaves_no_run_folder_and_the_model_untouched(capsys, tmp_path, monkeypatch, fact):
    import mechedit.edit
    from mechedit.provenance import weights_hash

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure in the edit")

    monkeypatch.setattr(mechedit.edit, "zero_neurons", broken)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(subject=fact.subject))
    before = (zoo.checkpoint_dir("factworld") / "model.safetensors").read_bytes()
    code = main(["--quiet", "run", str(recipe), "--runs", str(tmp_path / "runs")])
    _, err = capsys.readouterr()
    assert code == 1 and "injected failure" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # no run folder, partial or complete, and no runs folder it made
    assert (zoo.checkpoint_dir("factworld") / "model.safetensors").read_bytes() == before
    assert weights_hash(mechedit.load("factworld")) == weights_hash(mechedit.load(zoo.checkpoint_dir("factworld")))


def test_demo_runs_on_any_local_checkpoint_given_facts(capsys, tmp_path, tiny):
    """`mechedit demo --model DIR --data FILE`: the demo's steps as a recipe run, whose numbers equal
    `mechedit run` of the same recipe (its params.json), with the report page."""
    root, model_dir = tiny
    code, summary, err = run_cli(capsys, "--json", "demo", "--model", str(model_dir), "--data", str(root / "facts.jsonl"),
                                 "--k", "6", "--out", str(tmp_path / "runs"))
    assert code == 0, err
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("demo-")]
    assert {"params.json", "circuit.json", "summary.json", "results.jsonl", "report.html"} <= {p.name for p in folder.iterdir()}
    params = json.loads((folder / "params.json").read_text())
    assert params["recipe"]["locate"]["method"] == "neuron-attribution" and params["recipe"]["select"]["top_k"] == 6
    assert len(Circuit.load(folder / "circuit.json")) == 6
    first = json.loads((folder / "summary.json").read_text())["steps"]
    code, _, err = run_cli(capsys, "run", str(folder / "params.json"), "--runs", str(tmp_path / "again"), "--no-report")
    assert code == 0, err
    (again,) = (tmp_path / "again").iterdir()
    second = json.loads((again / "summary.json").read_text())["steps"]
    assert [s.get("report") for s in first if s.get("command") == "eval"] == [s.get("report") for s in second if s.get("command") == "eval"]


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    from mechedit.cli._common import stamped_folder

    first, first_partial = stamped_folder(tmp_path, "recipe", "20261201-000000")
    assert (first.name, first_partial.name) == ("recipe-20261201-000000", ".recipe-20261201-000000.partial")
    first_partial.mkdir()  # a run still being built holds its name too
    second, _ = stamped_folder(tmp_path, "recipe", "20261201-000000")
    second.mkdir()
    third, _ = stamped_folder(tmp_path, "recipe", "20261201-000000")
    assert (second.name, third.name) == ("recipe-20261201-000000-2", "recipe-20261201-000000-3")
