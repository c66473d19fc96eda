"""What every static method works on: a search space of units and the problem it is asked to solve.

A method decides over units: blocks (attention and FFN separately) or layers (both blocks of a layer).
It returns the units it switches off, in the order it chose or ranked them, and a log; `find_mask`
turns that into a bundle. Keeping this contract in one place lets every method share the masks,
the protected layers and the scorer instead of re-deriving them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from igprune.blocks import ATTN, block_name
from igprune.bundle import fingerprint
from igprune.distributed import main_writes
from igprune.files import IGPruneError, read_json, write_json
from igprune.masks import Granularity, mask_from_off, n_units
from igprune.texts import Text

if TYPE_CHECKING:
    from igprune.scoring import Scorer


@dataclass(frozen=True)
class SearchSpace:
    """The units a method may switch off; units of `protected_layers` always run."""

    n_blocks: int
    granularity: Granularity
    protected_layers: frozenset[int] = frozenset()

    @property
    def n_units(self) -> int:
        return n_units(self.n_blocks, self.granularity)

    def blocks(self, unit: int) -> list[int]:
        return [unit] if self.granularity == "block" else [2 * unit, 2 * unit + 1]

    def layer(self, unit: int) -> int:
        return unit // 2 if self.granularity == "block" else unit

    def kind(self, unit: int) -> str:
        """attn or ffn at block granularity; every unit is a layer at layer granularity."""
        if self.granularity == "layer":
            return "layer"
        return "attn" if unit % 2 == ATTN else "ffn"

    def name(self, unit: int) -> str:
        return block_name(unit) if self.granularity == "block" else f"layer{unit}"

    def unit(self, name: str) -> int:
        """The candidate unit called `name` (the inverse of `name`)."""
        names = {self.name(u): u for u in self.candidates()}
        if name not in names:
            raise IGPruneError(f"{name!r} is not a candidate {self.granularity} of this model; candidates are "
                               f"named like {self.name(self.candidates()[0])}")
        return names[name]

    def candidates(self) -> list[int]:
        return [u for u in range(self.n_units) if self.layer(u) not in self.protected_layers]

    def mask(self, off: list[int] | tuple[int, ...]) -> torch.Tensor:
        """The block mask (B,) with the given units switched off."""
        return mask_from_off([b for u in off for b in self.blocks(u)], self.n_blocks)

    def protect(self, first: int, last: int) -> SearchSpace:
        """The same space with the first `first` and last `last` layers kept out of the candidates."""
        if first < 0 or last < 0:
            raise IGPruneError("keep_first and keep_last must be non-negative layer counts")
        n_layers = self.n_blocks // 2
        layers = set(range(min(first, n_layers))) | set(range(max(0, n_layers - last), n_layers))
        return SearchSpace(self.n_blocks, self.granularity, frozenset(layers))


@dataclass
class Problem:
    """One search: switch off exactly `k` units of `space` in `model`, judged on the scorer's calibration data."""

    model: PreTrainedModel
    scorer: Scorer  # the calibration data and how masks are scored on it
    space: SearchSpace
    k: int
    seed: int = 0
    progress: bool = True
    checkpoint: Path | None = None  # a folder where a long search keeps what it needs to resume

    def check(self) -> None:
        """Enough candidates for k units; raised before any slow step."""
        available = len(self.space.candidates())
        if self.k > available:
            raise IGPruneError(f"asked to skip {self.k} {self.space.granularity}s but only {available} are candidates "
                               f"({len(self.space.protected_layers)} layers protected); lower the sparsity or "
                               "protect fewer layers")

    @cached_property
    def identity(self) -> dict[str, Any]:
        """What saved progress must match: model, calibration data, candidates, k and seed."""
        return {"model": fingerprint(self.model), "calibration": self.scorer.calibration.info["sha256"],
                "granularity": self.space.granularity, "protected_layers": sorted(self.space.protected_layers),
                "k": self.k, "seed": self.seed}

    def saved(self, method: str, **options: Any) -> SavedProgress:
        """Where `method` run with `options` on this problem saves its progress (nowhere without a checkpoint)."""
        identity = json.loads(json.dumps({**self.identity, "method": method, "options": options}))  # as read back
        return SavedProgress(self.checkpoint / "search.json" if self.checkpoint else None, identity)


@dataclass(frozen=True)
class SavedProgress:
    """A search's state after its last finished step, so an interrupted search continues where it stopped.

    The state is JSON, written atomically after each step; it is only taken back by the same search
    (same identity), and anything else is refused rather than silently mixed in.
    """

    path: Path | None
    identity: dict[str, Any]

    def load(self) -> Any:
        """The saved state, or None if there is none."""
        if self.path is None or not self.path.is_file():
            return None
        saved = read_json(self.path)
        if saved.get("identity") != self.identity:
            raise IGPruneError(f"{self.path} holds another search (model, calibration, method or options differ); "
                               "remove it or rerun with the same settings")
        return saved["state"]

    def save(self, state: Any) -> None:
        with main_writes() as write:  # every rank holds the same state; one writes it
            if self.path is not None and write:
                write_json(self.path, {"identity": self.identity, "state": state})


@dataclass
class Found:
    """What a cluster finder leaves for the pruner: each cluster's own mask (N, B); the global mask (B,) that every
    cluster's choice starts from, where the finder has one; extra candidate masks (C, B); the texts each cluster's
    finder scored (the choice judges on others); its log; and, for trained masks, the gates' log_alpha (N, units)."""

    masks: torch.Tensor
    global_mask: torch.Tensor | None
    candidates: torch.Tensor
    scored: list[list[Text]]
    log: dict[str, Any]
    log_alpha: torch.Tensor | None = None


@dataclass
class SearchResult:
    """Units switched off (in the method's order) and the method's search log."""

    off: list[int]
    log: dict[str, Any] = field(default_factory=dict)
    log_alpha: torch.Tensor | None = None  # (1, units) for trained masks
