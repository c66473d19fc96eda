"""Logits and next-token NLL: the one place igprune turns hidden states into scores.

Every path (mask training, baseline scoring, perplexity, DynamicPrunedModel's loss) goes through
`output_logits`, so a model's final logit soft-capping (Gemma 2) applies everywhere the model's own
forward applies it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The model's output logits for final hidden states, in float32, soft-capped as its forward does."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """NLL of labels[:, t+1] under logits[:, t] (positions labelled -100 ignored); "none" gives (batch, T-1)."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100,
                          reduction=reduction)
    return nll
