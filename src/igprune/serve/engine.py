"""The generation side of `igprune serve`: one queue per distinct mask, a fair batching scheduler, one worker.

A request is routed once, by its prompt, when it is admitted, and waits in the queue of its cluster's mask.
Clusters whose masks are equal share a queue (a fit's clusters often share masks: ig16-b15's 16 clusters
have 4). The worker leads each batch from one queue, in round-robin order over the masks with work: a
queue leads once the batch would be full (`max_batch`) or its oldest request has waited `max_wait`
seconds, so a request waits behind at most one batch led by every other mask per round. The batch takes
the leading queue's requests first, oldest first; with mixing on (`mix`, the default) it then fills its
free places from the other queues, first from the masks that add the fewest kept blocks to those the batch
already runs. Each row runs under its own cluster's mask (igprune.blocks.masked_rows): a block kept by
some rows runs for those rows (an attention for all of them), so a mixed batch costs about its union of
kept blocks per step, where split batches would each cost a step; on a CPU a step costs nearly the same
for 2 rows as for 8 (benchmarks/serve_load.py). With mixing off every batch has one mask. All model calls
run in that one thread (torch is not async); the asyncio side only admits, queues and reads each job's
events.

A batch is left-padded and run by one HF generate with row masks, exactly as DynamicPrunedModel.generate
runs a batch; sampling and stop conditions are per row (a logits processor and a stopping criterion), so
greedy rows see unchanged logits and a batch of one is the offline path. Metrics label a batch by its mask
queue, or "mixed" when its rows have several masks (with how many masks each batch had).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from igprune.dynamic import DynamicPrunedModel
from igprune.files import IGPruneError
from igprune.masks import mask_row

log = logging.getLogger("igprune.serve")
FAILED = "internal error while generating; the server log has the details under request id {rid}"


def generate_under_masks(dynamic: DynamicPrunedModel, clusters: list[int], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, **generate_kwargs) -> torch.Tensor:
    """The one place the server runs the model: HF generate with row i under cluster `clusters[i]`'s mask, as
    stage 2 does."""
    with dynamic.use_clusters(clusters):
        return dynamic.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      pad_token_id=dynamic.tokenizer.pad_token_id, **generate_kwargs)


class Overloaded(IGPruneError):
    """The admission queue is full; the client should retry later (HTTP 429)."""


@dataclass
class Sampling:
    """What one request asks for. temperature 0 is greedy (the offline path)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class Job:
    """One request on its way through the scheduler; the worker reports to it through `events`.

    Events are ("delta", text), then ("done", finish_reason) or ("error", status, message). An unseeded sampled
    job draws its seed here, once, so that a rerun of it (see Scheduler._run) repeats the text already sent.
    """

    def __init__(self, prompt_ids: list[int], sampling: Sampling, cluster: int, loop: asyncio.AbstractEventLoop,
                 rid: str = "-"):
        self.prompt_ids, self.sampling, self.cluster, self.loop, self.rid = prompt_ids, sampling, cluster, loop, rid
        self.seed = sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(2**63)
        self.events: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []  # generated tokens, EOS included
        self.text = ""  # generated text so far, cut at a stop sequence
        self.sent = 0  # characters of `text` already reported
        self.finish: str | None = None
        self.cancelled = False
        self.batch_size = 0
        self.enqueued = time.monotonic()
        self.started: float | None = None

    def emit(self, *event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutting down): nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """Stop working for this job (client gone or timed out); the worker drops it at its next look."""
        self.cancelled = True

    def fail(self, status: int, message: str) -> None:
        self.finish = "error"
        self.emit("error", status, message)

    def restart(self) -> None:
        """Forget what was generated, not what was sent: a rerun of the same prompt, seed and mask makes the same
        tokens, and only the text past `sent` is reported again."""
        self.ids, self.text, self.finish = [], "", None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters must wait: an unfinished UTF-8 character, or the start of a stop sequence."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


class _RowSampler(LogitsProcessor):
    """Per-row temperature / top-p sampling with the row's own seeded generator.

    The drawn token gets score 0 and every other -inf, so generate's greedy pick takes it; greedy rows
    are left untouched. Scores are shifted to a maximum of 0 and divided in float64, so that any positive
    temperature, however tiny (5e-324), gives the greedy token, not nan.
    """

    def __init__(self, jobs: list[Job]):
        self.rows = [(i, job.sampling, torch.Generator().manual_seed(job.seed))
                     for i, job in enumerate(jobs) if job.sampling.temperature > 0]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, s, generator in self.rows:
            row = scores[i].double().cpu()  # float32 would round a temperature below ~1e-45 to 0
            probs = torch.softmax((row - row.max()) / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs >= s.top_p  # the first token always stays
                probs[order[outside]] = 0.0
            token = int(torch.multinomial(probs, 1, generator=generator))
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


class _RowStops(StoppingCriteria):
    """Hands each new token to its job and says which rows are done (generate pads them from then on)."""

    def __init__(self, jobs: list[Job], on_token: Callable[[Job, int], bool]):
        self.jobs, self.on_token = jobs, on_token
        self.done = [False] * len(jobs)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if not self.done[i]:
                self.done[i] = self.on_token(self.jobs[i], token)
        return torch.tensor(self.done, device=input_ids.device)


class Scheduler:
    """Bounded admission, one queue per distinct mask, fair round-robin batching, one generation thread."""

    def __init__(self, dynamic: DynamicPrunedModel, max_batch: int = 8, max_wait: float = 0.01,
                 max_queue: int = 64, mix: bool = True,
                 on_batch: Callable[[list[int], int, int, float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise IGPruneError("max_batch and max_queue must be at least 1 and max_wait not negative")
        self.dynamic, self.max_batch, self.max_wait, self.max_queue = dynamic, max_batch, max_wait, max_queue
        self.mix = mix
        self.on_batch = on_batch  # (the batch's mask queues, batch size, generated tokens, seconds), for metrics
        self.n_clusters = dynamic.masks.shape[0]
        distinct: dict[str, int] = {}
        # cluster -> its mask's queue: clusters with equal masks share one
        self.queue_of = [distinct.setdefault(mask_row(dynamic.mask_for(k)), len(distinct))
                         for k in range(self.n_clusters)]
        self.queue_masks = [dynamic.mask_for(self.queue_of.index(q)) for q in range(len(distinct))]
        self.queues: dict[int, deque[Job]] = {q: deque() for q in range(len(distinct))}
        self.waiting = 0  # admitted and not yet started: routing or queued
        self.cond = threading.Condition()
        self.held = False
        self.stopping = False
        self.next_queue = 0
        self.tokenizer = dynamic.tokenizer
        eos = dynamic.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.thread = threading.Thread(target=self._work, name="igprune-generate", daemon=True)

    # --- the asyncio side ---------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout)

    def admit(self) -> None:
        """Take a place in the queue, or raise Overloaded; pair with submit() or withdraw()."""
        with self.cond:
            if self.waiting >= self.max_queue:
                raise Overloaded(f"server busy: {self.waiting} requests waiting (max {self.max_queue}); retry later")
            self.waiting += 1

    def withdraw(self) -> None:
        with self.cond:
            self.waiting -= 1

    def submit(self, job: Job) -> None:
        with self.cond:
            self.queues[self.queue_of[job.cluster]].append(job)
            self.cond.notify_all()

    def depth(self, cluster: int | None = None) -> int:
        """Requests of one cluster waiting in its mask's queue, or admitted and waiting overall."""
        if cluster is None:
            return self.waiting
        return sum(job.cluster == cluster for job in self.queues[self.queue_of[cluster]])

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Start no new batch inside the with-block (requests still queue): for draining, and for tests."""
        with self.cond:
            self.held = True
        try:
            yield
        finally:
            with self.cond:
                self.held = False
                self.cond.notify_all()

    # --- the worker thread --------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        """The next batch, led by the first mask queue in round-robin order whose oldest request has waited long
        enough or whose batch would be full (with mixing: counting every queue's requests)."""
        with self.cond:
            while not self.stopping:
                now, soonest = time.monotonic(), None
                if not self.held:
                    for queue in self.queues.values():
                        while queue and queue[0].cancelled:
                            queue.popleft()
                            self.waiting -= 1
                    queued = sum(len(queue) for queue in self.queues.values())
                    for step in range(len(self.queues)):
                        k = (self.next_queue + step) % len(self.queues)
                        queue = self.queues[k]
                        if not queue:
                            continue
                        due = queue[0].enqueued + self.max_wait
                        if (queued if self.mix else len(queue)) >= self.max_batch or now >= due:
                            self.next_queue = k + 1
                            batch = self._batch(k)
                            self.waiting -= len(batch)
                            return [job for job in batch if not job.cancelled]
                        soonest = due if soonest is None else min(soonest, due)
                self.cond.wait(None if soonest is None else soonest - now)
        return None

    def _batch(self, lead: int) -> list[Job]:
        """Queue `lead`'s oldest requests; with mixing, the free places then go to the queues whose masks add the
        fewest blocks to those the batch runs already (ties: the oldest request first)."""
        batch = self._pop(lead, self.max_batch)
        kept = self.queue_masks[lead].clone()
        others = [k for k, queue in self.queues.items() if k != lead and queue] if self.mix else []
        while others and len(batch) < self.max_batch:
            best = min(others, key=lambda k: (int((self.queue_masks[k] & ~kept).sum()), self.queues[k][0].enqueued))
            batch += self._pop(best, self.max_batch - len(batch))
            kept |= self.queue_masks[best]
            others.remove(best)
        return batch

    def _pop(self, k: int, n: int) -> list[Job]:
        queue = self.queues[k]
        return [queue.popleft() for _ in range(min(n, len(queue)))]

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        """Generate a batch; when it fails, rerun each of its unanswered requests alone, so that one request's failure
        is its own: only a request that fails alone gets a 500, with a request id and no details (they go to the
        log)."""
        try:
            self._generate(batch)
        except Exception:
            left = [job for job in batch if job.finish is None]
            if len(batch) == 1:
                log.exception("request %s failed in generation", batch[0].rid)
                for job in left:
                    job.fail(500, FAILED.format(rid=job.rid))
                return
            log.warning("a batch of %d failed; rerunning its %d unanswered requests one by one", len(batch),
                        len(left), exc_info=True)
            for job in left:
                job.restart()
                self._run([job])

    def _generate(self, batch: list[Job]) -> None:
        pad = self.tokenizer.pad_token_id
        width = max(len(job.prompt_ids) for job in batch)
        input_ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch])
        attention = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch])
        start = time.monotonic()
        for job in batch:
            job.started, job.batch_size = start, len(batch)
        sampler = _RowSampler(batch)
        generate_under_masks(self.dynamic, [job.cluster for job in batch], input_ids.to(self.dynamic.device),
                             attention.to(self.dynamic.device), do_sample=False,
                             max_new_tokens=max(job.sampling.max_tokens for job in batch),
                             stopping_criteria=StoppingCriteriaList([_RowStops(batch, self._on_token)]),
                             logits_processor=LogitsProcessorList([sampler] if sampler.rows else []))
        for job in batch:
            if job.finish is None:  # generate ended without this row deciding (should not happen)
                self._finish(job, "length")
        if self.on_batch is not None:
            queues = sorted({self.queue_of[job.cluster] for job in batch})
            self.on_batch(queues, len(batch), sum(len(job.ids) for job in batch), time.monotonic() - start)

    def _on_token(self, job: Job, token: int) -> bool:
        """Take one new token for `job`: report new text, decide whether the row is done."""
        if job.cancelled:
            job.finish = "cancelled"
            return True
        job.ids.append(token)
        if token in self.eos:
            return self._finish(job, "stop")
        text = self.tokenizer.decode(job.ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s, job.sent) for s in job.sampling.stop) if i >= 0]
        if cuts:
            job.text = text[:min(cuts)]
            return self._finish(job, "stop")
        job.text = text
        if len(job.ids) >= job.sampling.max_tokens:
            return self._finish(job, "length")
        ready = len(text) - held_back(text, job.sampling.stop)
        if ready > job.sent:
            job.emit("delta", text[job.sent:ready])
            job.sent = ready
        return False

    def _finish(self, job: Job, reason: str) -> bool:
        """End the job; a character cut by max_tokens or EOS is dropped from the text (its bytes never came), not
        sent as U+FFFD."""
        job.text = job.text.rstrip("\ufffd")
        if len(job.text) > job.sent:
            job.emit("delta", job.text[job.sent:])
            job.sent = len(job.text)
        job.finish = reason
        job.emit("done", reason)
        return True
