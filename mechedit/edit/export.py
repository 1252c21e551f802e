"""Export a bridge, optionally with a weight edit, as a plain Hugging Face checkpoint folder.

``save_pretrained`` on the bridge's wrapped model fails or writes wrapper names, so the export
builds a fresh HF model of the same class from the config, loads the weights under their plain HF
names (strictly: every key, no extras) and saves that. The folder holds ``config.json``,
``model.safetensors``, ``generation_config.json``, the tokenizer files, and ``mechedit.json``::

    {"format": "mechedit.hf_export", "version": 1,
     "source": {<Provenance of the model passed in>},
     "edit": {<the edit's manifest, see mechedit.edit.weights>} or null,
     "hf_state_dict_hash": "<state_dict_hash of the exported HF state dict>"}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechedit.edit.weights import BaseModelMismatchError, WeightEdit, bitwise_equal
from mechedit.hf import architecture, hf_config, hf_model, hf_parameters, hf_state_dict
from mechedit.provenance import Provenance, state_dict_hash

NOTE_FILE = "mechedit.json"
NOTE_FORMAT = "mechedit.hf_export"
NOTE_VERSION = 1


def export_hf(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    edit: WeightEdit | None = None,
    check_base: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with ``edit``'s tensors, if given) as a checkpoint ``from_pretrained`` loads.

    The live model is never changed. With an ``edit``, the model must be the edit's base or already
    hold the edit (its weights hash equals ``edit.base`` or ``edit.result``); ``check_base=False``
    skips that check. ``out_dir`` must be empty or absent unless ``overwrite=True``. Returns the folder.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose a new folder or pass overwrite=True")
    source = Provenance.of(model)
    state = _state_with_edit(model, edit, source=source, check_base=check_base)

    template = hf_model(model)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    fresh = type(template)(hf_config(model))
    if len(dtypes) == 1:
        fresh = fresh.to(dtypes.pop())
    fresh.load_state_dict(state, strict=True)
    written = fresh.state_dict()
    # Tied names load into one tensor: unequal values would be silently overwritten by the last.
    lost = [n for n, t in state.items() if not bitwise_equal(written[n], t.to(written[n].device))]
    if lost:
        raise ValueError(
            f"parameters {lost} did not survive loading into a fresh {type(template).__name__} "
            "(tied weights given different values?); make tied tensors equal before exporting"
        )

    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(str(out))
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    note: dict[str, Any] = {
        "format": NOTE_FORMAT,
        "version": NOTE_VERSION,
        "source": source.to_dict(),
        "edit": None if edit is None else edit.manifest(),
        "hf_state_dict_hash": state_dict_hash(written),
    }
    (out / NOTE_FILE).write_text(json.dumps(note, indent=2) + "\n")
    return out


def _state_with_edit(
    model: torch.nn.Module,
    edit: WeightEdit | None,
    *,
    source: Provenance,
    check_base: bool,
) -> dict[str, Tensor]:
    """The model's HF state dict with the edit's tensors in place of the model's (not in the model)."""
    state = hf_state_dict(model)
    if edit is None:
        return state
    if edit.architecture != architecture(model):
        raise BaseModelMismatchError(
            f"the edit is for a {edit.architecture}, not a {architecture(model)}"
        )
    if check_base and source.weights_hash not in (edit.base.weights_hash, edit.result.weights_hash):
        raise BaseModelMismatchError(
            f"the edit was built for weights {edit.base.weights_hash} but the model's weights hash "
            f"is {source.weights_hash} (neither the edit's base nor its result). Export its base "
            "model, or pass check_base=False to write the edit's tensors over this model anyway."
        )
    live = hf_parameters(model, tied_aliases=True)
    unknown = [n for n in edit.names if n not in live]
    if unknown:
        raise KeyError(f"the edit names {unknown}, which are not editable parameters of this model")
    for name, value in edit.new_tensors.items():
        for other, param in live.items():
            if param is live[name]:  # tied names share one parameter: all take the new value
                state[other] = value
    return state


__all__ = ["NOTE_FILE", "NOTE_FORMAT", "NOTE_VERSION", "export_hf"]
