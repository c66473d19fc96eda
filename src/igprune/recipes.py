"""Named recipes: the fits igprune publishes, each a FitConfig with what it costs and what it measured.

`igprune fit --recipe NAME` runs one; `igprune recipes` lists them. A recipe earns its place by a published
result (benchmarks/RESULTS.md names the command); knobs under investigation live in research/.
"""

from __future__ import annotations

from dataclasses import dataclass

from igprune.choosing import ChooseConfig
from igprune.clustering import ClusterConfig
from igprune.config import DataConfig, FitConfig
from igprune.encoder import STATIC_ENCODER
from igprune.files import IGPruneError
from igprune.finders.l0 import TrainConfig
from igprune.finders.search import SearchConfig
from igprune.routing import RouteConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    cost: str  # wall time of the published fit, and how it grows
    measured: str  # the published result it gave, where RESULTS.md has it
    config: FitConfig


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("guided", "6 K-means clusters of 1,536 mixed passages, embedded by the static distillation of MiniLM "
           "(routing in half a millisecond); the global mask is SLEB on 16 x 128 tokens of the varied pool (fourteen "
           "other projects' code, docstrings and translations); each cluster continues its last quarter on rows half "
           "its own, half the other clusters' (no specialists), and leaves the global mask only for a mask clearly "
           "better on 16 fresh rows of its text; an input beyond every member of its nearest cluster keeps the "
           "global mask",
           "18 min for smollm2-135m at 15 of 60 and 45 min for qwen2.5-0.5b at 12 of 48, each alone on two CPU "
           "threads; a lazy search scores every block once, then a few per step, so time grows with (clusters + 4) "
           "x 2L x FLOPs per token, little with blocks removed",
           "smollm2-135m at 15 of 60: on source-disjoint text 8.0 ± 2.2% lower perplexity than sleb-b15-mixed, the "
           "best static mask, 1.0 ± 0.5% of it from routing (non-English 19% higher); level with it in-distribution "
           "(RESULTS.md)",
           FitConfig(recipe="guided", finder="search", data=DataConfig(samples=1536),
                     clusters=ClusterConfig(n_clusters=6, encoder=STATIC_ENCODER),
                     search=SearchConfig(samples=4, seq_len=128, packing="joined", shared_samples=16,
                                         shared_fraction=0.75, pooled=0.5, lazy=True, shared_source="varied"),
                     choose=ChooseConfig(samples=16), route=RouteConfig(gate=1.0))),
    Recipe("paper", "the paper's recipe: 16 K-means clusters, one hard-concrete (L0) mask per cluster trained with a "
           "Lagrangian sparsity constraint, nearest-centroid routing",
           "about 20 min on 2 CPU threads for smollm2-135m (4,096 passages, 264 steps of 16 x 64 tokens); linear in "
           "steps x model size, independent of the number of blocks",
           "six tasks at 15 of 60 blocks (limit 500): 94.06% of dense, +0.45 ± 1.43 points over EvoPress, the best "
           "static method, paired (RESULTS.md)",
           FitConfig(recipe="paper", finder="l0")),
    Recipe("fast", "a demo: the paper's recipe with 4 clusters, 400 passages and 70 short steps",
           "about 4 min on 2 CPU threads for smollm2-135m",
           "none: for trying the tool, not for results",
           FitConfig(recipe="fast", finder="l0", data=DataConfig(samples=400), clusters=ClusterConfig(n_clusters=4),
                     l0=TrainConfig(shared_steps=30, cluster_steps=40, batch_size=8, seq_len=64))),
]}
DEFAULT_RECIPE = "guided"


def recipe(name: str) -> FitConfig:
    """The named recipe's config; an unknown name is a one-line error listing the known ones."""
    if name not in RECIPES:
        raise IGPruneError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)} (igprune recipes)")
    return RECIPES[name].config
