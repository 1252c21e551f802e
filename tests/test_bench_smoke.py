"""The benchmark scripts run end to end on a tiny model (``--small``) and print their tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_activation_patching_small_prints_equal_scores():
    cmd = [
        sys.executable, str(ROOT / "bench" / "bench_activation_patching.py"), "--small",
        "--threads", "1", "--pairs", "2", "--tokens", "8", "--tl-cells", "3", "--no-worst-case",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| typical |")]
    assert len(rows) == 2, run.stdout  # resid_pre and heads
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        speedup = float(cells[5].split("x")[0])
        diff = float(cells[6].split()[0])
        assert speedup > 0 and diff <= 1e-5, row
        assert re.fullmatch(r"\d+ / \d+ \(.*\)", cells[7]), row  # peak memory of TL / mechedit


def test_bench_edge_attribution_small_prints_equal_scores():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_edge_attribution.py"), "--small", "--threads", "1",
           "--pairs", "3", "--tokens", "8", "--ig-steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| mechedit EAP, same edges per position |" in run.stdout, run.stdout
    diff = re.search(r"max \|diff\| (\S+)", run.stdout)
    assert diff and float(diff.group(1)) <= 1e-5, run.stdout
def test_bench_knowledge_neurons_small_prints_equal_scores_and_depn_rate():
    pytest.importorskip("knowledge_neurons", reason="pip install knowledge-neurons==0.0.2 --no-deps")
    cmd = [sys.executable, str(ROOT / "bench" / "bench_knowledge_neurons.py"), "--small", "--secrets", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| IG, ")]
    assert len(rows) == 2, run.stdout  # resumed and full forwards
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3].rstrip("x")) > 0 and float(cells[4]) <= 1e-5, row
    rate = next(line for line in run.stdout.splitlines() if line.startswith("| detect"))
    assert float(rate.strip("|").split("|")[2]) > 0, rate


def test_bench_finetune_small_prints_memory_ratios():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_finetune.py"), "--small", "--threads", "1", "--steps", "2",
           "--rows", "2", "--tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in run.stdout.splitlines() if line.startswith("| ") and "x |" in line}
    assert len(rows) == 3, run.stdout
    full = rows["all parameters (full fine-tuning)"]
    assert float(full[3].rstrip("x")) == 1.0
    for name, cells in rows.items():
        entries, ratio = int(cells[1].replace(",", "")), float(cells[3].rstrip("x"))
        assert entries > 0 and float(cells[4]) > 0, cells
        if name != "all parameters (full fine-tuning)":
            # frozen entries hold no optimiser state: memory follows the trained entries
            assert ratio == pytest.approx(entries / int(full[1].replace(",", "")), rel=0.05), cells
def test_bench_pcgu_small_selects_like_the_loop():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_pcgu.py"), "--small", "--threads", "1",
           "--repeats", "1", "--loop-sample", "0", "--pairs", "8", "--tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "same selection: True" in run.stdout, run.stdout  # the loop ran in full and agrees
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    for step in ("one backward (all parameters)", "ranking, vectorised (cosines + global lowest-k)"):
        seconds = float(rows[step].strip("|").split("|")[1])
        assert seconds > 0, rows[step]
