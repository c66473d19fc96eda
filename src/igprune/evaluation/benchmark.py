"""`evaluate`: one model configuration (dense, static or dynamic) on zero-shot tasks (the paper's, the domains').

Tasks run one at a time through lm_eval.simple_evaluate (zero-shot, fixed seeds), each
result cached under a key of everything that decides it: model fingerprint, bundle content (masks,
centroids, encoder), task definition and data, limit, seed, dtype, device type and package versions. The
KV policy and batch size do not change log-likelihoods (up to float rounding) and are left out of the key.
So an interrupted benchmark resumes at the first task it has not finished, and a repeated run returns at
once. Values are each task's metric (tasks.METRIC: the paper's acc_norm, acc on winogrande; acc_bytes on the
cloze tasks) in percent, with lm-eval's standard error
(analytic for these mean metrics: no bootstrap is run, whatever `bootstrap_iters` says), and each document's
score in document order ("items"): two configurations on the same documents are then compared by paired
differences (results.paired_gain), whose error is far smaller than the two unpaired errors together. A routed
configuration also records each document's cluster ("clusters", same order), so a difference can be traced to
the clusters it comes from (results.gain_by_cluster).

Generative tasks (tasks.GENERATIVE: MBPP, GSM8K, HumanEval) keep their definitions' few-shot examples, greedy
decoding, stop sequences and max tokens, run through the model's chat template when it has one (`chat_template`),
score the code tasks by executing the model's code in an isolated child process (igprune.evaluation.execution),
and keep each problem's reply ("responses"). Their results are cached under the chat choice too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.blocks import KVPolicy
from igprune.bundle import Bundle, fingerprint
from igprune.data import eval_dataset_path
from igprune.evaluation.execution import MEMORY, TIMEOUT, isolation
from igprune.evaluation.results import (
    Configuration,
    ResultCache,
    config_hash,
    percentage,
    provenance,
    task_average,
    versions,
)
from igprune.evaluation.tasks import FILTER, GENERATIVE, GROUP, GROUPS, METRIC, PREFIX, definition
from igprune.files import IGPruneError, sha256_file

BOOTSTRAP_ITERS = 1000  # > 0 so lm-eval reports a stderr; acc/acc_norm use the closed form, not the bootstrap
ENTRY_FORMAT = 3  # 2: a task's entry carries its per-document scores, 3: and, routed, each document's cluster;
# cached entries of an older format are recomputed


def resolve_tasks(tasks: Sequence[str]) -> list[str]:
    """lm-eval task names, in column order, from groups ("paper6", "domains6"), lm-eval names or short names."""
    known = [task for group in GROUPS.values() for task in group]
    wanted: set[str] = set()
    for name in tasks:
        for part in (p.strip() for p in name.split(",") if p.strip()):
            if part in GROUPS:
                wanted.update(GROUPS[part])
            elif part in known or PREFIX + part in known:
                wanted.add(part if part in known else PREFIX + part)
            else:
                raise IGPruneError(f"unknown task {part!r}; use {' or '.join(GROUPS)}, or some of: "
                                   f"{', '.join(t.removeprefix(PREFIX) for t in known)}")
    if not wanted:
        raise IGPruneError(f"no tasks given; use {GROUP}")
    return [t for t in known if t in wanted]


def _task_key(model: PreTrainedModel, bundle_content: str | None, task: str, limit: int | None,
              seed: int, generation: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides one task's result; the results cache is keyed by it. A generative task's result
    also depends on how it generates (chat template, max_new_tokens, and the batch size: greedy rows padded into
    a batch can differ from the same rows alone in the last bits) and on the limits its code runs under."""
    generative = {**generation, "execution": [TIMEOUT, MEMORY]} if task in GENERATIVE else {}
    return {**generative, "model": model.name_or_path, "fingerprint": fingerprint(model), "bundle": bundle_content,
            "task": task, "task_sha256": config_hash([definition(task), sha256_file(eval_dataset_path(
                task.removeprefix(PREFIX)))]),
            "limit": limit, "num_fewshot": "task's" if task in GENERATIVE else 0, "seed": seed,
            "entry_format": ENTRY_FORMAT, "dtype": str(model.dtype),
            "device": model.device.type, "versions": dict(versions())}


def _task_result(output: dict[str, Any], task: str) -> dict[str, Any]:
    metric, kept = METRIC[task], FILTER.get(task, "none")
    scores = output["results"][task]
    stderr = scores.get(f"{metric}_stderr,{kept}")
    samples = sorted((s for s in output["samples"][task] if s.get("filter", "none") == kept),
                     key=lambda s: s["doc_id"])
    entry = {"metric": metric, "value": 100.0 * float(scores[f"{metric},{kept}"]),
             "stderr": 100.0 * float(stderr) if isinstance(stderr, (int, float)) else None,
             "n": int(output["n-samples"][task]["effective"]), "items": [float(s[metric]) for s in samples]}
    if task in GENERATIVE:
        entry["responses"] = [s["resps"][0][0] for s in samples]
    return entry


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bundle: Bundle | str | Path | None = None,
             tasks: Sequence[str] = (GROUP,), limit: int | None = None, batch_size: int = 8,
             kv_policy: KVPolicy = "keep", dense: dict[str, Any] | None = None, use_cache: bool = True,
             cache_dir: str | Path | None = None, seed: int = 0, progress: bool = True,
             chat_template: bool | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Zero-shot accuracy of `model` (dense), or of `model` pruned by `bundle`, as a results dict.

    Generative tasks run through the tokenizer's chat template when chat_template is True, or None and the
    tokenizer has one (an instruct model); each writes at most its definition's max tokens, or `max_new_tokens`.
    "percentage" is filled in against `dense` (a dense results dict) when given, else against a cached
    dense result for the same model, tasks and limit if there is one. `cache_dir` defaults to <cache>/results;
    use_cache=False recomputes every task (and refreshes the cache).
    """
    from tqdm import tqdm

    config = Configuration.load(model, bundle)
    names = resolve_tasks(tasks)
    if limit is not None and limit < 1:
        raise IGPruneError("limit must be a positive number of documents per task")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise IGPruneError("max_new_tokens must be a positive number of tokens")
    cache = ResultCache(cache_dir)
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    started = time.perf_counter()
    runner: _Runner | None = None
    results: dict[str, Any] = {"kind": "accuracy", **config.describe(), "limit": limit, "kv_policy": kv_policy,
                               "batch_size": batch_size, "tasks": {}, "routing": {} if config.dynamic else None}
    if any(task in GENERATIVE for task in names):
        results["generation"] = {"chat_template": chat, "decoding": "greedy", "max_new_tokens": max_new_tokens
                                 or "the task's", "execution": isolation()}
    generation = {"chat_template": chat, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    for task in tqdm(names, desc="tasks", unit="task", disable=not distributed.shows_progress(progress) or None):
        key = _task_key(model, config.content_sha256, task, limit, seed, generation)
        entry = cache.get(key) if use_cache else None
        if entry is not None:
            entry["cached"] = True
        else:
            runner = runner or _Runner(config, tokenizer, batch_size, kv_policy, seed)
            entry = runner.run(task, limit, chat, max_new_tokens)
            cache.put(key, entry)
            entry["cached"] = False
        short = task.removeprefix(PREFIX)
        routing = entry.pop("routing", None)
        if config.dynamic:
            results["routing"][short] = routing
        results["tasks"][short] = entry
    results["average"], results["average_stderr"] = task_average(results["tasks"])
    results["dense_average"], results["percentage"] = _compare(results, dense, model, names, limit, seed, cache,
                                                               generation)
    results["provenance"] = {**provenance(seed, str(model.device), str(model.dtype).removeprefix("torch.")),
                             "bundle": config.identity(), "bootstrap_iters": BOOTSTRAP_ITERS,
                             "seconds": {"total": round(time.perf_counter() - started, 1),
                                         "routing": round(runner.lm.routing_seconds, 1) if runner else 0.0}}
    return results


def _compare(results: dict[str, Any], dense: dict[str, Any] | None, model: PreTrainedModel, names: list[str],
             limit: int | None, seed: int, cache: ResultCache,
             generation: dict[str, Any]) -> tuple[float | None, float | None]:
    """(dense average, percentage of it) from `dense`, the result itself if dense, or the cache; else Nones."""
    if results["method"] == "dense":
        return results["average"], 100.0
    if dense is None:
        entries = [cache.get(_task_key(model, None, task, limit, seed, generation)) for task in names]
        if any(e is None for e in entries):
            return None, None
        dense = {"method": "dense", "model": results["model"], "limit": limit,
                 "tasks": {t.removeprefix(PREFIX): e for t, e in zip(names, entries, strict=True)},
                 "average": sum(e["value"] for e in entries) / len(entries)}
    return dense["average"], percentage(results, dense)


class _Runner:
    """The lm-eval side, built only when some task is not cached (importing lm-eval takes seconds)."""

    def __init__(self, config: Configuration, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                 kv_policy: KVPolicy, seed: int):
        from igprune.dynamic import DynamicPrunedModel
        from igprune.evaluation.harness import IGPruneLM
        from igprune.evaluation.tasks import task_manager

        pruned = None
        if config.bundle is not None:
            pruned = DynamicPrunedModel.from_bundle(config.model, config.bundle, tokenizer, kv_policy=kv_policy)
        self.lm = IGPruneLM(config.model, tokenizer, pruned, batch_size=batch_size)
        self.manager = task_manager()
        self.seed = seed

    def run(self, task: str, limit: int | None, chat: bool = False,
            max_new_tokens: int | None = None) -> dict[str, Any]:
        import lm_eval

        self.lm.reset_routing()
        generative = task in GENERATIVE
        what: Any = task
        if generative:  # built here to route each prompt by its document's own text
            from lm_eval.tasks import get_task_dict

            what = get_task_dict([task], self.manager)[task]
            self.lm.route_text = what.doc_to_text
        self.lm.batch_clusters.clear()
        started, cpu = time.perf_counter(), time.process_time()
        lm_logger = logging.getLogger("lm_eval")
        level = lm_logger.level
        lm_logger.setLevel(logging.ERROR)  # per-task INFO/WARNING chatter (seeds, fewshot overrides)
        try:
            output = lm_eval.simple_evaluate(
                model=self.lm, tasks=[what], task_manager=self.manager, limit=limit,
                num_fewshot=None if generative else 0, apply_chat_template=chat and generative,
                confirm_run_unsafe_code=generative,
                gen_kwargs={"max_gen_toks": max_new_tokens} if generative and max_new_tokens else None,
                bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True,
                random_seed=self.seed, numpy_random_seed=self.seed, torch_random_seed=self.seed,
                fewshot_random_seed=self.seed)
        finally:
            lm_logger.setLevel(level)
            self.lm.route_text = None
        # under torchrun each rank scored a share of the documents and rank 0 holds the result: all get it
        entry = distributed.on_main(lambda: _task_result(output, task))
        # CPU seconds as well as wall: on a shared machine wall time depends on the neighbours' load
        entry["seconds"] = round(time.perf_counter() - started, 1)
        entry["cpu_seconds"] = round(time.process_time() - cpu, 1)
        if generative and self.lm.batch_clusters:  # generation batches by how many clusters their rows had
            entry["batches"] = {str(k): v for k, v in sorted(Counter(self.lm.batch_clusters).items())}
        # each rank routed its share of the documents: the cluster of every document, in document order as "items"
        clusters = {doc: c for share in distributed.all_gather(self.lm.document_clusters(task)) for doc, c in
                    share.items()}
        routing = dict(sorted(Counter(clusters.values()).items()))
        entry["routing"] = {str(k): v for k, v in routing.items()} if routing else None
        entry["clusters"] = [clusters[doc] for doc in sorted(clusters)] if clusters else None
        return entry
