"""mechedit's progress bars: widgets by default, text bars on request (saved notebooks)."""

from __future__ import annotations

import pytest
import tqdm.auto
import tqdm.std

from mechedit.progress import ENV
from mechedit.progress import tqdm as progress_bar


def test_bars_follow_the_environment_when_created(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with progress_bar(total=2, disable=True) as bar:
        assert isinstance(bar, tqdm.auto.tqdm)
    monkeypatch.setenv(ENV, "text")
    with progress_bar(range(3), disable=True) as bar:
        assert type(bar) is tqdm.std.tqdm and list(bar) == [0, 1, 2]
    monkeypatch.setenv(ENV, "widgets")
    with pytest.raises(ValueError, match="MECHEDIT_PROGRESS"):
        progress_bar(total=1)
