"""Serving under load: `igprune serve` at concurrency 1, 4 and 16, dense against a static mask and IG-Pruning.

For each of dense smollm2-135m, the SLEB static mask (sleb-b15) and the IG-Pruning bundle (ig16-b15, 16
clusters, 4 distinct masks) served twice, with batches that mix masks (ig16-b15, the default) and with
batches split by mask (ig16-b15-split), one in-process server (127.0.0.1, ephemeral port) answers the same
mixed-domain held-out prompts (load_calibration("mixed", split="heldout"), cut to --prompt-chars) sent by
the openai client, streamed and greedy, from C threads at once. Reported per (method, C): requests/s,
generated tokens/s, p50/p99 time-to-first-token and latency over the requests, mean batch size, mean masks
per batch, and the share of answers equal to the C=1 answers of the first round (a batch of one is the
offline path; larger batches are left-padded). Every method runs in every one of --rounds rounds, so a
machine's drift hits all alike; the table gives the median over rounds, and each tokens/s ratio (IG over
static, each over dense) is paired within a round. With 32 requests a C=16 row is several batches, not one
wave.

The FLOPs-ideal speedup of a method is dense decoder FLOPs per generated token over the method's
(igprune.evaluation.flops, kv_policy keep): each request's prefill of its prompt tokens (logits at the last
position) and --max-tokens - 1 decode steps, under the mask the request got (its routed cluster's, for IG);
the routing encoder is not counted. Each method's tokens/s over dense is reported against it. Writes
benchmarks/results/serve_load.json:

    nice -n 10 python benchmarks/serve_load.py [--requests 32 --rounds 3 --max-tokens 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

from igprune.bundle import Bundle, fingerprint
from igprune.data import load_calibration
from igprune.dynamic import DynamicPrunedModel
from igprune.evaluation.flops import decode_flops, flops
from igprune.evaluation.speed import machine_info
from igprune.files import write_json
from igprune.models import load_model
from igprune.serve import BackgroundServer, ServeSettings, create_app
from igprune.serve.engine import Scheduler

ROOT = Path(__file__).parent
BUNDLES = ROOT / "bundles" / "smollm2-135m"
# method -> (bundle, whether batches mix masks); dense and sleb-b15 have one mask, so mixing changes nothing
METHODS = {"dense": (None, True), "sleb-b15": (BUNDLES / "sleb-b15", True), "ig16-b15": (BUNDLES / "ig16-b15", True),
           "ig16-b15-split": (BUNDLES / "ig16-b15", False)}
PRUNED = ["sleb-b15", "ig16-b15", "ig16-b15-split"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def one_request(client: openai.OpenAI, name: str, prompt: str, max_tokens: int) -> dict:
    """Stream one greedy completion; time to first text and to the end, the text and its cluster."""
    start = time.monotonic()
    first, pieces, usage, extra = None, [], None, {}
    for chunk in client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.monotonic()
            pieces.append(chunk.choices[0].text)
        usage = chunk.usage or usage
        extra = chunk.model_extra.get("igprune", extra)
    end = time.monotonic()
    return {"ttft": (first or end) - start, "latency": end - start, "text": "".join(pieces),
            "tokens": usage.completion_tokens, "cluster": extra.get("cluster"), "batch_size": extra.get("batch_size")}


def load(client: openai.OpenAI, name: str, prompts: list[str], concurrency: int, max_tokens: int,
         masks_per_batch: list[int]) -> tuple[dict, list]:
    """One (method, C) row; `masks_per_batch` is the server's running record of its batches."""
    start, before = time.monotonic(), len(masks_per_batch)
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda p: one_request(client, name, p, max_tokens), prompts, timeout=600))
    wall = time.monotonic() - start
    ttft, latency = [a["ttft"] for a in answers], [a["latency"] for a in answers]
    return {
        "concurrency": concurrency, "requests": len(prompts), "wall_seconds": round(wall, 3),
        "requests_per_second": round(len(prompts) / wall, 3),
        "tokens_per_second": round(sum(a["tokens"] for a in answers) / wall, 2),
        "ttft_p50": round(percentile(ttft, 50), 4), "ttft_p99": round(percentile(ttft, 99), 4),
        "latency_p50": round(percentile(latency, 50), 4), "latency_p99": round(percentile(latency, 99), 4),
        "mean_batch_size": round(statistics.mean(a["batch_size"] for a in answers), 2),
        "mean_masks_per_batch": round(statistics.mean(masks_per_batch[before:]), 2),
        "clusters_used": len({a["cluster"] for a in answers}),
    }, answers


def recording(scheduler: Scheduler) -> list[int]:
    """The number of distinct masks of every batch the scheduler runs from now on (its metrics still see them)."""
    seen, report = [], scheduler.on_batch

    def on_batch(queues: list[int], *rest) -> None:
        seen.append(len(queues))
        report(queues, *rest)

    scheduler.on_batch = on_batch
    return seen


def flops_per_token(config, masks: list[torch.Tensor], prompt_lengths: list[int], new_tokens: int) -> float:
    """Decoder FLOPs per generated token of requests each under its own mask: the prompt's prefill (logits at
    its last position) and new_tokens - 1 one-token decode steps, as generate runs them."""
    total = sum(flops(config, mask, n, "keep", logits="last")["total"] + decode_flops(config, mask, n, new_tokens - 1)
                for mask, n in zip(masks, prompt_lengths, strict=True))
    return total / (len(masks) * new_tokens)


def pruned(model, tokenizer, bundle: Path | None) -> DynamicPrunedModel:
    """The bundle's routed model; dense is a one-cluster bundle that runs every block."""
    if bundle is None:
        masks = torch.ones(1, 2 * model.config.num_hidden_layers, dtype=torch.bool)
        bundle = Bundle(masks, torch.zeros(1, 0), {"fingerprint": fingerprint(model), "model": "smollm2-135m"})
    return DynamicPrunedModel.from_bundle(model, bundle, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per (method, concurrency, round)")
    parser.add_argument("--rounds", type=int, default=3, help="every method at every C, this many times")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-chars", type=int, default=200, help="each prompt's first characters")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch", type=int, default=ServeSettings.max_batch)
    parser.add_argument("--max-wait-ms", type=float, default=ServeSettings.max_wait_ms)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve_load.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [p[:args.prompt_chars] for p in load_calibration("mixed", "heldout", limit=args.requests, seed=args.seed)]
    model, tokenizer = load_model("smollm2-135m")
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=4 * args.requests)
    rows, first, masks_of = [], {}, {}
    for round_ in range(args.rounds):  # every method in every round: drift on a shared machine hits all alike
        for method, (bundle, mix) in METHODS.items():
            dynamic = pruned(model, tokenizer, bundle)
            app = create_app(dynamic, method, dataclasses.replace(settings, mix_masks=mix))
            masks_per_batch = recording(app.state.scheduler)
            with BackgroundServer(app).running() as url:
                client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
                one_request(client, method, prompts[0], 2)  # warm-up
                for concurrency in args.concurrency:
                    row, answers = load(client, method, prompts, concurrency, args.max_tokens, masks_per_batch)
                    texts = first.setdefault(method, [a["text"] for a in answers])  # round 0's lowest C
                    masks_of.setdefault(method, [dynamic.mask_for(a["cluster"]) for a in answers])
                    row["same_as_first_concurrency"] = round(
                        sum(a["text"] == b for a, b in zip(answers, texts, strict=True)) / len(texts), 3)
                    rows.append({"method": method, "round": round_, **row})
                    print(f"round {round_} {method} C={concurrency}: {row['tokens_per_second']} tok/s", flush=True)
    lengths = [len(ids) for ids in tokenizer(prompts).input_ids]
    per_token = {m: flops_per_token(model.config, masks, lengths, args.max_tokens) for m, masks in masks_of.items()}
    ideal = {m: per_token["dense"] / per_token[m] for m in METHODS}
    summary = summarise(rows, args.concurrency, ideal)
    report = {"machine": machine_info(), "model": "smollm2-135m (fp32, CPU)", "bundles": {
        m: str(b.relative_to(ROOT)) if b else None for m, (b, _) in METHODS.items()},
        "mix_masks": {m: mix for m, (_, mix) in METHODS.items()},
        "settings": {**vars(args), "out": str(args.out), "kv_policy": "keep", "prompts": "mixed heldout",
                     "max_queue": settings.max_queue},
        "flops_per_generated_token": per_token, "flops_ideal_speedup": ideal, "summary": summary, "rows": rows}
    write_json(args.out, report)
    head = ["method", "C", "req/s", "tok/s", "TTFT p50", "TTFT p99", "latency p50", "latency p99", "batch",
            "masks/batch", "same as C=1"]
    print(f"medians over {args.rounds} rounds\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in summary["medians"]:
        print(f"| {r['method']} | {r['concurrency']} | {r['requests_per_second']:.2f} | {r['tokens_per_second']:.1f} | "
              f"{r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p99'] * 1000:.0f} ms | {r['latency_p50'] * 1000:.0f} ms | "
              f"{r['latency_p99'] * 1000:.0f} ms | {r['mean_batch_size']:.1f} | {r['mean_masks_per_batch']:.1f} | "
              f"{r['same_as_first_concurrency']:.0%} |")
    print("FLOPs-ideal speedup over dense: " + ", ".join(f"{m} {ideal[m]:.3f}" for m in PRUNED))
    for name, ratio in summary["ratios"].items():
        print(f"{name}: median {ratio['median']:.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratio['rounds'])})")
    print(f"wrote {args.out}")


def summarise(rows: list[dict], concurrencies: list[int], ideal: dict[str, float]) -> dict:
    """Per (method, C) the median of every measure over the rounds; and, per C, the tokens/s ratios that the
    issue's aims are about (IG over static, static and IG over dense, and those over their FLOPs-ideal
    speedups), each paired within a round."""
    medians = []
    for method in METHODS:
        for c in concurrencies:
            runs = [r for r in rows if r["method"] == method and r["concurrency"] == c]
            measures = [k for k in runs[0] if k not in ("method", "concurrency", "round")]
            medians.append({"method": method, "concurrency": c,
                            **{k: statistics.median(r[k] for r in runs) for k in measures}})
    ratios = {}
    rounds = sorted({r["round"] for r in rows})
    for c in concurrencies:
        tps = {(r["method"], r["round"]): r["tokens_per_second"] for r in rows if r["concurrency"] == c}
        pairs = [(m, "sleb-b15") for m in PRUNED[1:]] + [(m, "dense") for m in PRUNED]
        for top, bottom in pairs:
            values = [tps[top, k] / tps[bottom, k] for k in rounds]
            ratios[f"{top} / {bottom} tok/s, C={c}"] = {"median": statistics.median(values), "rounds": values}
        for method in PRUNED:
            values = [tps[method, k] / tps["dense", k] / ideal[method] for k in rounds]
            ratios[f"{method} speedup over dense / FLOPs-ideal, C={c}"] = {"median": statistics.median(values),
                                                                           "rounds": values}
    return {"medians": medians, "ratios": ratios}


if __name__ == "__main__":
    main()
