"""An lm-eval model for igprune: dense, static or dynamically routed, scored by lm-eval's own HFLM code.

IGPruneLM subclasses lm-eval's HFLM, so tokenisation, batching and log-likelihood computation are exactly
the harness's. A pruned model only adds masks around HFLM's methods:

* every document is routed once, by the text its requests share (the question, so all answer choices of one
  question are scored under the same mask; winogrande's contexts differ by the filled-in option, so it is
  routed by their common prefix). Distinct texts are routed in one batched encoder call and cached.
* requests are grouped by cluster; each group runs through HFLM under its cluster's mask, with HFLM's own
  sorting and batching, and the answers are put back in the original order. A dynamic model so costs about
  what the dense one does, plus routing and at most one part-filled batch per cluster.

* generation (generate_until) runs through HFLM's own generate_until (its sorting, batching, stop sequences and
  max tokens) in one pass: each batch runs as one HF generate with every row under its own prompt's mask
  (DynamicPrunedModel.use_clusters, as `igprune serve` runs a mixed batch). A generative task routes each
  prompt by the document's own text (`route_text`, the task's doc_to_text), not by its few-shot examples or chat
  template, which every prompt shares.

`document_clusters` gives each task's documents' clusters: routing collapse (every input to one cluster) shows
there.

Data parallel: HFLM gives up its own data parallelism when handed a loaded model, so under torchrun / accelerate
launch IGPruneLM reports the process group's rank and size itself and gathers with torch.distributed; lm-eval's
evaluator then gives each rank a strided share of every task's requests and gathers the results on rank 0.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.dynamic import DynamicPrunedModel

DocKey = tuple[str | None, Any]  # (task name, doc id), or (task name, text) for requests without a doc id


def shared_text(texts: Sequence[str]) -> str:
    """What the requests of one document have in common, for routing: the text itself when they agree,
    else their common prefix cut back to a word boundary (winogrande), else the first text."""
    first = texts[0]
    if all(t == first for t in texts):
        return first
    prefix = os.path.commonprefix(list(texts))
    prefix = prefix[: prefix.rfind(" ") + 1] if " " in prefix else prefix
    return prefix if prefix.strip() else first


class IGPruneLM(HFLM):
    """lm-eval's HFLM over an already loaded model; with `pruned`, each document runs under its routed mask.

    A static bundle (one cluster) needs no encoder and runs every request under its one mask.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 pruned: DynamicPrunedModel | None = None, batch_size: int = 8, **hflm_kwargs: Any):
        lm_logger = logging.getLogger("lm_eval")
        level = lm_logger.level
        lm_logger.setLevel(logging.ERROR)  # "pretrained is not a str" warnings: passing a model is intended
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **hflm_kwargs)
        finally:
            lm_logger.setLevel(level)
        self._rank, self._world_size = distributed.rank(), distributed.world_size()  # one process: 0, 1
        self.pruned = pruned
        self._routes: dict[str, int] = {}  # routed text -> cluster
        self._doc_cluster: dict[DocKey, int] = {}
        self.routing_seconds = 0.0  # time spent in the encoder, to compare with the evaluation itself
        self.route_text: Callable[[dict], str] | None = None  # a document's own text, where not its requests' context
        self._context_cluster: dict[str, int] = {}  # generation: each prompt's cluster, by its context
        self._batch_contexts: list[str] = []  # generation: the contexts of the batch being encoded and run
        self.batch_clusters: list[int] = []  # generation: how many distinct clusters each batch had

    def document_clusters(self, task: str) -> dict[int, int]:
        """The cluster of each of `task`'s documents seen so far, by lm-eval doc_id."""
        return {doc: cluster for (name, doc), cluster in self._doc_cluster.items()
                if name == task and isinstance(doc, int)}

    def reset_routing(self) -> None:
        self._doc_cluster.clear()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor, concatenated along dim 0, a scalar taken as one row (as accelerate's gather)."""
        if self.world_size <= 1:
            return tensor
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.cat(parts)

    def barrier(self) -> None:
        distributed.barrier()

    def get_model_info(self) -> dict:
        """HFLM's version asks the hub for a commit of `pretrained`, which is a model object here."""
        return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                "model_dtype": str(self._model.dtype), "model_name": self._model.name_or_path}

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """HFLM's forward, without the KV cache HF builds by default: scoring never reads it, and under the
        "keep" policy every skipped attention would still compute K and V for it."""
        if attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        autocast = torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                  enabled=self.mixed_precision_dtype is not None)
        with torch.no_grad(), autocast:
            return self.model(inps, use_cache=False).logits

    # ------------------------------------------------------------------------------------------ routing

    def clusters(self, requests: Sequence[Instance]) -> list[int]:
        """The cluster of each request: its document's route (documents routed in one batch, cached by text)."""
        keys = [(r.task_name, r.doc_id if r.doc_id is not None else r.args[0]) for r in requests]
        texts: dict[DocKey, list[str]] = defaultdict(list)
        for key, request in zip(keys, requests, strict=True):
            texts[key].append(request.args[0])
        if self.route_text is None:
            routed = {key: shared_text(t) for key, t in texts.items()}
        else:
            routed = {key: self.route_text(request.doc) for key, request in zip(keys, requests, strict=True)}
        todo = sorted({t for t in routed.values() if t not in self._routes})
        if todo:
            started = time.perf_counter()
            self._routes.update(zip(todo, (r.cluster for r in self.pruned.route(todo)), strict=True))
            self.routing_seconds += time.perf_counter() - started
        for key, text in routed.items():
            self._doc_cluster[key] = self._routes[text]
        return [self._doc_cluster[key] for key in keys]

    def _per_cluster(self, method: Callable[..., list], requests: list[Instance], disable_tqdm: bool) -> list:
        """Run HFLM's `method` once per cluster under that cluster's mask; answers in the original order."""
        if self.pruned is None:
            return method(requests, disable_tqdm=disable_tqdm)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, cluster in enumerate(self.clusters(requests)):
            groups[cluster].append(i)
        answers: list = [None] * len(requests)
        for cluster, rows in sorted(groups.items()):
            with self.pruned.use_cluster(cluster):
                out = method([requests[i] for i in rows], disable_tqdm=disable_tqdm)
            for i, answer in zip(rows, out, strict=True):
                answers[i] = answer
        return answers

    # ------------------------------------------------------------------------------------ lm-eval's API

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._per_cluster(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return self._per_cluster(super().loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """HFLM's generation, each batch with rows of different masks (tok_batch_encode and _model_generate
        below put each row under its prompt's cluster)."""
        if self.pruned is None:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._context_cluster = {r.args[0]: c for r, c in zip(requests, self.clusters(requests), strict=True)}
        try:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self._context_cluster = {}

    def tok_batch_encode(self, strings: list[str], *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """HFLM's, remembering the batch's prompts: _model_generate gets only their tokens and routes by the text."""
        self._batch_contexts = list(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> torch.Tensor:
        if not self._context_cluster:
            return super()._model_generate(context, max_length, stop, **kwargs)
        clusters = [self._context_cluster[c] for c in self._batch_contexts]
        if len(clusters) != context.shape[0]:
            raise RuntimeError(f"{len(clusters)} routed prompts for a batch of {context.shape[0]} rows")
        self.batch_clusters.append(len(set(clusters)))
        with self.pruned.use_clusters(clusters):
            return super()._model_generate(context, max_length, stop, **kwargs)
