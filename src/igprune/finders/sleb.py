"""SLEB (Song et al. 2024): remove units one at a time, each time the one whose removal hurts least.

At every step each remaining candidate is removed on top of the units already removed, and the removal
that gives the lowest calibration perplexity is kept; the next step starts from that mask. The
published method removes whole layers; block granularity treats attention and FFN as separate units.
`metric="kl"` judges removals by the mean per-token KL divergence from the dense model instead, which does not
count what the dense model cannot predict either (on code, benchmarks/domains.py found the same mask both ways).
A step scores all its candidates against one base mask, so each candidate reuses the base's layer
inputs up to its own layer (see Scorer.prefix) and costs on average about half a forward pass.

`start` extends an earlier search: the units it removed, in its order (a SLEB bundle's logs.search.order).
The greedy steps are deterministic, so on the same model and calibration data extending a search of k1
units to k2 gives exactly the search of k2 units, at the cost of the last k2 - k1 steps only.
With a checkpoint folder each finished step is saved, and an interrupted search continues from the last one.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from igprune.distributed import map_sharded
from igprune.files import IGPruneError
from igprune.finders.base import Problem, SearchResult
from igprune.scoring import Metric


def search(problem: Problem, start: Sequence[str] = (), metric: Metric = "ppl") -> SearchResult:
    if metric not in ("ppl", "kl"):
        raise IGPruneError(f"SLEB's metric must be 'ppl' or 'kl', not {metric!r}")
    space, scorer, k = problem.space, problem.scorer, problem.k
    candidates = space.candidates()
    saved = problem.saved("sleb", start=list(start), metric=metric)
    state = saved.load() or {"order": list(start), "steps": []}  # a checkpoint holds the steps done so far
    off, steps = [space.unit(name) for name in state["order"]], state["steps"]
    if len(set(off)) < len(off) or len(off) > k:
        raise IGPruneError(f"start names {len(off)} units ({len(set(off))} distinct); it must name at most the "
                           f"{k} to remove, each once")
    total = sum(len(candidates) - i for i in range(len(off), k))
    bar = tqdm(total=total, desc="sleb", unit="mask", disable=not problem.progress)
    for _ in range(len(off), k):
        with scorer.prefix(space.mask(off), metric=metric) as base:
            rest = [unit for unit in candidates if unit not in off]
            scores = dict(zip(rest, map_sharded(lambda unit: scorer.score(space.mask([*off, unit]), metric), rest),
                              strict=True))  # under torchrun each rank scores its share of the candidates
            bar.update(len(rest))
        best = min(scores, key=lambda u: (scores[u], u))
        off.append(best)
        steps.append({"removed": space.name(best), "metric": metric, "score": scores[best], "before": base,
                      "runner_up": sorted(scores.values())[1] if len(scores) > 1 else None})
        saved.save({"order": [space.name(u) for u in off], "steps": steps})
        bar.set_postfix(removed=space.name(best), **{metric: f"{scores[best]:.3g}"})
    bar.close()
    # find_mask adds the masks scored
    return SearchResult(off, {"start": list(start), "metric": metric, "steps": steps})
