"""The README's Python examples run as written (blocks fenced ```python no-test are illustrations)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python([^\n]*)\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
RUNNABLE = [code for info, code in BLOCKS if "no-test" not in info]


def test_readme_has_a_runnable_example():
    assert RUNNABLE, "README.md should show at least one runnable ```python example"


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        for code in RUNNABLE:  # one namespace: later blocks may use earlier names
            exec(compile(code, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
