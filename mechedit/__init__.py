"""mechedit: find where a transformer keeps a fact, a private record or a bias, and edit it there.

The pipeline is load -> locate -> select -> edit -> evaluate -> visualise. This top level exposes
the loading entry point; each stage lives in its own subpackage (``locate``, ``edit``,
``evaluate``, ``viz``) and the embedded default model, the fact world, in ``zoo``.
"""

from mechedit.models import ModelNotFoundError, load

__version__ = "0.1.0"

__all__ = ["ModelNotFoundError", "__version__", "load"]
