"""igprune: input-guided dynamic block pruning (IG-Pruning) for decoder-only LLMs.

    import igprune
    pruner = igprune.IGPruner(model, tokenizer, "paper", sparsity=0.25).fit(texts)   # a recipe (igprune recipes)
    with igprune.masked(model, pruner.masks_[0]):     # the user's own model under one mask
        model.generate(**batch)

The heavy parts (torch, transformers) load on first use of a name below, so `import igprune`,
`igprune prepare` and `--help` stay quick.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from igprune.files import IGPruneError

if TYPE_CHECKING:
    from igprune.blocks import masked, masked_rows
    from igprune.bundle import Bundle
    from igprune.config import FitConfig
    from igprune.dynamic import DynamicPrunedModel
    from igprune.export import export_model, prune_model
    from igprune.finders import find_mask
    from igprune.models import ZOO, load_model, load_tokenizer
    from igprune.pruner import IGPruner
    from igprune.recipes import RECIPES, recipe
    from igprune.routing import Router
    from igprune.texts import Request

# public name -> the module that defines it
_PUBLIC = {
    "masked": "igprune.blocks",
    "masked_rows": "igprune.blocks",
    "IGPruner": "igprune.pruner",
    "FitConfig": "igprune.config",
    "recipe": "igprune.recipes",
    "RECIPES": "igprune.recipes",
    "DynamicPrunedModel": "igprune.dynamic",
    "Router": "igprune.routing",
    "Bundle": "igprune.bundle",
    "find_mask": "igprune.finders",
    "prune_model": "igprune.export",
    "export_model": "igprune.export",
    "ZOO": "igprune.models",
    "load_model": "igprune.models",
    "load_tokenizer": "igprune.models",
    "Request": "igprune.texts",
}

__all__ = ["IGPruneError", "masked", "masked_rows", "IGPruner", "FitConfig", "recipe", "RECIPES",
           "DynamicPrunedModel", "Router", "Bundle", "find_mask", "prune_model", "export_model", "ZOO", "load_model",
           "load_tokenizer", "Request"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'igprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
