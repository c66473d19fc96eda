"""igprune: input-guided dynamic block pruning (IG-Pruning) for decoder-only LLMs."""

from igprune.files import IGPruneError
from igprune.models import ZOO, load_model

__all__ = ["ZOO", "IGPruneError", "load_model"]
__version__ = "0.1.0"
