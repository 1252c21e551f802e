"""Model loading: every model in mechedit is a TransformerLens ``TransformerBridge`` on raw HF weights.

Raw weights (no ``enable_compatibility_mode()`` folding) keep every edit one-to-one with a
parameter of the Hugging Face checkpoint, so an edited model saves as a plain checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from mechedit.hf import bind_fused_qkv

# A hub id is "name" or "org/name" made of these characters; anything else must be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a zoo name, a local checkpoint directory nor a reachable hub id."""


class TokenizerNotFoundError(ModelNotFoundError):
    """A local checkpoint directory without the tokenizer files its prompts need."""


# Any one of these makes a loadable tokenizer: a fast tokenizer's tokenizer.json, a BPE vocab
# (vocab.json + merges.txt, GPT-2 style), a WordPiece vocab.txt (BERT), or a SentencePiece model.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def _check_tokenizer_files(folder: Path) -> None:
    """Refuse a checkpoint folder without tokenizer files.

    Without them transformers silently builds a tokenizer with a single entry, so every prompt
    becomes token 0 and every result is meaningless.
    """
    if any((folder / name).is_file() for name in _TOKENIZER_FILES) or any(folder.glob("*.model")):
        return
    raise TokenizerNotFoundError(
        f"{folder} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); loading it would "
        "turn every prompt into token 0. Save the tokenizer the model was trained with beside the "
        "weights: tokenizer.save_pretrained(dir), or copy tokenizer.json and tokenizer_config.json "
        "(or vocab.json + merges.txt) from the original checkpoint into the folder."
    )


def resolve(name_or_dir: str | os.PathLike) -> str:
    """Return what ``TransformerBridge.boot_transformers`` should receive for ``name_or_dir``.

    Order: a mechedit zoo name (e.g. ``"factworld"``) -> its shipped checkpoint folder; an existing
    path -> that folder, checked to hold ``config.json``; otherwise a hub id, returned unchanged.
    Raises ``ModelNotFoundError`` for a path-like string that does not exist or a folder without
    ``config.json``.
    """
    from mechedit import zoo  # late: zoo imports this module's helpers

    text = os.fspath(name_or_dir)
    if text in zoo.NAMES:
        return str(zoo.checkpoint_dir(text))
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{text!r} is a file; pass the checkpoint *directory* that holds config.json, "
                "the weights (model.safetensors) and the tokenizer files."
            )
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{text!r} has no config.json, so it is not a Hugging Face checkpoint directory. "
                "Save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir), "
                "or pass a zoo name: " + ", ".join(zoo.NAMES) + "."
            )
        return str(path)
    if not _HUB_ID.match(text) or text.startswith((".", "~", "/")):
        raise ModelNotFoundError(
            f"No such directory: {text!r}. Pass an existing Hugging Face checkpoint directory "
            "(config.json + weights + tokenizer), a hub id such as 'gpt2' when online, "
            "or a zoo name: " + ", ".join(zoo.NAMES) + "."
        )
    return text


def is_masked_lm(model: Any) -> bool:
    """Whether the model behind a bridge (or an HF model) is a masked LM: its HF class is one of
    transformers' masked-LM heads (``BertForMaskedLM``, ...). Causal LMs and anything else: False."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    original = getattr(model, "original_model", model)
    return type(original).__name__ in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s parameters: where its token inputs must go.

    Every function that runs a model moves its tokens there (``tokens.to(model_device(model))``)
    and builds masks on the device of the activations it sees, so a model loaded with
    ``load(..., device="cuda")`` works without further arguments. A model split across devices
    gets its first parameter's device (the embedding's, for the architectures mechedit loads). A
    model without parameters falls back to ``model.cfg.device``, and anything else (a bare
    tokenizer) to the CPU.
    """
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.device
    return torch.device(getattr(getattr(model, "cfg", None), "device", None) or "cpu")


def _check_tokenizer(bridge: TransformerBridge, target: str) -> None:
    """Refuse a tokenizer that cannot encode prompts for this model.

    A one-entry tokenizer (no vocabulary found) turns every prompt into token 0; one with more
    entries than the model embeds (e.g. ``tokenizer.json`` without ``tokenizer_config.json``, where
    transformers guesses a tokenizer class and adds its own special tokens) yields ids the model has
    no embedding for.
    """
    tokenizer = bridge.tokenizer
    size = 0 if tokenizer is None else len(tokenizer)
    d_vocab = int(bridge.cfg.d_vocab)
    if 1 < size <= d_vocab:
        return
    problem = (
        f"a tokenizer of {size} entries, so every prompt would become token 0"
        if size <= 1
        else f"a tokenizer of {size} entries, more than the {d_vocab} tokens the model embeds"
    )
    raise TokenizerNotFoundError(
        f"{target!r} loaded with {problem}. Put the model's complete tokenizer files beside its "
        "weights: tokenizer.json with tokenizer_config.json (or the vocab files), e.g. with "
        "tokenizer.save_pretrained(dir)."
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def load(
    name_or_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, str | int] | None = None,
    max_memory: dict[str | int, str | int] | None = None,
) -> TransformerBridge:
    """Load a model as a ``TransformerBridge`` on raw HF weights, in eval mode.

    Args:
        name_or_dir: a zoo name (``"factworld"``, ``"factworld-planted"``), a local Hugging Face
            checkpoint directory, or a hub id such as ``"gpt2"`` (needs the network or a warm HF
            cache).
        device: where to put the model; ``None`` lets TransformerLens choose (CPU here).
        dtype: parameter dtype (float32 by default, so weight edits are exact).
        device_map, max_memory: spread a model too large for one device over several
            (``device_map="auto"``, with ``accelerate``; the bridge's own pass-through). Give
            ``device`` or ``device_map``, not both.

    The bridge computes with the HF tensors themselves: where TransformerLens would compute
    attention with private copies of a fused q/k/v weight (GPT-NeoX), ``bind_fused_qkv`` makes it
    read the fused tensor, so training through the bridge and ``export_hf`` agree.

    Raises:
        ModelNotFoundError: the name is not local and the hub cannot provide it; the message says
            how to pass a directory instead.
        TokenizerNotFoundError: a local folder without tokenizer files (``tokenizer.json`` or a
            vocab file); the message says how to add them.
    """
    from mechedit import zoo

    target = resolve(name_or_dir)
    local = Path(target).is_dir()
    if local:
        _check_tokenizer_files(Path(target))
    try:
        if device is not None and device_map is not None:
            raise ValueError("give device= or device_map=, not both (a device map places every layer itself)")
        spread = {k: v for k, v in (("device_map", device_map), ("max_memory", max_memory)) if v is not None}
        bridge = TransformerBridge.boot_transformers(target, device=device, dtype=dtype, **spread)
    except OSError as err:
        if local:
            raise
        where = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub could not be reached"
        raise ModelNotFoundError(
            f"{target!r} is not a local directory or a mechedit zoo name, and {where}. "
            "Download the checkpoint where you have the network (e.g. "
            "`huggingface-cli download gpt2 --local-dir ./gpt2`) and pass that directory, "
            "or use a zoo name: " + ", ".join(zoo.NAMES) + f". (Underlying error: {err})"
        ) from None
    _check_tokenizer(bridge, target)
    # Training or editing the HF tensors must reach what the bridge computes (GPT-NeoX's split q/k/v).
    bind_fused_qkv(bridge)
    if os.fspath(name_or_dir) in zoo.NAMES:
        # record the portable zoo name, not this machine's path, in provenance and circuit files
        bridge.cfg.model_name = os.fspath(name_or_dir)
    bridge.eval()
    return bridge
