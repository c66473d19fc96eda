"""EvoPress (Sieberling et al. 2024): evolutionary search over masks with a fixed number of skipped units.

Each generation makes `offspring` children of the current parent; a child swaps one skipped unit with
one kept unit of the same kind (attention for attention, FFN for FFN), so the counts never change.
Children are then selected in stages of growing token budgets: every stage but the last scores the
survivors of the previous stage on a fresh random subset of calibration sequences and keeps the best
few; the last stage scores them, together with the parent, on all calibration sequences and keeps one.
The parent always competes in the last stage, whose data never changes, so the best fitness never
gets worse (elitism). Fitness is the KL divergence of the masked model's next-token distribution to
the dense model's (top-k cached, see scoring), or perplexity.

At block granularity the split between skipped attention and skipped FFN blocks must be chosen, as
EvoPress's level database does per layer. The initial population is drawn at `splits` evenly spaced
attention counts over the feasible range (both extremes included), `population` random masks in all;
it goes through the same staged selection, and the winner's split stays fixed for the whole search.
`attn_off` fixes the split instead.

With a checkpoint folder the state after each generation (parent, history, fitness cache and the random
stream) is saved, so an interrupted search continues exactly as if it had not stopped.
"""

from __future__ import annotations

import random

from tqdm.auto import tqdm

from igprune.distributed import map_sharded
from igprune.files import IGPruneError
from igprune.finders.base import Problem, SearchResult, SearchSpace

Key = tuple[int, ...]  # sorted units switched off


def search(problem: Problem, generations: int = 30, offspring: int = 8, stages: list[list[int]] | None = None,
           fitness: str = "kl", population: int = 16, splits: int = 5, attn_off: int | None = None) -> SearchResult:
    """stages: [sequences, survivors] for each stage before the last (default [[1, 2]])."""
    space, scorer, k = problem.space, problem.scorer, problem.k
    stages = [[1, 2]] if stages is None else [list(s) for s in stages]
    if any(len(s) != 2 or s[0] < 1 or s[1] < 1 for s in stages) or generations < 0 or offspring < 1 or population < 1:
        raise IGPruneError("evopress needs stages of [sequences >= 1, survivors >= 1], generations >= 0, "
                           "offspring >= 1 and population >= 1")
    if fitness not in ("kl", "ppl"):
        raise IGPruneError(f"evopress fitness must be kl or ppl, not {fitness!r}")
    rng = random.Random(problem.seed)
    final: dict[Key, float] = {}  # fitness on all sequences: deterministic, so cached

    def select(children: list[Key], parent: Key | None) -> Key:
        for n_rows, keep in stages:
            if len(children) <= keep:
                continue
            rows = sorted(rng.sample(range(scorer.calibration.n_sequences),
                                     min(n_rows, scorer.calibration.n_sequences)))
            values = map_sharded(lambda c, rows=rows: scorer.score(space.mask(c), fitness, rows), children)
            scored = dict(zip(children, values, strict=True))
            children = sorted(children, key=lambda c: (scored[c], c))[:keep]
        new = [c for c in dict.fromkeys([*children, *([parent] if parent is not None else [])]) if c not in final]
        final.update(zip(new, map_sharded(lambda c: scorer.score(space.mask(c), fitness), new), strict=True))
        return min({*children, *([parent] if parent is not None else [])}, key=lambda c: (final[c], c))

    saved = problem.saved("evopress", generations=generations, offspring=offspring, stages=stages, fitness=fitness,
                          population=population, splits=splits, attn_off=attn_off)

    def save() -> None:  # after the initial population and after each generation
        saved.save({"parent": parent, "history": history, "initial_population": n_initial,
                    "final": list(final.items()), "rng": rng.getstate()})

    state = saved.load()
    if state:  # continue after the last saved generation, with the random stream where it was
        version, internal, gauss = state["rng"]
        rng.setstate((version, tuple(internal), gauss))
        final.update((tuple(c), f) for c, f in state["final"])
        parent, history, n_initial = tuple(state["parent"]), state["history"], state["initial_population"]
    else:
        initial = _initial_population(space, k, population, splits, attn_off, rng)
        parent, n_initial = select(initial, None), len(initial)
        history = [{"generation": 0, "best": final[parent], "accepted": True,
                    "off": [space.name(u) for u in parent]}]
        save()
    bar = tqdm(range(len(history), generations + 1), desc="evopress", unit="gen", disable=not problem.progress)
    for generation in bar:
        children = _offspring(space, parent, offspring, rng)
        best = select(children, parent)
        history.append({"generation": generation, "best": final[best], "accepted": best != parent,
                        "off": [space.name(u) for u in best]})
        parent = best
        save()
        bar.set_postfix(fitness=f"{final[parent]:.4f}")
    split = {kind: sum(space.kind(u) == kind for u in parent) for kind in ("attn", "ffn", "layer")}
    log = {"fitness": fitness, "generations": history, "best_fitness": final[parent],
           "split": {k_: v for k_, v in split.items() if v}, "initial_population": n_initial,
           "stages": stages, "offspring": offspring}
    return SearchResult(list(parent), log)


def _random_mask(units_by_kind: dict[str, list[int]], counts: dict[str, int], rng: random.Random) -> Key:
    return tuple(sorted(u for kind, n in counts.items() for u in rng.sample(units_by_kind[kind], n)))


def _kinds(space: SearchSpace) -> dict[str, list[int]]:
    kinds: dict[str, list[int]] = {}
    for u in space.candidates():
        kinds.setdefault(space.kind(u), []).append(u)
    return kinds


def _initial_population(space: SearchSpace, k: int, population: int, splits: int, attn_off: int | None,
                        rng: random.Random) -> list[Key]:
    kinds = _kinds(space)
    if space.granularity == "layer":
        plans = [{"layer": k}]
    else:
        n_attn, n_ffn = len(kinds.get("attn", [])), len(kinds.get("ffn", []))
        low, high = max(0, k - n_ffn), min(k, n_attn)
        if attn_off is not None:
            if not low <= attn_off <= high:
                raise IGPruneError(f"attn_off must lie in [{low}, {high}] to skip {k} blocks in all")
            choices = [attn_off]
        else:
            count = max(1, min(splits, high - low + 1))
            choices = sorted({round(low + i * (high - low) / max(1, count - 1)) for i in range(count)})
        plans = [{"attn": a, "ffn": k - a} for a in choices]
    seen: set[Key] = set()
    for i in range(100 * population):
        if len(seen) >= population:
            break
        seen.add(_random_mask(kinds, plans[i % len(plans)], rng))
    return sorted(seen)


def _offspring(space: SearchSpace, parent: Key, n: int, rng: random.Random) -> list[Key]:
    """Up to n distinct children, each one same-kind swap away from the parent."""
    kinds = _kinds(space)
    kept = {kind: [u for u in units if u not in parent] for kind, units in kinds.items()}
    swappable = [u for u in parent if kept[space.kind(u)]]
    children: set[Key] = set()
    if not swappable:
        return []
    for _ in range(20 * n):
        if len(children) >= n:
            break
        out = rng.choice(swappable)
        into = rng.choice(kept[space.kind(out)])
        children.add(tuple(sorted([*(u for u in parent if u != out), into])))
    return sorted(children)
