"""Wall-clock speed of a pruned model: prefill and decode tokens per second, dense against each mask.

What is timed, per configuration (a mask and a KV policy), with the same prompt and batch for all:

    prefill   one forward over the prompt into a fresh KV cache, logits for the last position only
              (what generate's first step computes)
    decode    `new_tokens` greedy one-token forwards on that cache (no EOS stop, so every configuration
              does the same number of steps)
    routing   the router's encoder on the prompt (its first encoder_tokens tokens) plus the nearest-
              centroid search; timed on its own and added to the pruned configurations' end-to-end time

A shared machine is noisy, so: a fixed thread count (recorded), warm-up rounds, and repeats in which the
configurations are interleaved (and their order rotated), so load hits all of them alike. Decoding is
interleaved finely: every configuration keeps its own cache and they take turns by chunks of a few steps,
so each one's decode time is spread over the same minutes (the caches of all configurations are held at
once, a few tens of MB each for a small model at 640 tokens). A speedup is the
median over repeats of the ratio to dense *within the same repeat*; times are medians with min and max.
Every time is also read on the process's CPU clock: with one thread, CPU-time speedups do not count time
slices lost to other processes (shared caches and memory bandwidth still affect them). Each speedup stands
beside its FLOPs-ideal value from igprune.evaluation.flops.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.blocks import KVPolicy, control_of, masked
from igprune.bundle import Bundle
from igprune.encoder import DEFAULT_ENCODER, SentenceEncoder
from igprune.evaluation.flops import ORDERS, Order, canonical_mask, decode_flops, flops
from igprune.files import IGPruneError
from igprune.masks import skipped_blocks
from igprune.routing import Router


@dataclass
class SpeedSettings:
    prompt_tokens: int = 512
    new_tokens: int = 128
    batch_size: int = 1
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None  # None: keep torch's current setting (recorded either way)
    decode_chunk: int = 8  # decode steps a configuration runs before the next one takes its turn

    def validate(self) -> None:
        if min(self.prompt_tokens, self.new_tokens, self.batch_size, self.repeats, self.decode_chunk) < 1 or \
                self.warmup < 0:
            raise IGPruneError("prompt tokens, new tokens, batch size, repeats and decode chunk must be >= 1, "
                               "warm-up >= 0")


@dataclass
class Candidate:
    """One configuration to time: a mask (None = dense) under a KV policy, routed by `router` if given."""

    label: str
    mask: torch.Tensor | None
    kv_policy: KVPolicy = "keep"
    router: str | None = None  # key into the routers passed to bench_speed
    source: dict[str, Any] = field(default_factory=dict)  # where the mask came from (bundle, order, cluster)


def stand_in_router(n_clusters: int = 16, encoder_tokens: int = 64, seed: int = 0,
                    encoder: str = DEFAULT_ENCODER) -> Router:
    """For masks without a bundle: the encoder and random unit centroids, which cost exactly what a fitted pool
    of that size costs (routing time does not depend on where the centroids are)."""
    embedder = SentenceEncoder(encoder, max_tokens=encoder_tokens)
    centroids = torch.randn(n_clusters, embedder.dim, generator=torch.Generator().manual_seed(seed))
    return Router(centroids / centroids.norm(dim=1, keepdim=True), embedder)


def order_candidates(n_blocks: int, counts: Sequence[int], kv_policies: Sequence[KVPolicy],
                     order: Order = "attention-first", router: str | None = None) -> list[Candidate]:
    """One candidate per block count and KV policy, masks from a canonical order (igprune.evaluation.flops)."""
    return [Candidate(f"{k}/{n_blocks} {order}", canonical_mask(n_blocks, k, order), policy, router,
                      {"order": order}) for k in counts for policy in kv_policies]


def bundle_candidates(model: PreTrainedModel, bundles: Sequence[str | Path], prompt_text: str,
                      kv_policies: Sequence[KVPolicy]) -> tuple[list[Candidate], dict[str, Router]]:
    """For each bundle, the mask its router picks for the prompt (the real dynamic path), per KV policy."""
    candidates, routers = [], {}
    for path in bundles:
        bundle = Bundle.load(path)
        bundle.check_model(model, str(path))
        router = Router.from_bundle(bundle)
        cluster = router.route([prompt_text])[0].cluster
        name = Path(path).name if Path(path).name not in routers else str(path)
        routers[name] = router
        source = {"bundle": str(path), "method": bundle.config.get("method"), "n_clusters": bundle.n_clusters,
                  "cluster": cluster}
        candidates += [Candidate(f"{name} (cluster {cluster})", bundle.route_masks[cluster], policy,
                                 name if router.encoder else None, source) for policy in kv_policies]
    return candidates, routers


def build_prompt(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], n_tokens: int) -> tuple[torch.Tensor, str]:
    """Exactly `n_tokens` token ids (1, n) from the texts joined by blank lines, and the text they decode to."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text + "\n\n", add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            ids = ids[:n_tokens]
            return torch.tensor([ids]), tokenizer.decode(ids)
    raise IGPruneError(f"the prompt texts hold only {len(ids)} tokens; {n_tokens} are needed")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _summary(seconds: list[float]) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {"median": median, "min": min(seconds), "max": max(seconds),
            "spread_percent": 100 * (max(seconds) - min(seconds)) / median, "all": seconds}


Clock = tuple[float, float]  # (wall-clock seconds, CPU seconds of this process)


def _clock() -> Clock:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU runs ahead of the host: time what it has finished
    return time.perf_counter(), time.process_time()


def _since(start: Clock) -> Clock:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


@dataclass
class _Generation:
    """One configuration's greedy generation in progress: its cache, next input token and times so far."""

    cache: DynamicCache
    token: torch.Tensor
    prefill: Clock
    decode: Clock = (0.0, 0.0)


def _prefill(model: PreTrainedModel, ids: torch.Tensor) -> _Generation:
    """Prefill under the current mask into a fresh cache, logits for the last position only."""
    cache = DynamicCache(config=model.config)
    started = _clock()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    return _Generation(cache, token, _since(started))


def _decode(model: PreTrainedModel, gen: _Generation, steps: int) -> None:
    """`steps` greedy one-token forwards under the current mask, their time added to gen.decode."""
    started = _clock()
    for _ in range(steps):
        out = model(input_ids=gen.token, past_key_values=gen.cache, use_cache=True, logits_to_keep=1)
        gen.token = out.logits[:, -1].argmax(-1, keepdim=True)
    took = _since(started)
    gen.decode = (gen.decode[0] + took[0], gen.decode[1] + took[1])


def _time_routing(router: Router, texts: list[str]) -> Clock:
    started = _clock()
    router.route(texts)
    return _since(started)


def _routing_flops(router: Router, texts: list[str]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        router.route(texts)
    return int(counter.get_total_flops())


@torch.inference_mode()
def bench_speed(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_text: str, candidates: Sequence[Candidate],
                routers: dict[str, Router] | None = None, settings: SpeedSettings | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Time dense and every candidate; returns a JSON-ready dict (settings, machine, routers, results).

    A dense configuration is added first if the candidates hold none.
    """
    settings = settings or SpeedSettings()
    settings.validate()
    routers = routers or {}
    missing = {c.router for c in candidates if c.router} - set(routers)
    if missing:
        raise IGPruneError(f"candidates name routers that were not given: {sorted(missing)}")
    if not any(c.mask is None for c in candidates):
        candidates = [Candidate("dense", None), *candidates]
    ids = prompt_ids[:, : settings.prompt_tokens].repeat(settings.batch_size, 1).to(model.device)
    if ids.shape[1] < settings.prompt_tokens:
        raise IGPruneError(f"the prompt has {ids.shape[1]} tokens; {settings.prompt_tokens} are needed")
    texts = [prompt_text] * settings.batch_size
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    machine = machine_info()
    times: dict[int, list[dict[str, Clock]]] = {i: [] for i in range(len(candidates))}
    route_times: dict[str, list[Clock]] = {name: [] for name in routers}
    from tqdm import tqdm

    rounds = tqdm(range(settings.warmup + settings.repeats), desc=f"timing {len(candidates)} configurations",
                  unit="round", disable=not distributed.shows_progress(progress) or None)
    try:
        with control_of(model).active():  # installed once for the whole run, so no scope's cost is timed
            _rounds(model, ids, texts, candidates, routers, settings, rounds, times, route_times)
        machine["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    finally:
        torch.set_num_threads(threads_before)
    return _report(model, candidates, routers, times, route_times, texts, settings, machine)


def _rounds(model: PreTrainedModel, ids: torch.Tensor, texts: list[str], candidates: Sequence[Candidate],
            routers: dict[str, Router], settings: SpeedSettings, rounds: Iterable[int],
            times: dict[int, list[dict[str, Clock]]], route_times: dict[str, list[Clock]]) -> None:
    """Warm-up and measured rounds, configurations interleaved and their order rotated; times appended."""
    for round_ in rounds:
        measured = round_ >= settings.warmup
        for name, router in routers.items():
            seconds = _time_routing(router, texts)
            if measured:
                route_times[name].append(seconds)
        shift = round_ % len(candidates)
        order = [*range(shift, len(candidates)), *range(shift)]
        generations = {}
        for i in order:
            with masked(model, candidates[i].mask, candidates[i].kv_policy):
                generations[i] = _prefill(model, ids)
        for start in range(0, settings.new_tokens, settings.decode_chunk):
            for i in order:
                with masked(model, candidates[i].mask, candidates[i].kv_policy):
                    _decode(model, generations[i], min(settings.decode_chunk, settings.new_tokens - start))
        if measured:
            for i, gen in generations.items():
                times[i].append({"prefill": gen.prefill, "decode": gen.decode})
        del generations


def _report(model: PreTrainedModel, candidates: Sequence[Candidate], routers: dict[str, Router],
            times: dict[int, list[dict[str, Clock]]], route_times: dict[str, list[Clock]], texts: list[str],
            settings: SpeedSettings, machine: dict[str, Any]) -> dict[str, Any]:
    s = settings
    dense = next(i for i, c in enumerate(candidates) if c.mask is None)
    routing = {name: {"encoder": router.encoder.name if router.encoder else None,
                      "encoder_tokens": router.encoder.max_tokens if router.encoder else 0,
                      "n_clusters": router.n_clusters, "seconds": _summary([t[0] for t in route_times[name]]),
                      "cpu_seconds": _summary([t[1] for t in route_times[name]]),
                      "flops": _routing_flops(router, texts) if router.encoder else 0}
               for name, router in routers.items()}
    ideal = {}
    for i, c in enumerate(candidates):
        prefill = flops(model.config, c.mask, s.prompt_tokens, c.kv_policy, batch=s.batch_size, logits="last")["total"]
        decode = decode_flops(model.config, c.mask, s.prompt_tokens, s.new_tokens, c.kv_policy, s.batch_size)
        route = routing[c.router]["flops"] if c.router else 0
        ideal[i] = {"prefill": prefill, "decode": decode, "end_to_end": prefill + decode + route}
    def seconds(i: int, clock: int) -> dict[str, list[float]]:
        """Per phase, one time per repeat: wall-clock (clock 0) or CPU (1); end to end includes routing."""
        c = candidates[i]
        route = [t[clock] for t in route_times[c.router]] if c.router else [0.0] * s.repeats
        out = {phase: [t[phase][clock] for t in times[i]] for phase in ("prefill", "decode")}
        out["end_to_end"] = [r + p + d for r, p, d in zip(route, out["prefill"], out["decode"], strict=True)]
        return out

    results = []
    for i, c in enumerate(candidates):
        phases, cpu = seconds(i, 0), seconds(i, 1)
        dense_phases, dense_cpu = seconds(dense, 0), seconds(dense, 1)
        route = [t[0] for t in route_times[c.router]] if c.router else [0.0]
        tokens = {"prefill": s.batch_size * s.prompt_tokens, "decode": s.batch_size * s.new_tokens,
                  "end_to_end": s.batch_size * s.new_tokens}
        off = skipped_blocks(c.mask) if c.mask is not None else {"attn": 0, "ffn": 0, "total": 0}
        entry: dict[str, Any] = {"label": c.label, "kv_policy": c.kv_policy, "router": c.router, **c.source,
                                 "blocks_skipped": off["total"], "attn_off": off["attn"], "ffn_off": off["ffn"],
                                 "mask": None if c.mask is None else c.mask.to(torch.int).tolist()}
        for phase, wall in phases.items():
            summary = _summary(wall)
            ratios = [d / t for d, t in zip(dense_phases[phase], wall, strict=True)]
            cpu_ratios = [d / t for d, t in zip(dense_cpu[phase], cpu[phase], strict=True)]
            entry[phase] = {
                "seconds": summary,
                "tokens_per_s": tokens[phase] / summary["median"],
                "speedup": statistics.median(ratios),
                "speedup_range": [min(ratios), max(ratios)],
                "cpu_seconds": _summary(cpu[phase]),
                "cpu_speedup": statistics.median(cpu_ratios),
                "flops": ideal[i][phase],
                "flops_speedup": ideal[dense][phase] / ideal[i][phase],
            }
        entry["routing_percent_of_prefill"] = 100 * statistics.median(route) / statistics.median(phases["prefill"])
        entry["routing_percent_of_request"] = 100 * statistics.median(route) / statistics.median(
            [p + d for p, d in zip(phases["prefill"], phases["decode"], strict=True)])  # prefill + new_tokens
        results.append(entry)
    return {"model": model.name_or_path, "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": str(model.device),
            "settings": asdict(s), "machine": machine, "routers": routing, "results": results,
            "notes": "end_to_end tokens_per_s counts generated tokens over routing + prefill + decode time; "
                     "speedups are medians of per-repeat ratios to dense (wall clock); cpu_speedup the same on "
                     "this process's CPU time, which time slices lost to other processes do not inflate; "
                     "flops_speedup is the FLOPs-ideal ratio"}


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for printing a report: tok/s, measured and FLOPs-ideal speedups, spread, routing."""
    header = ["config", "kv", "off (attn/ffn)", "prefill tok/s", "x dense", "(CPU)", "x FLOPs-ideal", "decode tok/s",
              "x dense", "(CPU)", "x FLOPs-ideal", "end-to-end x", "routing % of prefill", "routing % of request",
              "spread % (p/d)"]
    rows = []
    for r in report["results"]:
        p, d, e = r["prefill"], r["decode"], r["end_to_end"]
        rows.append([r["label"], r["kv_policy"] if r["mask"] is not None else "-",
                     f"{r['blocks_skipped']} ({r['attn_off']}/{r['ffn_off']})",
                     f"{p['tokens_per_s']:.0f}", f"{p['speedup']:.3f}", f"{p['cpu_speedup']:.3f}",
                     f"{p['flops_speedup']:.3f}", f"{d['tokens_per_s']:.1f}", f"{d['speedup']:.3f}",
                     f"{d['cpu_speedup']:.3f}", f"{d['flops_speedup']:.3f}",
                     f"{e['speedup']:.3f}", f"{r['routing_percent_of_prefill']:.1f}",
                     f"{r['routing_percent_of_request']:.1f}",
                     f"{p['seconds']['spread_percent']:.0f}/{d['seconds']['spread_percent']:.0f}"])
    return header, rows


def run(model_name: str, bundles: Sequence[str | Path] = (), blocks: Sequence[int] = (8, 15, 22),
        kv_policies: Sequence[KVPolicy] = ("keep", "drop"), order: Order = "attention-first",
        settings: SpeedSettings | None = None, out: str | Path | None = None, device: str = "auto",
        dtype: str = "auto", progress: bool = True, encoder: str = DEFAULT_ENCODER) -> dict[str, Any]:
    """The `igprune bench-speed` job: load the model, take a held-out calibration prompt, time dense against
    each bundle's routed mask (or, with no bundles, canonical masks at `blocks` skipped, routed by `encoder`
    with random centroids), write JSON to `out`."""
    from igprune.data import load_calibration
    from igprune.files import write_json
    from igprune.models import load_model

    settings = settings or SpeedSettings()
    settings.validate()
    if not kv_policies or set(kv_policies) - {"keep", "drop"}:
        raise IGPruneError(f"kv policies must be keep and/or drop, not {list(kv_policies)}")
    if order not in ORDERS:
        raise IGPruneError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    prompt_ids, prompt_text = build_prompt(tokenizer, load_calibration("mixed", split="heldout"),
                                           settings.prompt_tokens)
    if bundles:
        candidates, routers = bundle_candidates(model, bundles, prompt_text, kv_policies)
    else:
        n_blocks = control_of(model).n_blocks
        routers = {"stand-in (16 random centroids)": stand_in_router(encoder=encoder)}
        candidates = order_candidates(n_blocks, blocks, kv_policies, order, next(iter(routers)))
    report = bench_speed(model, prompt_ids, prompt_text, candidates, routers, settings, progress)
    report["prompt"] = {"source": "load_calibration('mixed', split='heldout'), joined",
                        "tokens": settings.prompt_tokens, "text_start": prompt_text[:80]}
    if not bundles:
        report["order"] = {"name": order, "description": ORDERS[order]}
    if out is not None:
        write_json(Path(out), report)
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a titled markdown table, routing costs below it."""
    header, rows = table_rows(report)
    s = report["settings"]
    lines = [f"{report['model']}: {s['prompt_tokens']}-token prefill, {s['new_tokens']} decode steps, batch "
             f"{s['batch_size']}, {report['machine']['torch_threads']} thread(s), median of {s['repeats']} "
             f"(load average {report['machine']['load_average'][0]:.1f})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for name, r in report["routers"].items():
        if r["encoder"] is None:
            lines.append(f"\nrouting {name}: none (a static bundle)")
            continue
        lines.append(f"\nrouting {name}: {1000 * r['seconds']['median']:.1f} ms median, encoder reads at most "
                     f"{r['encoder_tokens']} tokens, {r['flops'] / 1e9:.2f} GFLOPs")
    return "\n".join(lines)
