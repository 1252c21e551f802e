"""``mechedit sweep``: one recipe run per fact / seed / value, in a process pool or on Ray, equal to
``mechedit run`` of each job's recipe; failed jobs retried and reported, never dropped; and the
per-item ``results.jsonl`` of run folders, whose means are the summary's numbers."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_fact_records

from mechedit.circuit import Circuit
from mechedit.cli import main
from mechedit.cli.sweep import _numbers

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """\
name: tiny
model: {model}
data: {data}
seed: 0
locate:
  method: knowledge-neurons
  options: {{steps: 3}}
select:
  top_k: 6
edit:
  method: zero
evaluate:
  - suite: facts
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(root, recipe.yaml, fact records)``: a random GPT-2 (not from the zoo) and 8 facts in its words."""
    from mechedit.zoo.random_model import random_checkpoint

    root = tmp_path_factory.mktemp("sweep")
    model = random_checkpoint(root / "model", "gpt2", n_layer=2, n_embd=64, n_head=4)
    records = tiny_fact_records(8)
    (root / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "r.yaml").write_text(RECIPE.format(model=model, data=root / "facts.jsonl"))
    return root, root / "r.yaml", records


def _cli(*argv, quiet: bool = True) -> tuple[int, dict | None, str]:
    """``(exit code, the --json summary, stderr)`` of ``mechedit --json [--quiet] ARGV`` (any fixture scope)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--json", *(["--quiet"] if quiet else []), *map(str, argv)])
    text = out.getvalue()
    return code, json.loads(text) if text.strip() else None, err.getvalue()


@pytest.fixture(scope="module")
def pool_sweep(tiny, tmp_path_factory):
    """The sweep over the tiny recipe's 8 facts in a 1-process ``spawn`` pool (the default)."""
    _, recipe, _ = tiny
    sweeps = tmp_path_factory.mktemp("pool") / "sweeps"
    code, summary, err = _cli("sweep", recipe, "--over", "facts", "--sweeps", sweeps)
    assert code == 0, err
    return sweeps, summary


def _job_numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if "/" in k}


def test_a_facts_sweep_in_the_pool_equals_separate_runs(pool_sweep, tiny, tmp_path):
    root, _, records = tiny
    sweeps, summary = pool_sweep
    folder = Path(summary["folder"])
    assert [p.name for p in sweeps.iterdir()] == [folder.name]  # no partial folder left
    assert sorted(p.name for p in folder.iterdir()) == ["jobs", "runs", "sweep.csv", "sweep.jsonl"]
    jobs = summary["jobs"]
    assert [(j["value"], j["status"], j["attempts"]) for j in jobs] == [(r["subject"], "ok", 1) for r in records]
    assert [json.loads(line) for line in (folder / "sweep.jsonl").read_text().splitlines()] == jobs
    with (folder / "sweep.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(r["label"], r["status"]) for r in table] == [(j["label"], "ok") for j in jobs]
    assert float(table[1]["facts/efficacy/p_target/after"]) == pytest.approx(jobs[1]["facts/efficacy/p_target/after"])
    for path in folder.rglob("*.json"):  # every path inside names the final folder
        assert ".partial" not in path.read_text(), path

    for job, record in zip(jobs[:2], records[:2], strict=True):  # two of the eight: each is a whole run
        data = tmp_path / f"{record['id']}.jsonl"
        data.write_text(json.dumps(record) + "\n")
        recipe = tmp_path / f"{record['id']}.yaml"
        recipe.write_text(RECIPE.format(model=root / "model", data=data))
        code, alone, err = _cli("run", recipe, "--runs", tmp_path / "runs")
        assert code == 0, err
        run_folder = Path(job["run_folder"])
        assert run_folder.parent == folder / "runs" and run_folder.is_dir()
        assert list(Circuit.load(run_folder / "circuit.json")) == list(Circuit.load(Path(alone["folder"]) / "circuit.json"))
        # the same numbers, exactly: one thread and the recipe's seed in the worker as here
        numbers = _numbers(alone)
        assert numbers and _job_numbers(job) == numbers
        assert (run_folder / "results.jsonl").read_text() == (Path(alone["folder"]) / "results.jsonl").read_text()


def test_results_jsonl_has_one_line_per_item_whose_means_are_the_summary(tiny, tmp_path):
    _, recipe, records = tiny
    code, summary, err = _cli("run", recipe, "--runs", tmp_path)
    assert code == 0, err
    folder = Path(summary["folder"])
    items = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    rows = json.loads((folder / "summary.json").read_text())["steps"][2]["rows"]
    assert [(i["eval"], i["suite"], i["prompt"], i["target"]) for i in items] == [
        ("facts", "efficacy", r["prompt"], r["target"]) for r in records]
    steps = json.loads((folder / "summary.json").read_text())["steps"]
    assert not any("items" in step for step in steps)  # summary.json as before: items go to results.jsonl
    for row in rows:
        if row["suite"] == "efficacy":
            for when in ("before", "after"):
                values = [i[when][row["metric"]] for i in items]
                assert row["n"] == len(values)
                assert sum(values) / len(values) == pytest.approx(row[when], abs=1e-6), (row, when)
    assert {r["metric"] for r in rows if r["suite"] == "efficacy"} == set(items[0]["after"])


def test_results_jsonl_holds_one_line_per_secret_of_a_privacy_evaluation(tiny, tmp_path):
    root, recipe, _ = tiny
    secrets = [{"prefix": f"w{i} w{i + 1} w{i + 2}", "secret": f"w{i + 10} w{i + 11}"} for i in range(1, 4)]
    (tmp_path / "secrets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in secrets))
    text = recipe.read_text().replace("  - suite: facts\n", f"  - suite: privacy\n    data: {tmp_path / 'secrets.jsonl'}\n"
                                      "    options: {n_samples: 10, el: false}\n")
    (tmp_path / "p.yaml").write_text(text)
    code, summary, err = _cli("run", tmp_path / "p.yaml", "--runs", tmp_path / "runs")
    assert code == 0, err
    folder = Path(summary["folder"])
    items = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert [(i["eval"], i["item"], i["prefix"], i["secret"]) for i in items] == [
        ("privacy", n, r["prefix"], r["secret"]) for n, r in enumerate(secrets)]
    metrics = json.loads((folder / "summary.json").read_text())["steps"][2]["metrics"]
    for when in ("before", "after"):
        mrr = [i[when]["mrr"] for i in items]
        assert sum(mrr) / len(mrr) == pytest.approx(metrics["mrr"][when], abs=1e-9)


def test_a_failing_job_is_retried_reported_and_exits_1_while_the_others_stay(tiny, tmp_path, monkeypatch):
    import mechedit.edit

    _, recipe, _ = tiny
    calls = []
    zero_neurons = mechedit.edit.zero_neurons

    def flaky(*args, **kwargs):  # fails the first time only: a retry recovers the job
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected transient failure")
        return zero_neurons(*args, **kwargs)

    monkeypatch.setattr(mechedit.edit, "zero_neurons", flaky)
    # k=0 fails every time (the recipe schema wants top_k >= 1); --workers 0: in this process
    code, summary, err = _cli("sweep", recipe, "--over", "k=3,0", "--workers", "0", "--retries", "1",
                              "--sweeps", tmp_path / "sweeps", quiet=False)
    assert code == 1
    k3, k0 = summary["jobs"]
    assert (k3["label"], k3["status"], k3["attempts"], k3["error"]) == ("k3", "ok", 2, None)
    assert k3["locate/n_components"] == 3 and Path(k3["run_folder"]).is_dir()
    assert (k0["status"], k0["attempts"], k0["run_folder"]) == ("failed", 2, None)
    assert "select.top_k" in k0["error"] and "\n" not in k0["error"]
    assert "injected transient failure; retrying" in err and "job k0 failed (attempt 2)" in err
    folder = Path(summary["folder"])
    with (folder / "sweep.csv").open() as fh:
        assert [(r["label"], r["status"]) for r in csv.DictReader(fh)] == [("k3", "ok"), ("k0", "failed")]
    assert len(list((folder / "runs").iterdir())) == 1  # the failed attempts left no run folder


def test_planned_jobs_change_one_thing_each(tmp_path):
    from mechedit.cli.recipe import load_recipe
    from mechedit.cli.sweep import plan_jobs

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(RECIPE.format(model="factworld", data="factworld:P19").replace(
        "  - suite: facts\n", "  - suite: facts\n  - suite: privacy\n    data: factworld:secrets\n"))
    recipe = load_recipe(recipe_file)
    facts = plan_jobs(recipe, "facts", seeds=None, limit=3, jobs_dir=tmp_path)
    assert len(facts) == 3 and len({j["value"] for j in facts}) == 3
    for job in facts:
        r = job["recipe"]
        assert r["data"] == f"factworld:P19:{job['value']}"
        assert r["locate"]["data"] is None and r["evaluate"][0]["data"] is None  # they read the recipe's data
        assert r["evaluate"][1]["data"] == "factworld:secrets"  # data of its own stays
    seeds = plan_jobs(recipe, "seeds", seeds="0,1,2", limit=None, jobs_dir=tmp_path)
    assert [(j["label"], j["recipe"]["seed"]) for j in seeds] == [("seed0", 0), ("seed1", 1), ("seed2", 2)]
    ks = plan_jobs(recipe, "k=8,16", seeds=None, limit=None, jobs_dir=tmp_path)
    assert [(j["label"], j["recipe"]["select"]["top_k"]) for j in ks] == [("k8", 8), ("k16", 16)]
    steps = plan_jobs(recipe, "locate.options.steps=2,4", seeds=None, limit=None, jobs_dir=tmp_path)
    assert [j["recipe"]["locate"]["options"] for j in steps] == [{"steps": 2}, {"steps": 4}]
    assert all(j["recipe"]["seed"] == 0 and j["recipe"]["select"]["top_k"] == 6 for j in steps)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--over", "seeds"], "--over seeds needs --seeds"),
        (["--over", "k="], "expected facts, seeds or KEY=V1,V2"),
        (["--over", "k=8", "--limit", "2"], "--limit belongs to --over facts"),
        (["--over", "facts", "--workers", "-1"], "--workers must be >= 0"),
        (["--over", "facts", "--ray", "local"], "pip install 'mechedit[ray]'"),
    ],
)
def test_bad_sweeps_exit_2_with_one_line_and_no_folder(tiny, tmp_path, monkeypatch, argv, message):
    _, recipe, _ = tiny
    monkeypatch.setitem(sys.modules, "ray", None)  # as without the extra: `import ray` fails
    code, _, err = _cli("sweep", recipe, *argv, "--sweeps", tmp_path / "sweeps")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.slow
def test_a_sweep_on_a_local_ray_equals_the_pool(pool_sweep, tiny, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'mechedit[ray]'")
    _, recipe, _ = tiny
    # Ray's raylet gives its dashboard agent ~15 s to start, a limit of Ray's own. With jupyter's
    # jsonschema extras installed, `import ray` builds rfc3987_syntax's Earley parser (~15 s on a
    # loaded 2-core machine), so the agent may miss it: the instance never comes up. The second
    # attempt finds the imports in the page cache.
    for attempt in range(2):
        try:
            code, summary, err = _cli("sweep", recipe, "--over", "facts", "--ray", "local", "--sweeps", tmp_path / f"sweeps{attempt}")
        finally:
            ray.shutdown()  # (the sweep shuts the instance it started down; this covers a failure before)
        if not (code == 1 and "timed out during startup" in err):
            break
    if code == 1 and "timed out during startup" in err:
        pytest.skip(f"a local Ray instance did not start on this machine (slow `import ray`?): {err.strip()}")
    assert code == 0, err
    _, pooled = pool_sweep
    assert [j["status"] for j in summary["jobs"]] == ["ok"] * 8
    assert [j["value"] for j in summary["jobs"]] == [j["value"] for j in pooled["jobs"]]
    assert [_job_numbers(j) for j in summary["jobs"]] == [_job_numbers(j) for j in pooled["jobs"]]
    assert not any((tmp_path / f"sweeps{attempt}").glob(".*.partial"))
