"""Perplexity on held-out calibration text, for dense, static and dynamic models.

Texts: `load_calibration(source, split="heldout")`, passages of documents that no clustering or mask-training
passage comes from. Each passage is scored on its own, from its start and truncated to its first `seq_len`
tokens (passages are cut at up to CHARS_PER_TOKEN * seq_len characters, so most fill the window; the mean
length is reported). Perplexity is exp of the mean NLL over all predicted tokens of all passages
(token-weighted). A dynamic model routes each passage by exactly the text it scores, all passages in one
batched encoder call, and runs each cluster's passages under its mask. Rows per batch are capped so the
logits of one batch stay within LOGITS_BUDGET bytes, whatever the vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.blocks import KVPolicy
from igprune.bundle import Bundle
from igprune.dynamic import DynamicPrunedModel
from igprune.evaluation.results import Configuration, provenance
from igprune.files import IGPruneError
from igprune.nll import next_token_nll
from igprune.texts import Request, Text, digest, routed, tokens

CHARS_PER_TOKEN = 8  # generous: most text is 3-5 characters per token, so passages fill seq_len
LOGITS_BUDGET = 512 * 2**20  # bytes of float32 logits (and their log-softmax) per batch


def rows_per_batch(batch_size: int, seq_len: int, vocab: int) -> int:
    """`batch_size`, or fewer rows when (rows, seq_len, vocab) logits and their log-softmax exceed the budget."""
    return max(1, min(batch_size, LOGITS_BUDGET // (2 * 4 * seq_len * vocab)))


@torch.no_grad()
def token_nll(model: PreTrainedModel, ids: list[list[int]], batch_size: int,
              context: list[int] | None = None) -> list[tuple[float, int]]:
    """(summed NLL, predicted tokens) per sequence, under whatever mask is active; longest sequences first.

    context: per sequence, how many leading tokens are only read, not scored (default 1: all but the first are
    predicted), e.g. a question whose reference answer is scored."""
    context = context or [1] * len(ids)
    if any(not 1 <= c < len(x) for c, x in zip(context, ids, strict=True)):
        raise IGPruneError("every sequence needs at least one scored token after its context")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    rows = rows_per_batch(batch_size, max((len(x) for x in ids), default=1), model.config.vocab_size)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(ids)
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        width = len(ids[chunk[0]])
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        scored = torch.zeros(len(chunk), width, dtype=torch.bool)
        for r, i in enumerate(chunk):
            batch[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
            scored[r, context[i]:len(ids[i])] = True
        logits = model(input_ids=batch.to(model.device), attention_mask=mask.to(model.device), use_cache=False).logits
        nll = next_token_nll(logits, batch.masked_fill(~scored, -100).to(logits.device))
        for r, i in enumerate(chunk):
            out[i] = (float(nll[r].sum()), len(ids[i]) - context[i])
        del logits, nll
    return out


def truncate(tokenizer: PreTrainedTokenizerBase, texts: list[Text], seq_len: int) -> tuple[list[list[int]], list[int]]:
    """Each text's first `seq_len` token ids, the part that is scored (and that a router reads of a passage), and
    how many of its leading tokens are only read: a passage's first, a request's prompt (igprune.texts)."""
    if seq_len < 2:
        raise IGPruneError("seq_len must be at least 2 tokens")
    rows = [[part[:seq_len] for part in tokens(tokenizer, text)] for text in texts]
    if any(len(ids) < 2 for ids, _ in rows):
        raise IGPruneError("every text needs at least 2 tokens to score")
    if any(True not in flags[1:] for _, flags in rows):
        raise IGPruneError(f"a request's prompt fills all {seq_len} tokens, leaving none of its reply to score; "
                           "raise seq_len")
    return [ids for ids, _ in rows], [max(1, flags.index(True)) for _, flags in rows]


def score_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[Text], seq_len: int,
                batch_size: int = 8, pruned: DynamicPrunedModel | None = None,
                progress: bool = False) -> tuple[list[tuple[float, int]], list[int]]:
    """(summed NLL, predicted tokens) per text, each truncated to `seq_len` tokens (a request scored on its reply),
    and its cluster (0 if not routed). With `pruned`, texts are routed (a passage by its truncated text, a request
    by what the router sees of it) and grouped per cluster."""
    from tqdm import tqdm

    ids, context = truncate(tokenizer, texts, seq_len)
    clusters = [0] * len(texts)
    if pruned is not None:
        seen = [routed(t) if isinstance(t, Request) else tokenizer.decode(x, skip_special_tokens=True)
                for t, x in zip(texts, ids, strict=True)]
        clusters = [r.cluster for r in pruned.route(seen)]
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(texts)
    groups = sorted(set(clusters))
    bar = distributed.shows_progress(progress) and len(groups) > 1
    for cluster in tqdm(groups, desc="perplexity", unit="cluster", disable=not bar or None):
        rows = [i for i, c in enumerate(clusters) if c == cluster]
        with pruned.use_cluster(cluster) if pruned is not None else contextlib.nullcontext():
            results = token_nll(model, [ids[i] for i in rows], batch_size, [context[i] for i in rows])
        for i, result in zip(rows, results, strict=True):
            scores[i] = result
    return scores, clusters


def by_cluster(scores: list[tuple[float, int]], clusters: list[int]) -> dict[int, list[tuple[float, int]]]:
    """Each cluster's (summed NLL, tokens) pairs, clusters in ascending order."""
    grouped: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for score, cluster in zip(scores, clusters, strict=True):
        grouped[cluster].append(score)
    return dict(sorted(grouped.items()))


def token_perplexity(scores: list[tuple[float, int]]) -> float:
    """exp of the mean NLL over all predicted tokens of (summed NLL, tokens) pairs: token-weighted."""
    return math.exp(sum(s for s, _ in scores) / sum(n for _, n in scores))


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bundle: Bundle | str | Path | None = None,
               source: str = "mixed", seq_len: int = 512, limit: int | None = None, batch_size: int = 8,
               kv_policy: KVPolicy = "keep", seed: int = 0, progress: bool = True,
               texts: list[Text] | None = None) -> dict[str, Any]:
    """Held-out perplexity of `model`, dense or pruned by `bundle`, as a results dict (kind "perplexity"); on
    `texts` (e.g. a user's held-out requests, each scored on its reply) instead of `source`'s held-out passages."""
    from igprune.data import load_calibration

    config = Configuration.load(model, bundle)
    started = time.perf_counter()
    given = texts is not None
    if given:
        texts = texts[:limit]
    else:
        texts = load_calibration(source, split="heldout", max_chars=CHARS_PER_TOKEN * seq_len, limit=limit, seed=seed)
    if not texts:
        raise IGPruneError("no texts to score" if given else f"no held-out {source} passages; run `igprune prepare`")
    pruned = None
    if config.bundle is not None:
        pruned = DynamicPrunedModel.from_bundle(model, config.bundle, tokenizer, kv_policy=kv_policy)
    scores, clusters = score_texts(model, tokenizer, texts, seq_len, batch_size, pruned, progress)
    tokens = sum(n for _, n in scores)
    results: dict[str, Any] = {
        "kind": "perplexity", **config.describe(), "data": source, "split": "given" if given else "heldout",
        "seq_len": seq_len, "limit": limit, "kv_policy": kv_policy, "batch_size": batch_size, "passages": len(texts),
        "tokens": tokens,  # scored: a passage's all but its first, a request's reply
        **({"texts_sha256": digest(texts), "requests": sum(isinstance(t, Request) for t in texts)} if given
           else {"mean_tokens_per_passage": round(tokens / len(texts) + 1, 1)}),
        "nll": sum(s for s, _ in scores) / tokens, "perplexity": token_perplexity(scores),
    }
    if config.dynamic:
        results["per_cluster"] = {str(k): {"passages": len(v), "tokens": sum(n for _, n in v),
                                           "perplexity": token_perplexity(v)}
                                  for k, v in by_cluster(scores, clusters).items()}
    results["provenance"] = {**provenance(seed, str(model.device), str(model.dtype).removeprefix("torch.")),
                             "bundle": config.identity(),
                             "seconds": {"total": round(time.perf_counter() - started, 1)}}
    return results
