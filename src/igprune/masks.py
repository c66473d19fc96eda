"""Masks as data: granularity, counting and printing.

A mask is a bool tensor over the B = 2L blocks, True = run; block 2i is layer i's attention and
block 2i+1 its FFN. Methods can decide per block ("block" granularity: attention and FFN separately)
or per layer ("layer": both blocks of a layer together); a layer-level decision over L units is
expanded to the 2L blocks. Sparsity is always skipped blocks / B, as in the paper.
"""

from __future__ import annotations

from typing import Literal

import torch

from igprune.files import IGPruneError

Granularity = Literal["block", "layer"]


def n_units(n_blocks: int, granularity: Granularity) -> int:
    if granularity not in ("block", "layer"):
        raise IGPruneError(f"granularity must be 'block' or 'layer', not {granularity!r}")
    return n_blocks if granularity == "block" else n_blocks // 2


def units_off(sparsity: float, n_blocks: int, granularity: Granularity = "block") -> int:
    """How many units to switch off: round(s * units); the block count is that times the unit size."""
    if not 0.0 <= sparsity < 1.0:
        raise IGPruneError(f"sparsity must be in [0, 1), got {sparsity}")
    units = n_units(n_blocks, granularity)
    k = int(round(sparsity * units))
    if k >= units:
        raise IGPruneError(f"sparsity {sparsity} would skip all {units} {granularity}s; lower it")
    return k


def blocks_off_to_sparsity(n_off_blocks: int, n_blocks: int) -> float:
    """The sparsity that asks for exactly `n_off_blocks` of `n_blocks` (for CLI --blocks)."""
    if not 0 <= n_off_blocks < n_blocks:
        raise IGPruneError(f"cannot skip {n_off_blocks} of {n_blocks} blocks; choose 0 to {n_blocks - 1}")
    return n_off_blocks / n_blocks


def expand(units: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Unit values (..., U) to block values (..., B): a layer's value covers its attention and FFN."""
    return units if granularity == "block" else units.repeat_interleave(2, dim=-1)


def mask_from_off(off: list[int] | torch.Tensor, n_blocks: int) -> torch.Tensor:
    mask = torch.ones(n_blocks, dtype=torch.bool)
    mask[torch.as_tensor(off, dtype=torch.long)] = False
    return mask


def mask_row(mask: torch.Tensor) -> str:
    """Readable one-line mask: per layer, A/F where attention/FFN run and '.' where skipped."""
    m = mask.tolist()
    return " ".join(("A" if m[2 * i] else ".") + ("F" if m[2 * i + 1] else ".") for i in range(len(m) // 2))


def skipped_blocks(mask: torch.Tensor) -> dict[str, int]:
    """Counts of skipped attention and FFN blocks."""
    m = mask.view(-1, 2)
    return {"attn": int((~m[:, 0]).sum()), "ffn": int((~m[:, 1]).sum()), "total": int((~mask).sum())}
