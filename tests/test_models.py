"""mechedit.load: zoo names, local folders, and clear errors for everything else (never the network)."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("left", [(), ("tokenizer_config.json",)])
def test_a_checkpoint_without_tokenizer_files_is_refused(tiny_gpt2_dir, tmp_path, left):
    """transformers would build a one-entry tokenizer and every prompt would become token 0."""
    import shutil

    from mechedit.models import TokenizerNotFoundError

    for name in ("config.json", "model.safetensors", *left):
        shutil.copy(tiny_gpt2_dir / name, tmp_path / name)
    with pytest.raises(TokenizerNotFoundError) as err:
        mechedit.load(tmp_path)
    message = str(err.value)
    assert "tokenizer.json" in message and "vocab.json" in message
    assert "tokenizer.save_pretrained" in message
    assert isinstance(err.value, ModelNotFoundError)

    # tokenizer.json alone: transformers guesses GPT-2's class and adds a token the model lacks
    shutil.copy(tiny_gpt2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    if not left:
        with pytest.raises(TokenizerNotFoundError, match="more than the 64 tokens"):
            mechedit.load(tmp_path)
        shutil.copy(tiny_gpt2_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    assert mechedit.load(tmp_path).to_str_tokens("w1 w2") == ["<bos>", "w1", "w2"]


def test_a_device_map_loads_the_same_model(tiny_gpt2_dir):
    """The multi-GPU path (device_map / max_memory, through accelerate) on the one device here:
    the same logits and hooks as a plain load; device and device_map together are refused."""
    plain = mechedit.load(tiny_gpt2_dir)
    mapped = mechedit.load(tiny_gpt2_dir, device_map={"": "cpu"}, max_memory={"cpu": "2GiB"})
    tokens = torch.tensor([[0, 5, 7, 9, 11]])
    assert torch.equal(plain(tokens), mapped(tokens))
    _, cache = mapped.run_with_cache(tokens, names_filter="blocks.1.mlp.hook_post")
    assert cache["blocks.1.mlp.hook_post"].shape[:2] == (1, 5)
    with pytest.raises(ValueError, match="not both"):
        mechedit.load(tiny_gpt2_dir, device="cpu", device_map="auto")
