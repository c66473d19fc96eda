"""ShortenedLlama (Kim et al. 2024): score every unit once, remove the k least important in one shot.

Two importance criteria, as published:

* PPL: calibration perplexity with that unit alone removed (low = unimportant). Each unit's score
  reuses the dense model's layer inputs up to its own layer (see Scorer.prefix).
* Taylor+: sum over the unit's weights of |w * dL/dw| for the calibration LM loss L, summed over
  batches (a unit whose weights barely move the loss is unimportant). A unit's weights are its branch
  (self_attn or mlp) with the norms around it. Gradients are enabled only while this runs, and each
  weight's gradient is folded into its unit's sum and freed as soon as backward produces it, so at most
  a few weights' gradients exist at once; activations live for one batch.

The "+" heuristic keeps the first 4 and last 2 layers out of the candidates: the published setting for
Taylor+, whose scores otherwise favour removing the first layers (on by default there, off for PPL).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from igprune.blocks import block_parameters, final_hidden
from igprune.finders.base import Problem, SearchResult
from igprune.finders.l0 import frozen
from igprune.nll import token_nll


def search_ppl(problem: Problem) -> SearchResult:
    space, scorer = problem.space, problem.scorer
    candidates = space.candidates()
    with scorer.prefix(space.mask([]), metric="ppl") as dense:
        scores = {u: scorer.perplexity(space.mask([u]))
                  for u in tqdm(candidates, desc="shortened-ppl", unit="unit", disable=not problem.progress)}
    return _one_shot(problem, scores, {"criterion": "ppl", "dense_perplexity": dense})


def search_taylor(problem: Problem) -> SearchResult:
    blocks = taylor_importance(problem)
    space = problem.space
    scores = {u: sum(blocks[b] for b in space.blocks(u)) for u in space.candidates()}
    return _one_shot(problem, scores, {"criterion": "taylor"})


def _one_shot(problem: Problem, scores: dict[int, float], log: dict) -> SearchResult:
    space = problem.space
    ranked = sorted(scores, key=lambda u: (scores[u], u))
    log["importance"] = {space.name(u): scores[u] for u in sorted(scores)}
    log["ranking"] = [space.name(u) for u in ranked]
    return SearchResult(ranked[: problem.k], log)


def taylor_importance(problem: Problem) -> list[float]:
    """sum |w * dL/dw| per block (B,), on the scorer's calibration sequences under the dense model."""
    model, scorer = problem.model, problem.scorer
    per_block = block_parameters(model)
    owner = {id(p): block for block, plist in enumerate(per_block) for p in plist}
    params = [p for plist in per_block for p in plist]
    sums = torch.zeros(len(per_block), dtype=torch.float32, device=scorer.device)

    def fold(p: torch.nn.Parameter) -> None:
        sums[owner[id(p)]] += (p.detach() * p.grad).abs().sum().float()
        p.grad = None

    # Only the blocks' weights get gradients, each folded into `sums` and dropped at once; afterwards every
    # requires_grad flag and .grad of the user's model is as it was.
    saved = [p.grad for p in params]
    batches = scorer.batches(list(range(scorer.calibration.n_sequences)))
    n_tokens = scorer.ids[:, 1:].numel()
    hooks = []
    try:
        with frozen(model), torch.enable_grad(), scorer.control.masked(None):
            for p in params:
                p.grad = None
                p.requires_grad_(True)
                hooks.append(p.register_post_accumulate_grad_hook(fold))
            for batch in tqdm(batches, desc="shortened-taylor", unit="batch", disable=not problem.progress):
                ids = scorer.ids[batch]
                hidden = final_hidden(model, ids)
                # the loss over the vocabulary is taken a chunk of positions at a time, so its logits never
                # exist all at once; their gradients are collected on a detached copy of the hidden states
                detached = hidden.detach().requires_grad_()
                h = detached[:, :-1].reshape(-1, hidden.shape[-1])
                targets = ids[:, 1:].reshape(-1)
                for part in scorer.chunks(len(h)):
                    loss = token_nll(scorer.logits(h[part]), targets[part], reduction="sum") / n_tokens
                    loss.backward(retain_graph=True)
                hidden.backward(detached.grad)
                scorer.tokens += 3 * ids.numel()  # forward + backward with weight gradients ~ 3 forwards
    finally:
        for hook in hooks:
            hook.remove()
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
    return sums.tolist()
