"""Scoring a block mask on calibration data: perplexity, or KL divergence to the dense model.

Calibration data is M sequences of T tokens, so no position is padding: by default cut from the
concatenated texts (packing "joined", as SLEB, ShortenedLlama and EvoPress cut wikitext-2), or each row
starting at a text's first token (packing "texts"), the way perplexity and the tasks score an input.
Memory stays bounded: sequences run in batches, and the vocabulary-sized logits are formed for a chunk of
positions at a time. For KL the
dense model's next-token distribution is kept only as its top-k log-probabilities per position plus
the log of the remaining tail mass; the KL between the two (k+1)-outcome distributions this gives
(top-k tokens and "any other token") is a lower bound of the full KL and equal to it as k -> vocab.

Greedy searches score many masks that agree with one base mask on the first layers. `prefix(base)`
records every layer's input under the base mask once; while it is active, a mask that first differs
from the base at layer i starts from the recorded input of layer i instead of recomputing layers 0..i-1.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune.blocks import (
    control_of,
    decoder_layers,
    final_hidden,
    layer_inputs,
    output_logits,
    replaced_input,
    vocab_size,
)
from igprune.files import IGPruneError, sha256_tensors
from igprune.models import model_device
from igprune.nll import token_nll
from igprune.texts import Request, Text, clean_texts, tokens

Metric = Literal["ppl", "kl"]


@dataclass
class Calibration:
    """M calibration sequences of T tokens each; `info` says where they came from (recorded in bundles)."""

    input_ids: torch.Tensor  # (M, T) long
    info: dict[str, Any] = field(default_factory=dict)
    texts: tuple[Text, ...] = ()  # the texts its tokens were cut from, so others can be kept apart from them
    scored: torch.Tensor | None = None  # (M, T) bool: which tokens are scored as targets; None: all

    @property
    def n_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


Packing = Literal["joined", "texts"]
PACKINGS = ("joined", "texts")


def make_calibration(tokenizer: PreTrainedTokenizerBase, texts: list[Text], n_sequences: int, seq_len: int,
                     seed: int = 0, source: str = "texts", packing: Packing = "joined") -> Calibration:
    """Shuffle the texts (seeded) and cut n_sequences rows of seq_len tokens from them.

    packing "joined": the texts joined with EOS, cut into consecutive rows, so most rows start mid-text.
    packing "texts": every row starts at a text's first token, tokenized as an evaluated input is (special
    tokens included); a text shorter than a row is followed by the next texts, EOS-joined, and the end of the
    text that overruns the row is not used. A mask searched on "texts" rows is judged on how it handles an
    input's opening tokens, which is what held-out perplexity and the tasks score (benchmarks/RESULTS.md,
    the domain benchmark's fragments study).
    A Request's prompt is read, not scored: only its response tokens are targets (`scored`), as a log-likelihood
    task scores a reference answer; a row with no target left is dropped.
    With too little text there are fewer rows (a warning says so); text for less than one row gives one
    shorter row.
    """
    if n_sequences < 1 or seq_len < 2:
        raise IGPruneError("calibration needs at least 1 sequence of at least 2 tokens")
    if packing not in PACKINGS:
        raise IGPruneError(f"packing must be one of {', '.join(PACKINGS)}, not {packing!r}")
    texts = clean_texts(texts)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []  # the row being filled ("texts") or all text so far ("joined")
    scored: list[bool] = []  # per token of ids: a target
    used = 0
    for i in order:
        if len(rows) >= n_sequences or (packing == "joined" and len(ids) >= n_sequences * seq_len):
            break
        text_ids, text_scored = tokens(tokenizer, texts[i], add_special_tokens=packing == "texts" and not ids)
        ids += text_ids + eos
        scored += text_scored + [not isinstance(texts[i], Request)] * len(eos)  # a response's end is not scored
        used += 1
        if packing == "texts" and len(ids) >= seq_len:
            if any(scored[1:seq_len]):
                rows.append((ids[:seq_len], scored[:seq_len]))
            ids, scored = [], []
    if packing == "joined":
        rows = [(ids[j:j + seq_len], scored[j:j + seq_len])
                for j in range(0, min(len(ids), n_sequences * seq_len) - seq_len + 1, seq_len)
                if any(scored[j + 1:j + seq_len])]
    if not rows:
        if len(ids) < 2 or not any(scored[1:]):
            raise IGPruneError("calibration texts give fewer than 2 tokens to score; give more text, or rows long "
                               "enough (seq_len) to reach past a request's prompt")
        rows, seq_len = [(ids, scored)], len(ids)
    if len(rows) < n_sequences:
        warnings.warn(f"calibration text fills only {len(rows)} of {n_sequences} sequences of {seq_len} tokens",
                      stacklevel=2)
    tensor = torch.tensor([r for r, _ in rows], dtype=torch.long)
    targets = torch.tensor([s for _, s in rows], dtype=torch.bool)
    targets = None if targets.all() else targets  # requests: only their responses are scored
    info = {"source": source, "sequences": len(rows), "seq_len": seq_len, "tokens": tensor.numel(),
            "texts_used": used, "packing": packing, "seed": seed, "sha256": sha256_tensors(tensor),
            **({} if targets is None else {"scored_tokens": int(targets[:, 1:].sum())})}
    return Calibration(tensor, info, tuple(texts[i] for i in order[:used]), targets)


@dataclass
class _Prefix:
    base: torch.Tensor  # (B,) bool
    rows: tuple[int, ...]
    inputs: list[list[torch.Tensor]]  # per batch, per layer: that layer's input under the base mask
    scores: dict[str, float]  # the base mask's own scores on these rows


class Scorer:
    """Perplexity and KL-to-dense of masks of one model on one calibration set."""

    def __init__(self, model: PreTrainedModel, calibration: Calibration, batch_size: int = 8, top_k: int = 64,
                 chunk_tokens: int = 512):
        if batch_size < 1 or top_k < 1 or chunk_tokens < 1:
            raise IGPruneError("batch_size, top_k and chunk_tokens must be positive")
        self.model, self.calibration = model, calibration
        self.control = control_of(model)
        self.layers = decoder_layers(model)
        self.device = model_device(model)  # the first shard's, under a device_map
        self.ids = calibration.input_ids.to(self.device)
        self.scored = None if calibration.scored is None else calibration.scored.to(self.device)
        self.batch_size, self.top_k, self.chunk_tokens = batch_size, top_k, chunk_tokens
        self.evaluations = 0  # masks scored (each on some rows): for the search logs
        self.tokens = 0.0  # tokens run, counted in full-model forwards (a suffix counts its share)
        self._prefix: _Prefix | None = None
        self._dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # top-k logp, ids, tail logp

    # ---- public scores ---------------------------------------------------------------------------------

    def score(self, mask: torch.Tensor, metric: Metric = "ppl", rows: list[int] | None = None) -> float:
        """Perplexity ("ppl") or mean per-token KL(dense || masked) ("kl") on the given rows (default: all)."""
        if metric not in ("ppl", "kl"):
            raise IGPruneError(f"metric must be 'ppl' or 'kl', not {metric!r}")
        rows = self._rows(rows)
        prefix = self._prefix
        if prefix is not None and prefix.rows == tuple(rows) and torch.equal(prefix.base, mask.cpu()):
            if metric not in prefix.scores:
                prefix.scores[metric] = self._score(mask, metric, rows)
            return prefix.scores[metric]
        return self._score(mask, metric, rows)

    def perplexity(self, mask: torch.Tensor, rows: list[int] | None = None) -> float:
        return self.score(mask, "ppl", rows)

    def kl(self, mask: torch.Tensor, rows: list[int] | None = None) -> float:
        return self.score(mask, "kl", rows)

    @torch.no_grad()
    def row_nll(self, mask: torch.Tensor, rows: list[int] | None = None) -> list[tuple[float, float]]:
        """(summed NLL, predicted tokens) of each row under `mask`: what a paired comparison of two masks,
        row by row, needs (choosing.choose_masks' margin)."""
        pairs = []
        for batch in self.batches(self._rows(rows)):
            hidden = self._hidden(mask, batch, None)
            pairs += [self._nll([r], hidden[j:j + 1]) for j, r in enumerate(batch)]
        self.evaluations += 1
        return pairs

    @contextlib.contextmanager
    def prefix(self, base: torch.Tensor, rows: list[int] | None = None,
               metric: Metric | None = None) -> Iterator[float | None]:
        """Reuse the layer inputs of `base` for masks scored on the same rows; yields base's `metric` score."""
        rows = self._rows(rows)
        base = base.to(torch.bool).cpu()
        if metric == "kl":
            self._dense_cache()  # before the recording hooks, which would record the dense pass too
        inputs: list[list[torch.Tensor]] = []
        parts = []
        for batch in self.batches(rows):
            with layer_inputs(self.model) as recorded:
                hidden = self._hidden(base, batch, None)
            inputs.append(recorded)
            if metric is not None:  # the recording pass gives the base's own score for free
                parts.append(self._reduce(metric, batch, hidden))
        scores = {metric: _combine(metric, parts)} if metric is not None else {}
        if metric is not None:
            self.evaluations += 1
        saved = self._prefix
        self._prefix = _Prefix(base, tuple(rows), inputs, scores)
        try:
            yield scores.get(metric) if metric else None
        finally:
            self._prefix = saved

    # ---- internals -------------------------------------------------------------------------------------

    def _rows(self, rows: list[int] | None) -> list[int]:
        return list(range(self.calibration.n_sequences)) if rows is None else [int(r) for r in rows]

    def batches(self, rows: list[int]) -> list[list[int]]:
        """Rows in groups of batch_size, the unit of one forward pass."""
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def _score(self, mask: torch.Tensor, metric: Metric, rows: list[int]) -> float:
        if metric == "kl":
            self._dense_cache()
        prefix = self._prefix if self._prefix is not None and self._prefix.rows == tuple(rows) else None
        parts = [self._reduce(metric, batch, self._hidden(mask, batch, prefix.inputs[i] if prefix else None,
                                                          prefix.base if prefix else None))
                 for i, batch in enumerate(self.batches(rows))]
        self.evaluations += 1
        return _combine(metric, parts)

    @torch.no_grad()
    def _reduce(self, metric: Metric, batch: list[int], hidden: torch.Tensor) -> tuple[float, float]:
        """(sum, count) of per-position NLL or KL for one batch's final hidden states."""
        return self._nll(batch, hidden) if metric == "ppl" else self._kl(batch, hidden)

    @torch.no_grad()
    def _hidden(self, mask: torch.Tensor, batch: list[int], inputs: list[torch.Tensor] | None,
                base: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (b, T, d) of the batch under `mask`; with `inputs` recorded under `base`,
        the layers before the first one where mask and base differ are not recomputed."""
        mask = mask.to(torch.bool).cpu()
        start, cached = 0, None
        if inputs is not None:
            differ = (mask != base).nonzero()
            start = int(differ[0]) // 2 if len(differ) else 0
            if start > 0:
                cached = inputs[start]
                mask = mask.clone()
                mask[: 2 * start] = False  # those layers are replaced by the recorded input
        ids = self.ids[batch]
        self.tokens += ids.numel() * (len(self.layers) - start) / len(self.layers)
        with self.control.masked(mask), replaced_input(self.model, start, cached):
            return final_hidden(self.model, ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output logits in float32, soft-capped as the model's forward does (igprune.nll)."""
        return output_logits(self.model, hidden)

    def chunks(self, n: int) -> Iterator[slice]:
        """Slices of at most chunk_tokens positions: vocabulary-sized logits exist for one chunk at a time."""
        for i in range(0, n, self.chunk_tokens):
            yield slice(i, min(n, i + self.chunk_tokens))

    def _weights(self, batch: list[int], positions: int) -> torch.Tensor | None:
        """(b * positions,) float weights of the batch's positions: 1 where position t's next token is scored (the
        last position, which predicts past the row, weighs as the row's last token); None when all are scored."""
        if self.scored is None:
            return None
        targets = self.scored[batch]
        return torch.cat([targets[:, 1:], targets[:, -1:]], dim=1)[:, :positions].reshape(-1).float()

    def _nll(self, batch: list[int], hidden: torch.Tensor) -> tuple[float, float]:
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = self.ids[batch][:, 1:].reshape(-1)
        weights = self._weights(batch, hidden.shape[1] - 1)
        total = 0.0
        for part in self.chunks(len(h)):
            nll = token_nll(self.logits(h[part]), targets[part])
            total += float(nll.sum() if weights is None else (nll * weights[part]).sum())
        return total, len(h) if weights is None else float(weights.sum())

    def _kl(self, batch: list[int], hidden: torch.Tensor) -> tuple[float, float]:
        top_logp, top_ids, tail_logp = (t[batch].reshape(-1, *t.shape[2:]) for t in self._dense)
        h = hidden.reshape(-1, hidden.shape[-1])
        weights = self._weights(batch, hidden.shape[1])
        total = 0.0
        for part in self.chunks(len(h)):
            logq = F.log_softmax(self.logits(h[part]), dim=-1)
            q_top, q_tail = top_and_tail(logq, top_ids[part])
            p_top, p_tail = top_logp[part], tail_logp[part]
            kl = (p_top.exp() * (p_top - q_top)).sum(-1)
            tail = torch.where(p_tail > -math.inf, p_tail.exp() * (p_tail - q_tail), torch.zeros_like(p_tail))
            total += float((kl + tail).sum() if weights is None else ((kl + tail) * weights[part]).sum())
        return total, len(h) if weights is None else float(weights.sum())

    @torch.no_grad()
    def _dense_cache(self) -> None:
        """The dense model's top-k next-token log-probs and tail mass at every position, computed once."""
        if self._dense is not None:
            return
        m, t = self.ids.shape
        k = min(self.top_k, vocab_size(self.model))
        top_logp = torch.empty(m, t, k, device=self.device)
        top_ids = torch.empty(m, t, k, dtype=torch.long, device=self.device)
        tail = torch.empty(m, t, device=self.device)
        for batch in self.batches(list(range(m))):
            with self.control.masked(None):
                hidden = final_hidden(self.model, self.ids[batch])
            h = hidden.reshape(-1, hidden.shape[-1])
            rows_logp, rows_ids, rows_tail = [], [], []
            for part in self.chunks(len(h)):
                logp = F.log_softmax(self.logits(h[part]), dim=-1)
                values, ids = logp.topk(k, dim=-1)
                rows_logp.append(values)
                rows_ids.append(ids)
                rows_tail.append(top_and_tail(logp, ids)[1])
            shape = (len(batch), t)
            top_logp[batch] = torch.cat(rows_logp).view(*shape, k)
            top_ids[batch] = torch.cat(rows_ids).view(*shape, k)
            tail[batch] = torch.cat(rows_tail).view(shape)
        self.tokens += m * t
        self._dense = (top_logp, top_ids, tail)


def _combine(metric: Metric, parts: list[tuple[float, float]]) -> float:
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return math.exp(total / count) if metric == "ppl" else total / count


def top_and_tail(logp: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (n, k) of the given token ids and the log of all remaining mass (n,); `logp` is overwritten."""
    top = logp.gather(-1, ids)
    tail = logp.scatter_(-1, ids, -math.inf).logsumexp(-1)
    return top, tail
