"""Token NLL: the one place igprune turns logits into scores.

Every path (mask training, baseline scoring, perplexity, DynamicPrunedModel's loss) forms logits with
blocks.output_logits, so a model's final logit soft-capping (Gemma 2) applies wherever its own forward applies it,
and scores tokens here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """NLL of each target (..., ) under its logits (..., V) in float32; targets of -100 count as 0 and are
    left out of "mean"."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                          reduction=reduction)
    return nll.view(targets.shape) if reduction == "none" else nll


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """NLL of labels[:, t+1] under logits[:, t] (labels of -100 ignored); "none" gives (batch, T-1)."""
    return token_nll(logits[:, :-1], labels[:, 1:], reduction)
