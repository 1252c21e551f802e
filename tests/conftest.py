"""Shared fixtures. Every test runs offline and seeded."""

from __future__ import annotations

import os
import random
import shutil
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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium (Debian's ``chromium`` driven by playwright; ``.ci/run`` installs it when
    missing), skipping with the reason where there is none. Module scope: playwright's sync API
    must not outlive the module (notebook tests run asyncio loops of their own)."""
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's `chromium`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as pw:
        instance = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield instance
        instance.close()


def open_offline(browser, path: Path):
    """``(page, console errors)``: ``path`` opened in a fresh profile with the network off, once
    plotly has drawn its first SVG."""
    context = browser.new_context(offline=True)  # a fresh profile; the page must need no network
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(Path(path).resolve().as_uri())
    page.wait_for_selector(".main-svg")
    return page, errors


def screenshot(page, name: str, fallback: Path) -> Path:
    """Save a full-page screenshot to ``$MECHEDIT_SCREENSHOTS`` (default ``fallback``), outside git."""
    screens = Path(os.environ.get("MECHEDIT_SCREENSHOTS", fallback))
    screens.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screens / name), full_page=True)
    return screens / name


def tiny_fact_records(n: int) -> list[dict]:
    """``n`` fact records (``prompt``, ``subject``, ``target``, ``id``) in the tiny checkpoints' words."""
    return [{"prompt": f"w{i} w{i + 1} w{i + 2} w{i + 3}", "subject": f"w{i + 1}", "target": f"w{i + 7}", "id": i}
            for i in range(1, n + 1)]


# Under `pytest -n 2 --dist loadfile` each file goes whole to one worker, in collection order; the
# longest files start first so that no long file is left running alone at the end (measured with
# `--durations`; the rest keep their order).
_LONGEST_FIRST = (
    "test_notebooks.py", "test_recipes.py", "test_zoo_models.py", "test_robustness.py", "test_pcgu.py", "test_compare.py",
    "test_cli_sweep.py", "test_bench_smoke.py", "test_causal_tracing.py", "test_cli.py",
)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
