"""Cluster masks by search: SLEB run on each cluster's own text, from one shared global prefix.

The L0 trainer's cluster phase estimates each cluster's gradient from a few passages per step, so at a
small budget a cluster mask barely leaves the shared one (benchmarks/RESULTS.md). A search instead scores
every candidate mask exactly, on the cluster's own calibration tokens, so a cluster's mask moves where its
text asks. To keep the cost near one search per cluster's share of the steps, every cluster continues one
global search: SLEB removes its first `shared` units on equal shares of every cluster's sequences, then each
cluster's SLEB removes the rest on that cluster's sequences alone (SLEB's `start`). Last, each cluster's
mask is chosen among all the clusters' masks and the global one on cluster text no search scored: a search
on a few hundred tokens fits their noise, and a cluster should leave the global mask only where its text
really asks (choose_masks). Other masks may join that choice (`candidates`, e.g. the static masks other
finders found: EvoPress or SLEB on other text), so a cluster takes one of them where its text prefers it.

    masks, log = search_cluster_masks(model, tokenizer, groups, sparsity=0.25)   # groups: texts per cluster
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.baselines import Calibration, find_mask, make_calibration
from igprune.baselines.base import SearchSpace
from igprune.baselines.scoring import Metric, Packing
from igprune.blocks import block_name, num_blocks
from igprune.files import IGPruneError, sha256_tensors
from igprune.masks import Granularity, mask_row, units_off
from igprune.stage1.pruner import SEARCH_DEFAULTS, Margin, check_margin, check_search
from igprune.texts import Text


def search_cluster_masks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, groups: Sequence[list[Text]],
                         sparsity: float, granularity: Granularity = "block", seed: int = 0,
                         shared_fraction: float = SEARCH_DEFAULTS["shared_fraction"],
                         samples: int = SEARCH_DEFAULTS["samples"], seq_len: int = SEARCH_DEFAULTS["seq_len"],
                         packing: Packing = SEARCH_DEFAULTS["packing"],
                         shared_samples: int = SEARCH_DEFAULTS["shared_samples"],
                         prefix: Sequence[str] | None = SEARCH_DEFAULTS["prefix"],
                         global_order: Sequence[str] | None = SEARCH_DEFAULTS["global_order"],
                         choose_samples: int = SEARCH_DEFAULTS["choose_samples"],
                         choose_margin: Margin = SEARCH_DEFAULTS["choose_margin"],
                         candidates: Sequence[Sequence[str]] | None = SEARCH_DEFAULTS["candidates"],
                         metric: Metric = SEARCH_DEFAULTS["metric"],
                         checkpoint: str | Path | None = None,
                         progress: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """One block mask per group of texts (N, B), and the searches' logs.

    shared_fraction: the share of the units to remove that the shared search removes, before each group's
    search continues on its own sequences (0: independent searches; 1: one static mask for all).
    prefix: the shared units given instead of searched, e.g. an earlier SLEB bundle's first units
    (`logs.search.order`); then shared_fraction is not used.
    choose_samples: each group's mask is then chosen (choose_masks) among every group's mask and the global
    one on that many sequences of the group's text that no search scored, so a group keeps its own mask
    only where it generalises and otherwise stays with the global mask or takes a neighbour's; 0 keeps
    every group's own search result.
    choose_margin: a cluster leaves the global mask only for a candidate better on its fresh text by more than
    this many paired standard errors (choose_masks' margin); 0 takes whichever scores lowest; "auto" the
    Bonferroni margin for the rows and candidates (bonferroni_margin).
    global_order: the global mask's units, e.g. a static SLEB bundle's order whose first units are `prefix`;
    by default, when choosing, the shared search continues to all units on the pooled sequences. With
    shared_fraction 1 and no prefix, every group starts from it and nothing is searched: each group only chooses
    among it and the `candidates`.
    candidates: more masks to choose among, each as the blocks it skips (e.g. ["attn7", "ffn16", ...]; a static
    bundle's, `candidate_blocks`); each must skip as many blocks as the cluster masks.
    packing: how calibration rows are cut from each group's texts (scoring.make_calibration); "texts" starts
    every row at a text's first token, as evaluation scores an input.
    metric: what every SLEB search minimises, "ppl" or "kl" (to the dense model; sleb.search); the choice is
    always by perplexity on the fresh text, as held-out text is scored.
    With a `checkpoint` folder every search keeps its progress there and a rerun continues it.
    """
    check_search({"shared_fraction": shared_fraction, "choose_samples": choose_samples, "candidates": candidates,
                  "metric": metric, "choose_margin": choose_margin})
    if any(not texts for texts in groups):
        raise IGPruneError("every cluster needs at least one calibration text to search on")
    k = check_given_masks(model, sparsity, granularity, global_order, candidates)
    if prefix is None and global_order is not None and shared_fraction == 1.0:
        prefix = global_order  # the whole mask is shared and given: nothing is left to search
    shared = len(prefix) if prefix is not None else int(round(shared_fraction * k))
    if shared > k:
        raise IGPruneError(f"the prefix names {shared} units but only {k} are to be switched off")
    extra = [find_order_mask(model, list(blocks), "block") for blocks in candidates or []]
    folder = Path(checkpoint) if checkpoint else None
    own = [make_calibration(tokenizer, texts, samples, seq_len, seed, f"cluster{i}", packing)
           for i, texts in enumerate(groups)]
    search_global = choose_samples > 0 and global_order is None
    pooled = _equal_shares(own, shared_samples) if prefix is None or search_global else None  # shared search only

    def sleb(calibration: Calibration, units: int, start: list[str], name: str) -> list[str]:
        if units == len(start):
            return start
        bundle = find_mask("sleb", model, tokenizer, [], sparsity * units / k, granularity, seed=seed,
                           progress=False, checkpoint=folder and folder / name, calibration=calibration, start=start,
                           metric=metric)
        return bundle.logs["search"]["order"]

    bar = tqdm(total=len(groups) + 1 + search_global + (choose_samples > 0), desc="mask searches", unit="search",
               disable=not distributed.shows_progress(progress))
    prefix = list(prefix) if prefix is not None else sleb(pooled, shared, [], "shared")
    bar.update(1)
    logs: dict[str, Any] = {"finder": "sleb", "units_off": k, "shared_units": shared, "samples": samples,
                            "seq_len": seq_len, "packing": packing, "metric": metric,
                            "shared_calibration": pooled and pooled.info, "shared_order": prefix, "clusters": []}
    if search_global:
        global_order = sleb(pooled, k, prefix, "global")
        bar.update(1)
    masks = []
    for i, calibration in enumerate(own):
        order = sleb(calibration, k, prefix, f"cluster{i}")
        masks.append(find_order_mask(model, order, granularity))
        logs["clusters"].append({"order": order, "calibration": calibration.info})
        bar.update(1)
    masks = torch.stack(masks)
    if choose_samples > 0:
        logs["global_order"] = list(global_order)
        logs["candidates"] = [list(blocks) for blocks in candidates or []]
        pool = torch.stack([*masks, find_order_mask(model, global_order, granularity), *extra])
        masks, logs["choose"] = choose_masks(model, tokenizer, groups, pool, choose_samples, seq_len,
                                             exclude=[c.texts for c in own], seed=seed, packing=packing,
                                             default=len(groups), margin=choose_margin)
        bar.update(1)
    bar.close()
    return masks, logs


def check_given_masks(model: PreTrainedModel, sparsity: float, granularity: Granularity,
                      global_order: Sequence[str] | None, candidates: Sequence[Sequence[str]] | None) -> int:
    """The units a search switches off; a given global or candidate mask that skips another number is a one-line
    error. IGPruner.fit asks before it embeds anything, so a wrong bundle costs no wait and leaves no checkpoint."""
    k = units_off(sparsity, num_blocks(model), granularity)
    if global_order is not None and len(global_order) != k:
        raise IGPruneError(f"the global mask skips {len(global_order)} units but {k} are to be switched off: give "
                           "one found at the same sparsity")
    blocks_off = k if granularity == "block" else 2 * k
    skipped = {int((~find_order_mask(model, list(blocks), "block")).sum()) for blocks in candidates or []}
    if skipped - {blocks_off}:
        raise IGPruneError(f"every extra candidate must skip {blocks_off} blocks, as the cluster masks do; got "
                           f"{sorted(skipped)}")
    return k


def choose_masks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, groups: Sequence[list[Text]],
                 candidates: torch.Tensor, samples: int = 8, seq_len: int = 64,
                 exclude: Sequence[Collection[Text]] | None = None, seed: int = 0,
                 packing: Packing = "joined", default: int | None = None,
                 margin: Margin = 0.0) -> tuple[torch.Tensor, dict[str, Any]]:
    """For each group i, the candidate mask with the lowest perplexity on `samples` x `seq_len` tokens of
    group i's texts outside `exclude[i]` (the texts its search scored); a tie keeps candidate i, its own.

    A search on a few hundred tokens fits their noise: its mask wins on them and may lose on the group's other
    text to another group's mask or the global one (benchmarks/RESULTS.md, the domain benchmark). Judging every
    candidate on fresh tokens of the group keeps a group's own mask only where it generalises.
    default, margin: a group leaves candidate `default` (the global mask) only for a candidate whose mean
    per-token NLL on the fresh rows is lower by more than `margin` paired standard errors over those rows, so
    a cluster whose text does not clearly ask for another mask keeps the one every input does well with.
    margin "auto": the Bonferroni margin (bonferroni_margin) for the cluster's rows and the distinct candidates
    other than the default, so the bar rises with the number of masks that could win by chance and falls as the
    rows grow.
    """
    from igprune.baselines import Scorer

    check_margin(margin)
    if margin != 0 and default is None:
        raise IGPruneError("a choice margin needs the default candidate (the global mask) to leave")
    keys = [mask_row(m) for m in candidates]  # several clusters often share a mask: score each once
    alternatives = len(set(keys)) - 1
    chosen, table, z_table, margins = [], [], [], []
    for i, texts in enumerate(groups):
        searched = set(exclude[i]) if exclude else set()
        fresh = [t for t in texts if t not in searched]
        if not fresh:
            raise IGPruneError(f"cluster {i} has no text beyond what its search scored to choose its mask on; "
                               "give more calibration text, or choose_samples=0 (--choose-samples 0)")
        fresh_rows = make_calibration(tokenizer, fresh, samples, seq_len, seed, f"cluster{i} fresh", packing)
        scorer = Scorer(model, fresh_rows)
        first: dict[str, torch.Tensor] = {}
        for key, m in zip(keys, candidates, strict=True):
            first.setdefault(key, m)
        # each distinct mask once; under torchrun each rank scores its share
        distinct = dict(zip(first, distributed.map_sharded(scorer.row_nll, list(first.values())), strict=True))
        rows = [distinct[key] for key in keys]
        scores = [math.exp(sum(x for x, _ in r) / sum(n for _, n in r)) for r in rows]
        best = min(range(len(scores)), key=lambda j: (scores[j], j != i))
        z = None if default is None else _paired_z(rows[default], rows[best])
        bar = bonferroni_margin(fresh_rows.n_sequences, alternatives) if margin == "auto" else margin
        if bar > 0 and best != default and not z > bar:
            best = default
        chosen.append(best)
        table.append(scores)
        z_table.append(z)
        margins.append(bar)
    log = {"chosen": chosen, "perplexity": table, "samples": samples, "seq_len": seq_len, "packing": packing}
    if default is not None:
        log.update({"default": default, "margin": margin, "z_best_vs_default": z_table})
        if margin == "auto":
            log["margins"] = margins
    return candidates[chosen], log


def describe_choice(log: dict[str, Any], n_clusters: int) -> list[str]:
    """Per cluster, which mask its choice took and how surely, for `igprune inspect`: "own", "cluster j",
    "global" or "candidate c" (search_cluster_masks' pool order: cluster masks, the global one, candidates), then
    the best mask's paired z against the global one and the bar it had to clear."""
    bars = log.get("margins") or [log.get("margin")] * len(log["chosen"])
    zs = log.get("z_best_vs_default") or [None] * len(log["chosen"])
    said = []
    for k, (j, z, bar) in enumerate(zip(log["chosen"], zs, bars, strict=True)):
        name = ("own" if j == k else f"cluster {j}") if j < n_clusters else (
            "global" if j == n_clusters else f"candidate {j - n_clusters}")
        said.append(name if z is None else f"{name} (z {z:.3f}" + ("" if bar is None else f", bar {bar:.3f}") + ")")
    return said


def bonferroni_margin(rows: int, alternatives: int, alpha: float = 0.05) -> float:
    """The paired z a choice's best candidate must beat: the one-sided t quantile at alpha / alternatives with
    rows - 1 degrees of freedom. Choosing the best of `alternatives` masks that are no better than the default
    then leaves it with probability at most alpha (Bonferroni); with under two rows nothing can leave it."""
    from scipy.stats import t

    return math.inf if rows < 2 else float(t.ppf(1 - alpha / max(alternatives, 1), rows - 1))


def _paired_z(base: list[tuple[float, float]], other: list[tuple[float, float]]) -> float:
    """How many paired standard errors lower `other`'s mean per-token NLL per row is than `base`'s (0 if same)."""
    gains = [b / nb - o / no for (b, nb), (o, no) in zip(base, other, strict=True)]
    mean = sum(gains) / len(gains)
    if len(gains) < 2:
        return 0.0
    se = math.sqrt(sum((g - mean) ** 2 for g in gains) / (len(gains) - 1) / len(gains))
    return mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))


def candidate_blocks(mask: torch.Tensor) -> list[str]:
    """The blocks a mask (B,) skips, by name: how a static bundle's mask joins `candidates`."""
    return [block_name(int(i)) for i in (~mask.to(torch.bool)).nonzero().flatten()]


def find_order_mask(model: PreTrainedModel, order: list[str], granularity: Granularity) -> torch.Tensor:
    """The block mask (B,) with the named units (SLEB's order, e.g. ["attn7", "ffn16"]) switched off."""
    space = SearchSpace(num_blocks(model), granularity)
    return space.mask([space.unit(name) for name in order])


def _equal_shares(calibrations: list[Calibration], rows: int) -> Calibration:
    """`rows` sequences taken round-robin from the calibrations (their first rows first): equal shares."""
    full = [c for c in calibrations if c.seq_len == calibrations[0].seq_len]  # a too-short text gives one short row
    per = math.ceil(rows / len(full))
    picked = [(c, j) for j in range(per) for c in full if j < c.n_sequences][:rows]
    tensor = torch.stack([c.input_ids[j] for c, j in picked])
    info = {"source": f"equal shares of {len(calibrations)} clusters", "sequences": len(picked),
            "seq_len": tensor.shape[1], "tokens": tensor.numel(), "sha256": sha256_tensors(tensor)}
    if all(c.scored is None for c, _ in picked):
        return Calibration(tensor, info)
    scored = torch.stack([torch.ones_like(c.input_ids[j], dtype=torch.bool) if c.scored is None else c.scored[j]
                          for c, j in picked])
    return Calibration(tensor, {**info, "scored_tokens": int(scored[:, 1:].sum())}, scored=scored)
