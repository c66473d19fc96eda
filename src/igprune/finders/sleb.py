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

`lazy=True` scores fewer candidates per step, so the same time buys more calibration rows: each unit keeps the
cost its removal had when last scored (its score minus that step's base score), candidates are scored in order of
that cost, and a step stops once the best fresh score is at most the base plus the next candidate's last cost.
Where removing more units never makes a removal cheaper (damage compounds), this is exactly SLEB's greedy step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from igprune.distributed import map_sharded
from igprune.files import IGPruneError
from igprune.finders.base import Problem, SearchResult
from igprune.scoring import Metric


def search(problem: Problem, start: Sequence[str] = (), metric: Metric = "ppl", lazy: bool = False) -> SearchResult:
    if metric not in ("ppl", "kl"):
        raise IGPruneError(f"SLEB's metric must be 'ppl' or 'kl', not {metric!r}")
    if not isinstance(lazy, bool):
        raise IGPruneError(f"SLEB's lazy must be true or false, not {lazy!r}")
    space, scorer, k = problem.space, problem.scorer, problem.k
    candidates = space.candidates()
    saved = problem.saved("sleb", start=list(start), metric=metric, **({"lazy": True} if lazy else {}))
    state = saved.load() or {"order": list(start), "steps": [], "costs": {}}  # the steps done so far
    off, steps, costs = [space.unit(name) for name in state["order"]], state["steps"], state.get("costs", {})
    if len(set(off)) < len(off) or len(off) > k:
        raise IGPruneError(f"start names {len(off)} units ({len(set(off))} distinct); it must name at most the "
                           f"{k} to remove, each once")
    total = None if lazy else sum(len(candidates) - i for i in range(len(off), k))  # lazy: unknown in advance
    bar = tqdm(total=total, desc="sleb", unit="mask", disable=not problem.progress)
    for _ in range(len(off), k):
        with scorer.prefix(space.mask(off), metric=metric) as base:
            rest = [unit for unit in candidates if unit not in off]
            scores = _step(rest, lambda unit: scorer.score(space.mask([*off, unit]), metric), base,
                           {unit: costs.get(space.name(unit), float("-inf")) for unit in rest} if lazy else None)
            bar.update(len(scores))
        best = min(scores, key=lambda u: (scores[u], u))
        off.append(best)
        costs.update({space.name(unit): score - base for unit, score in scores.items()})
        steps.append({"removed": space.name(best), "metric": metric, "score": scores[best], "before": base,
                      "runner_up": sorted(scores.values())[1] if len(scores) > 1 else None, "scored": len(scores)})
        saved.save({"order": [space.name(u) for u in off], "steps": steps, "costs": costs})
        bar.set_postfix(removed=space.name(best), **{metric: f"{scores[best]:.3g}"})
    bar.close()
    # find_mask adds the masks scored
    return SearchResult(off, {"start": list(start), "metric": metric, "steps": steps})


def _step(rest: list[Any], score: Callable[[Any], float], base: float, costs: dict[Any, float] | None,
          chunk: int = 4) -> dict[Any, float]:
    """The scores of one greedy step: every candidate's, or with `costs` (each candidate's last known cost, -inf
    if never scored) only those whose last cost says they might still beat the best fresh score."""
    if costs is None:  # under torchrun each rank scores its share of the candidates
        return dict(zip(rest, map_sharded(score, rest), strict=True))
    ranked = sorted(rest, key=lambda unit: (costs[unit], unit))
    scores: dict[Any, float] = {}
    while ranked and (not scores or base + costs[ranked[0]] < min(scores.values())):
        batch, ranked = ranked[:chunk], ranked[chunk:]
        scores.update(zip(batch, map_sharded(score, batch), strict=True))
    return scores
