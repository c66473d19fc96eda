"""Static depth-pruning baselines as data: a registry of methods and one entry point, `find_mask`.

    bundle = find_mask("sleb", model, tokenizer, texts, sparsity=0.25, granularity="block")
    bundle.save("runs/sleb-b15")      # the same bundle format as IG-Pruning, with one cluster

Every method uses the same gating (blocks.patch), the same sparsity (skipped blocks / 2L) and the same
calibration sequences (scoring.make_calibration); each entry below says what it defaults to. Options a
method does not know are refused. Calibration defaults are sized for smollm2-135m on two CPU cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.blocks import num_blocks
from igprune.bundle import Bundle, fingerprint
from igprune.files import IGPruneError
from igprune.finders import evopress, shortened, sleb, static_l0
from igprune.finders.base import Problem, SearchResult, SearchSpace
from igprune.masks import Granularity, n_units, skipped_blocks, units_off
from igprune.scoring import Calibration, Scorer, make_calibration

# Options every method takes: calibration size and packing (scoring.make_calibration), scoring batch, and
# layers kept out of the candidates.
COMMON = {"samples": 16, "seq_len": 128, "packing": "joined", "batch_size": 8, "keep_first": 0, "keep_last": 0}


@dataclass(frozen=True)
class Method:
    """One static method: how to search, what it defaults to, where it comes from."""

    name: str
    search: Callable[..., SearchResult]
    summary: str
    reference: str
    granularity: Granularity  # the published one
    defaults: dict[str, Any] = field(default_factory=dict)  # COMMON overrides and method options
    resumes: bool = False  # saves its progress in a checkpoint folder and continues from it

    def options(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with the given options; an option this method does not know is an error."""
        known = {**COMMON, **self.defaults}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise IGPruneError(f"{self.name} has no option {', '.join(unknown)}; its options: {', '.join(known)}")
        return {**known, **given}


# Calibration sizes and search budgets keep every method under ~30 min on smollm2-135m at 15 of 60 blocks
# on two shared CPU cores (research/baseline-cost/baseline_cost.py); on a GPU raise them towards the published ones.
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("sleb", sleb.search, "greedy: remove the unit whose removal gives the lowest perplexity, repeat",
           "Song et al. 2024, SLEB", "layer",
           {"samples": 4, "seq_len": 64, "start": [], "metric": "ppl", "lazy": False}, resumes=True),
    Method("shortened-ppl", shortened.search_ppl, "one shot: remove the units whose lone removal hurts ppl least",
           "Kim et al. 2024, Shortened LLaMA (PPL)", "layer", {"samples": 8}),
    Method("shortened-taylor", shortened.search_taylor, "one shot: remove the units with the lowest sum |w * dL/dw|",
           "Kim et al. 2024, Shortened LLaMA (Taylor+)", "layer", {"samples": 32, "keep_first": 4, "keep_last": 2}),
    Method("evopress", evopress.search, "evolutionary search at fixed counts, KL to dense, staged selection",
           "Sieberling et al. 2024, EvoPress", "layer",
           {"samples": 8, "top_k": 64, "generations": 30, "offspring": 8, "stages": [[1, 2]], "fitness": "kl",
            "population": 16, "splits": 5, "attn_off": None}, resumes=True),
    # IG-Pruning's trainer with its TrainConfig defaults, except a budget that fits the CPU limit above;
    # to match a given `igprune fit`, pass its --shared-steps, --cluster-steps, --batch-size and --seq-len
    Method("static-l0", static_l0.search, "IG-Pruning's hard-concrete mask trainer with one cluster (no routing)",
           "IG-Pruning ablation (N = 1)", "block",
           {**static_l0.TRAIN_OPTIONS, "samples": 512, "seq_len": 64, "batch_size": 8, "shared_steps": 100,
            "cluster_steps": 0}, resumes=True),
]}

# options that shape the problem (data, scorer, candidates); the rest go to the method
_PROBLEM_OPTIONS = ("samples", "seq_len", "packing", "batch_size", "top_k", "keep_first", "keep_last")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise IGPruneError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def find_mask(method: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
              sparsity: float, granularity: Granularity | None = None, seed: int = 0, progress: bool = True,
              source: str = "texts", checkpoint: str | Path | None = None, calibration: Calibration | None = None,
              **options: Any) -> Bundle:
    """Run a static method and return its one-mask bundle; `source` names the calibration data in the bundle.

    `calibration` gives the sequences to search on directly (then `texts` and the samples/seq_len options are
    not used), for callers that compose it themselves, e.g. equal shares of several clusters' sequences.

    With a `checkpoint` folder, a method that `resumes` saves its progress as it goes and a rerun with the
    same settings continues from it; the search log's counts and seconds then cover the rerun only.
    """
    entry = get_method(method)
    opts = entry.options(options)
    granularity = granularity or entry.granularity
    n_blocks = num_blocks(model)
    k = units_off(sparsity, n_blocks, granularity)  # fails before any slow step
    space = SearchSpace(n_blocks, granularity).protect(opts["keep_first"], opts["keep_last"])
    if calibration is None:
        calibration = make_calibration(tokenizer, texts, opts["samples"], opts["seq_len"], seed, source,
                                       opts["packing"])
    started = time.perf_counter()
    scorer = Scorer(model, calibration, batch_size=opts["batch_size"], top_k=opts.get("top_k", 64))
    problem = Problem(model, scorer, space, k, seed, distributed.shows_progress(progress),
                      Path(checkpoint) if checkpoint else None)
    problem.check()
    resumed = problem.checkpoint is not None and problem.checkpoint.is_dir() and any(problem.checkpoint.iterdir())
    search_options = {key: value for key, value in opts.items() if key not in _PROBLEM_OPTIONS}
    result = entry.search(problem, **search_options)
    result.log["resumed"] = resumed
    seconds = time.perf_counter() - started
    return _bundle(entry, model, calibration, space, sparsity, seed, opts, result, scorer, seconds)


def _bundle(entry: Method, model: PreTrainedModel, calibration: Calibration, space: SearchSpace, sparsity: float,
            seed: int, opts: dict[str, Any], result: SearchResult, scorer: Scorer, seconds: float) -> Bundle:
    mask = space.mask(result.off)
    off = skipped_blocks(mask)
    config = {
        "method": entry.name,
        "model": model.name_or_path,
        "fingerprint": fingerprint(model),
        "reference": entry.reference,
        "n_clusters": 1,
        "cluster_sizes": [calibration.n_sequences],  # everything in the one cluster
        "sparsity": sparsity,
        "granularity": space.granularity,
        "blocks_total": space.n_blocks,
        "blocks_skipped": off["total"],
        "attn_skipped": off["attn"],
        "ffn_skipped": off["ffn"],
        "units_total": n_units(space.n_blocks, space.granularity),
        "protected_layers": sorted(space.protected_layers),
        "seed": seed,
        "calibration": calibration.info,
        "options": opts,
        "fit_seconds": round(seconds, 1),
    }
    search = {"order": [space.name(u) for u in result.off], **result.log, "masks_scored": scorer.evaluations,
              "forward_tokens": round(scorer.tokens), "seconds": round(seconds, 1)}
    return Bundle(mask.unsqueeze(0), torch.zeros(1, 0), config, result.log_alpha, logs={"search": search})


__all__ = ["METHODS", "COMMON", "Calibration", "Method", "Scorer", "find_mask", "get_method", "make_calibration"]
