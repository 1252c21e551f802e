"""Shared fixtures. Every test runs offline and seeded."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core (pytest -n 2): a worker's ops and the notebook kernels
    # and command-line subprocesses it starts then get one thread each instead of fighting the
    # other worker for both cores. Set before torch is imported so OpenMP reads it.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # (in case a plugin imported torch before the line above)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _seeded_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Modules of many small forwards: on a shared 2-core machine two OpenMP threads per op spend
    most of their time waiting for each other (10-30x slower here).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public data files in ../shared/data; tests that need them skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (CI places ../shared beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A seeded random 2-layer GPT-2 checkpoint folder with a word-level tokenizer (w0..w58)."""
    from mechedit.zoo import random_gpt2_checkpoint

    return random_gpt2_checkpoint(tmp_path_factory.mktemp("tiny_gpt2"), n_layer=2, n_embd=64, n_head=4)


@pytest.fixture(scope="session")
def tiny_bridge(tiny_gpt2_dir):
    """The tiny random GPT-2 loaded through ``mechedit.load`` (a TransformerBridge, eval mode)."""
    import mechedit

    return mechedit.load(tiny_gpt2_dir)


def tiny_fact_records(n: int) -> list[dict]:
    """``n`` fact records (``prompt``, ``subject``, ``target``, ``id``) in the tiny checkpoints' words."""
    return [{"prompt": f"w{i} w{i + 1} w{i + 2} w{i + 3}", "subject": f"w{i + 1}", "target": f"w{i + 7}", "id": i}
            for i in range(1, n + 1)]


# Under `pytest -n 2 --dist loadfile` each file goes whole to one worker, in collection order; the
# longest files start first so that no long file is left running alone at the end (measured with
# `--durations`; the rest keep their order).
_LONGEST_FIRST = (
    "test_notebooks.py", "test_zoo_models.py", "test_robustness.py", "test_pcgu.py", "test_compare.py",
    "test_cli_sweep.py", "test_bench_smoke.py", "test_causal_tracing.py", "test_cli.py",
)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
