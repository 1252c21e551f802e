"""mechedit: find where a transformer keeps a fact, a private record or a bias, and edit it there.

The pipeline is load -> locate -> select -> edit -> evaluate -> visualise. The top level holds
the shared core's main names; each stage lives in its own subpackage (``locate``, ``edit``,
``evaluate``, ``viz``) and the embedded default model, the fact world, in ``zoo``.

The names below are imported on first use (PEP 562), so ``import mechedit`` and the command line's
``--help`` do not pay for torch and TransformerLens until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "circuit_size": "mechedit.budget",
    "grow_to_budget": "mechedit.budget",
    "Circuit": "mechedit.circuit",
    "Component": "mechedit.components",
    "load_counterfact": "mechedit.data",
    "load_known": "mechedit.data",
    "Intervention": "mechedit.interventions",
    "patch": "mechedit.interventions",
    "ModelNotFoundError": "mechedit.models",
    "load": "mechedit.models",
    "FactPrompt": "mechedit.prompts",
    "PromptPair": "mechedit.prompts",
    "Scores": "mechedit.scores",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from mechedit.budget import circuit_size, grow_to_budget
    from mechedit.circuit import Circuit
    from mechedit.components import Component
    from mechedit.data import load_counterfact, load_known
    from mechedit.interventions import Intervention, patch
    from mechedit.models import ModelNotFoundError, load
    from mechedit.prompts import FactPrompt, PromptPair
    from mechedit.scores import Scores


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mechedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Circuit",
    "Component",
    "FactPrompt",
    "Intervention",
    "ModelNotFoundError",
    "PromptPair",
    "Scores",
    "__version__",
    "circuit_size",
    "grow_to_budget",
    "load",
    "load_counterfact",
    "load_known",
    "patch",
]
