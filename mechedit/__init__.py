"""mechedit: find where a transformer keeps a fact, a private record or a bias, and edit it there.

The pipeline is load -> locate -> select -> edit -> evaluate -> visualise. The top level holds
the shared core's main names; each stage lives in its own subpackage (``locate``, ``edit``,
``evaluate``, ``viz``) and the embedded default model, the fact world, in ``zoo``.
"""

from mechedit.budget import circuit_size, grow_to_budget
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.data import load_counterfact, load_known
from mechedit.interventions import Intervention, patch
from mechedit.models import ModelNotFoundError, load
from mechedit.prompts import FactPrompt, PromptPair
from mechedit.scores import Scores

__version__ = "0.1.0"

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
