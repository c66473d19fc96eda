"""Choosing each cluster's mask among candidates, on cluster text that no finder scored.

A search on a few hundred tokens fits their noise: its mask wins on them and may lose on the cluster's other
text to another cluster's mask or the global one (benchmarks/RESULTS.md). Judging every candidate on fresh rows
of the cluster keeps a cluster's own mask only where it generalises, and a margin in paired standard errors keeps
the global mask, the one every input does well with, unless the cluster's text clearly asks for another.

    masks, log = choose_masks(model, tokenizer, groups, candidates, default=len(groups))
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.files import IGPruneError
from igprune.masks import mask_row
from igprune.scoring import Packing, Scorer, make_calibration
from igprune.texts import Text

Margin = float | Literal["auto"]


@dataclass(frozen=True)
class ChooseConfig:
    """samples: fresh rows of each cluster's text every candidate is scored on (0: keep each cluster's own mask).
    margin: paired standard errors by which a candidate must beat the global mask; "auto" is the one-sided t at
    5%, Bonferroni-corrected for the distinct candidates (bonferroni_margin)."""

    samples: int = 8
    margin: Margin = "auto"

    def validate(self) -> None:
        if self.samples < 0:
            raise IGPruneError(f"choose.samples must be a whole number >= 0 (0: no choosing), got {self.samples}")
        check_margin(self.margin)


def check_margin(margin: Margin) -> None:
    """A choice margin is a number of standard errors >= 0 or "auto" (bonferroni_margin)."""
    if margin != "auto" and not (isinstance(margin, int | float) and not isinstance(margin, bool) and margin >= 0):
        raise IGPruneError(f"choose margin must be a number of standard errors >= 0 or 'auto', got {margin!r}")


def choose_masks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, groups: Sequence[list[Text]],
                 candidates: torch.Tensor, samples: int = 8, seq_len: int = 64,
                 exclude: Sequence[Collection[Text]] | None = None, seed: int = 0,
                 packing: Packing = "joined", default: int | None = None,
                 margin: Margin = 0.0) -> tuple[torch.Tensor, dict[str, Any]]:
    """For each group i, the candidate mask with the lowest perplexity on `samples` x `seq_len` tokens of
    group i's texts outside `exclude[i]` (the texts its search scored); a tie keeps candidate i, its own.

    default, margin: a group leaves candidate `default` (the global mask) only for a candidate whose mean
    per-token NLL on the fresh rows is lower by more than `margin` paired standard errors over those rows, so
    a cluster whose text does not clearly ask for another mask keeps the one every input does well with.
    margin "auto": the Bonferroni margin (bonferroni_margin) for the cluster's rows and the distinct candidates
    other than the default, so the bar rises with the number of masks that could win by chance and falls as the
    rows grow.
    """
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
                               "give more calibration text, or set choose.samples to 0")
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
