"""mechedit.load: zoo names, local folders, and clear errors for everything else (never the network)."""

from __future__ import annotations

import pytest

import mechedit
from mechedit import ModelNotFoundError, zoo


def test_loads_a_local_checkpoint_directory(tiny_gpt2_dir):
    model = mechedit.load(tiny_gpt2_dir)
    assert not model.training
    assert model.to_str_tokens("w1 w2") == ["<bos>", "w1", "w2"]
    assert "blocks.1.mlp.hook_post" in model.hook_dict


def test_unknown_name_offline_is_a_clear_error():
    with pytest.raises(ModelNotFoundError) as err:
        mechedit.load("factwrld")
    message = str(err.value)
    assert "not a local directory" in message and "factworld" in message and "HF_HUB_OFFLINE" in message


def test_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        mechedit.load(tmp_path)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="No such directory"):
        mechedit.load(tmp_path / "does" / "not" / "exist")
    with pytest.raises(ModelNotFoundError, match="No such directory"):
        mechedit.load("./no-such-checkpoint")


def test_a_file_instead_of_a_directory_is_a_clear_error(tiny_gpt2_dir):
    with pytest.raises(ModelNotFoundError, match="is a file"):
        mechedit.load(tiny_gpt2_dir / "config.json")


def test_unknown_zoo_name_lists_the_zoo():
    with pytest.raises(KeyError, match="factworld-planted"):
        zoo.checkpoint_dir("factworld-large")
