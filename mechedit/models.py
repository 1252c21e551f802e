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

# A hub id is "name" or "org/name" made of these characters; anything else must be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a zoo name, a local checkpoint directory nor a reachable hub id."""


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


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def load(
    name_or_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> TransformerBridge:
    """Load a model as a ``TransformerBridge`` on raw HF weights, in eval mode.

    Args:
        name_or_dir: a zoo name (``"factworld"``, ``"factworld-planted"``), a local Hugging Face
            checkpoint directory, or a hub id such as ``"gpt2"`` (needs the network or a warm HF
            cache).
        device: where to put the model; ``None`` lets TransformerLens choose (CPU here).
        dtype: parameter dtype (float32 by default, so weight edits are exact).

    Raises:
        ModelNotFoundError: the name is not local and the hub cannot provide it; the message says
            how to pass a directory instead.
    """
    from mechedit import zoo

    target = resolve(name_or_dir)
    local = Path(target).is_dir()
    try:
        bridge = TransformerBridge.boot_transformers(target, device=device, dtype=dtype)
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
    from mechedit import zoo

    if os.fspath(name_or_dir) in zoo.NAMES:
        # record the portable zoo name, not this machine's path, in provenance and circuit files
        bridge.cfg.model_name = os.fspath(name_or_dir)
    bridge.eval()
    return bridge
