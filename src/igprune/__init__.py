"""igprune: input-guided dynamic block pruning (IG-Pruning) for decoder-only LLMs.

The heavy parts (torch, transformers) load on first use, so `igprune prepare` and `--help` stay quick.
"""

from igprune.files import IGPruneError

__all__ = ["ZOO", "IGPruneError", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("ZOO", "load_model"):
        from igprune import models

        return getattr(models, name)
    raise AttributeError(f"module 'igprune' has no attribute {name!r}")
