"""The one protocol every edit kind follows, so evaluation and trainers never ask which kind.

Activation edits (``ActivationEdit``: hooks, nothing in the weights) and weight edits
(``WeightEdit``: new values of HF parameters) both are ``Edit``::

    edit.apply(model)            # edit the model in place (hooks or weights); returns the edit
    edit.revert(model)           # undo exactly that (weights: bit-exactly)
    with edit.applied(model):    # apply for the block, revert on exit, also after an error
        ...
    edit.save("runs/x/edit")     # a folder: manifest.json (+ safetensors)
    Kind.load("runs/x/edit")     # back, checked; ``load_edit`` picks the kind from the manifest

Applying a loaded edit to a model whose weights differ from the model it was built on is
refused (``BaseModelMismatchError``) unless ``check_base=False``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mechedit.edit.weights import EditFormatError


@runtime_checkable
class Edit(Protocol):
    """A reversible change of a model: ``apply`` / ``revert`` / ``applied`` / ``save`` / ``load``."""

    @property
    def is_applied(self) -> bool:
        """True between ``apply`` and ``revert``."""
        ...

    def apply(self, model: Any) -> Edit:
        """Change ``model`` in place; raises ``EditStateError`` if already applied."""
        ...

    def revert(self, model: Any) -> None:
        """Undo what ``apply`` did to ``model``."""
        ...

    def applied(self, model: Any) -> AbstractContextManager[Any]:
        """A context manager: applied inside the block, reverted on exit."""
        ...

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the edit to a folder; returns it."""
        ...

    @classmethod
    def load(cls, edit_dir: str | os.PathLike) -> Edit:
        """Read a folder written by ``save``; raises ``EditFormatError`` when malformed."""
        ...


def load_edit(edit_dir: str | os.PathLike) -> Edit:
    """Load a saved edit of any kind, chosen by the ``format`` of its ``manifest.json``."""
    from mechedit.edit import activation, weights

    kinds = {weights.FORMAT: weights.WeightEdit, activation.FORMAT: activation.ActivationEdit}
    path = Path(edit_dir) / "manifest.json"
    try:
        fmt = json.loads(path.read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError) as err:
        raise EditFormatError(
            f"{path} is not a readable edit manifest ({err}); pass a folder written by edit.save"
        ) from None
    if fmt not in kinds:
        raise EditFormatError(f"{path}: format {fmt!r} is not an edit; known: {sorted(kinds)}")
    return kinds[fmt].load(edit_dir)


@contextlib.contextmanager
def applied_edit(model: Any, edit: Edit | Callable[[], AbstractContextManager[Any]]) -> Iterator[None]:
    """Run the block with ``edit`` applied to ``model``, reverted on exit (also after an error).

    ``edit`` is an ``Edit`` (weight or activation edit) or a callable returning a context manager
    (a control that is not an ``Edit``, e.g. ``locate.depn.perturb_neurons``); evaluation suites
    take either.
    """
    if isinstance(edit, Edit):
        with edit.applied(model):
            yield
    elif callable(edit):
        with edit():
            yield
    else:
        raise TypeError(
            "edit must be an Edit (a WeightEdit, or an activation edit such as "
            f"ablate(model, circuit)) or a callable returning a context manager; got {type(edit).__name__}"
        )


__all__ = ["Edit", "applied_edit", "load_edit"]
