"""Cluster masks by search: SLEB run on each cluster's own text, from one shared global prefix.

The L0 trainer's cluster phase estimates each cluster's gradient from a few passages per step, so at a
small budget a cluster mask barely leaves the shared one (benchmarks/RESULTS.md). A search instead scores
every candidate mask exactly, on the cluster's own calibration tokens, so a cluster's mask moves where its
text asks. To keep the cost near one search per cluster's share of the steps, every cluster continues one
global search: SLEB removes its first `shared` units on equal shares of every cluster's sequences (or on passages
of another source, `shared_source`), then each cluster's SLEB removes the rest on that cluster's sequences (SLEB's
`start`). A search on one cluster's text alone finds a specialist, which can lose a third or more of its perplexity
on other text (research/disjoint); an input from a source the fit never read that lands in that cluster pays for
it. So with `pooled` > 0 a cluster's rows are partly its own and partly equal shares of the other clusters': the
mask it finds must serve its own text without giving up the rest. The pruner then chooses each cluster's mask among
all of them, the global one and any extra `candidates` (igprune.choosing).

    found = search_cluster_masks(model, tokenizer, groups, sparsity=0.25)   # groups: texts per cluster
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.blocks import block_name, num_blocks
from igprune.files import IGPruneError, sha256_tensors
from igprune.finders import Calibration, find_mask, make_calibration
from igprune.finders.base import Found, SearchSpace
from igprune.masks import Granularity, units_off
from igprune.scoring import Metric, Packing
from igprune.texts import Text


@dataclass(frozen=True)
class SearchConfig:
    """The search finder's settings.

    samples, seq_len: rows of each cluster's text every search scores masks on.
    packing: how rows are cut from texts (scoring.make_calibration); "texts" starts every row at a text's first
    token, as evaluation scores an input.
    shared_samples: rows, in equal shares of every cluster's, of the shared and the global search.
    shared_fraction: the share of the units to remove that the shared search removes before each cluster's search
    continues on its own rows (0: independent searches; 1: one mask for all).
    prefix: the shared units given instead of searched (an earlier SLEB bundle's first `logs.search.order`).
    global_order: the global mask's units (e.g. a static SLEB bundle's order); by default the shared search continues
    to all units on the pooled rows. With shared_fraction 1 and no prefix nothing is searched: every cluster starts
    from it and only chooses among it and the candidates.
    candidates: more masks to choose among, each as the blocks it skips (a static bundle's, `candidate_blocks`).
    metric: what every search minimises, "ppl" or "kl" (to the dense model); the choice is always by perplexity.
    pooled: the share of each cluster's `samples` rows taken from the other clusters' text (0: its own only).
    lazy: every search is SLEB's lazy step (finders.sleb): the same greedy path where removal costs compound, with
    about a fifth of the masks scored, so the same time buys more rows.
    shared_source: a calibration source (igprune.data) whose training passages the shared and global searches score
    on instead of the clusters' rows: `shared_samples` rows, each from a passage's first token. With "varied" (many
    sources no cluster is drawn from) the global mask holds on text of sources the fit never read (research/disjoint
    LOG 18); null: equal shares of the clusters' rows.
    """

    samples: int = 8
    seq_len: int = 64
    packing: Packing = "texts"
    shared_samples: int = 16
    shared_fraction: float = 0.5
    prefix: list[str] | None = None
    global_order: list[str] | None = None
    candidates: list[list[str]] | None = None
    metric: Metric = "ppl"
    pooled: float = 0.0
    lazy: bool = False
    shared_source: str | None = None

    def validate(self) -> None:
        if not 0.0 <= self.shared_fraction <= 1.0:
            raise IGPruneError(f"search.shared_fraction must be in [0, 1], got {self.shared_fraction}")
        if self.packing not in ("joined", "texts"):
            raise IGPruneError(f"search.packing must be 'joined' or 'texts', got {self.packing!r}")
        if self.metric not in ("ppl", "kl"):
            raise IGPruneError(f"search.metric must be 'ppl' or 'kl', got {self.metric!r}")
        if not 0.0 <= self.pooled < 1.0:
            raise IGPruneError(f"search.pooled must be in [0, 1), got {self.pooled}")
        if self.samples < 1 or self.shared_samples < 1 or self.seq_len < 2:
            raise IGPruneError("search.samples and search.shared_samples must be >= 1 and search.seq_len >= 2")
        if self.shared_source is not None:
            from igprune.data import CALIBRATION_SOURCES

            if self.shared_source not in CALIBRATION_SOURCES:
                raise IGPruneError(f"search.shared_source {self.shared_source!r} is not a calibration source; known: "
                                   f"{', '.join(CALIBRATION_SOURCES)}")


def search_cluster_masks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, groups: Sequence[list[Text]],
                         sparsity: float, granularity: Granularity = "block", seed: int = 0,
                         config: SearchConfig | None = None, with_global: bool = True,
                         checkpoint: str | Path | None = None, progress: bool = True) -> Found:
    """One block mask per group of texts from a shared prefix, and the global mask when `with_global` (given as
    config.global_order, or the shared search continued on every group's rows). With a `checkpoint` folder every
    search keeps its progress there and a rerun continues it."""
    config = config or SearchConfig()
    config.validate()
    if any(not texts for texts in groups):
        raise IGPruneError("every cluster needs at least one calibration text to search on")
    k = check_given_masks(model, sparsity, granularity, config.global_order, config.candidates)
    prefix, global_order = config.prefix, config.global_order
    if prefix is None and global_order is not None and config.shared_fraction == 1.0:
        prefix = global_order  # the whole mask is shared and given: nothing is left to search
    shared = len(prefix) if prefix is not None else int(round(config.shared_fraction * k))
    if shared > k:
        raise IGPruneError(f"the prefix names {shared} units but only {k} are to be switched off")
    folder = Path(checkpoint) if checkpoint else None
    own = [make_calibration(tokenizer, texts, config.samples, config.seq_len, seed, f"cluster{i}", config.packing)
           for i, texts in enumerate(groups)]
    search_global = with_global and global_order is None
    pooled = _shared_rows(tokenizer, own, config, seed) if prefix is None or search_global else None

    def sleb(calibration: Calibration, units: int, start: list[str], name: str) -> list[str]:
        if units == len(start):
            return start
        bundle = find_mask("sleb", model, tokenizer, [], sparsity * units / k, granularity, seed=seed,
                           progress=False, checkpoint=folder and folder / name, calibration=calibration, start=start,
                           metric=config.metric, lazy=config.lazy)
        return bundle.logs["search"]["order"]

    bar = tqdm(total=len(groups) + 1 + search_global, desc="mask searches", unit="search",
               disable=not distributed.shows_progress(progress))
    prefix = list(prefix) if prefix is not None else sleb(pooled, shared, [], "shared")
    bar.update(1)
    log: dict[str, Any] = {"finder": "search", "units_off": k, "shared_units": shared, "samples": config.samples,
                           "seq_len": config.seq_len, "packing": config.packing, "metric": config.metric,
                           "lazy": config.lazy,
                           "shared_calibration": pooled and pooled.info, "shared_order": prefix, "clusters": []}
    if search_global:
        global_order = sleb(pooled, k, prefix, "global")
        bar.update(1)
    masks = []
    for i, calibration in enumerate(_with_pooled(own, config.pooled)):
        order = sleb(calibration, k, prefix, f"cluster{i}")
        masks.append(find_order_mask(model, order, granularity))
        log["clusters"].append({"order": order, "calibration": calibration.info})
        bar.update(1)
    bar.close()
    extra = [find_order_mask(model, list(blocks), "block") for blocks in config.candidates or []]
    extra = torch.stack(extra) if extra else torch.ones(0, num_blocks(model), dtype=torch.bool)
    global_mask = None
    if with_global:
        log["global_order"] = list(global_order)
        log["candidates"] = [list(blocks) for blocks in config.candidates or []]
        global_mask = find_order_mask(model, global_order, granularity)
    return Found(torch.stack(masks), global_mask, extra, [c.texts for c in own], log)


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


def candidate_blocks(mask: torch.Tensor) -> list[str]:
    """The blocks a mask (B,) skips, by name: how a static bundle's mask joins `candidates`."""
    return [block_name(int(i)) for i in (~mask.to(torch.bool)).nonzero().flatten()]


def find_order_mask(model: PreTrainedModel, order: list[str], granularity: Granularity) -> torch.Tensor:
    """The block mask (B,) with the named units (SLEB's order, e.g. ["attn7", "ffn16"]) switched off."""
    space = SearchSpace(num_blocks(model), granularity)
    return space.mask([space.unit(name) for name in order])


def _with_pooled(own: list[Calibration], pooled: float) -> list[Calibration]:
    """Each cluster's search rows: its first (1 - pooled) share of its own rows, then equal shares of the others'
    (the same number of rows in all)."""
    if pooled == 0.0 or len(own) == 1:
        return own
    out = []
    for i, mine in enumerate(own):
        alike = [c for j, c in enumerate(own) if j != i and c.seq_len == mine.seq_len]
        if not alike:
            out.append(mine)
            continue
        taken = max(1, round(pooled * mine.n_sequences))
        kept = mine.n_sequences - taken
        others = _equal_shares(alike, taken)
        out.append(_stacked([(mine, j) for j in range(kept)] + [(others, j) for j in range(others.n_sequences)],
                            {**mine.info, "source": f"{mine.info['source']} and {pooled:g} pooled"}))
    return out


def _shared_rows(tokenizer: PreTrainedTokenizerBase, own: list[Calibration], config: SearchConfig,
                 seed: int) -> Calibration:
    """The shared and global searches' rows: equal shares of the clusters', or passages of config.shared_source."""
    if config.shared_source is None:
        return _equal_shares(own, config.shared_samples)
    from igprune.data import load_calibration

    # four passages per row: a passage shorter than a row is continued by the next, and the rows still fill
    texts = load_calibration(config.shared_source, limit=4 * config.shared_samples, seed=seed)
    return make_calibration(tokenizer, texts, config.shared_samples, config.seq_len, seed, config.shared_source,
                            "texts")


def _equal_shares(calibrations: list[Calibration], rows: int) -> Calibration:
    """`rows` sequences taken round-robin from the calibrations (their first rows first): equal shares."""
    full = [c for c in calibrations if c.seq_len == calibrations[0].seq_len]  # a too-short text gives one short row
    per = math.ceil(rows / len(full))
    picked = [(c, j) for j in range(per) for c in full if j < c.n_sequences][:rows]
    return _stacked(picked, {"source": f"equal shares of {len(calibrations)} clusters"})


def _stacked(picked: list[tuple[Calibration, int]], info: dict[str, Any]) -> Calibration:
    """One calibration of the given (calibration, row) pairs, in order."""
    tensor = torch.stack([c.input_ids[j] for c, j in picked])
    info = {**info, "sequences": len(picked), "seq_len": tensor.shape[1], "tokens": tensor.numel(),
            "sha256": sha256_tensors(tensor)}
    if all(c.scored is None for c, _ in picked):
        return Calibration(tensor, info)
    scored = torch.stack([torch.ones_like(c.input_ids[j], dtype=torch.bool) if c.scored is None else c.scored[j]
                          for c, j in picked])
    return Calibration(tensor, {**info, "scored_tokens": int(scored[:, 1:].sum())}, scored=scored)
