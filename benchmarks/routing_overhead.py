"""Routing overhead: the encoder on the first K tokens of a prompt against a 512-token prefill of smollm2-135m.

For K in {32, 64, 128, 256} (256 is all-MiniLM-L6-v2's limit): the encoder plus the nearest-centroid search
timed against a dense 512-token prefill (logits for the last position, as generate computes), interleaved
over repeats on one thread, as a percentage (the target: at most 3%); and the same ratio in FLOPs (the
encoder counted by torch's FlopCounterMode, the prefill by igprune.evaluation.flops).

Routing agreement: the share of inputs sent to the same cluster when the encoder reads K tokens as when it
reads 256, for a 16-centroid pool fitted (K-means, seed 0) on 128-token embeddings of 1000 "mixed"
calibration passages (one pool for every K; `igprune fit` itself embeds 64 tokens by default). Inputs: 50
items of each of the six evaluation sets (question or context with its answer options) and 200 held-out
calibration passages (long texts, where K matters). Writes benchmarks/results/routing_overhead.json and prints a table:

    nice -n 10 python benchmarks/routing_overhead.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from igprune.clustering import cluster
from igprune.data import EVAL_TASKS, eval_dataset_path, load_calibration
from igprune.encoder import SentenceEncoder
from igprune.evaluation.flops import flops
from igprune.evaluation.speed import build_prompt, machine_info
from igprune.files import write_json
from igprune.models import load_model
from igprune.routing import Router

RESULTS = Path(__file__).parent / "results"
KS = (32, 64, 128, 256)
REFERENCE = 256


def eval_text(task: str, doc: dict) -> str:
    """The item as a router could see it: its question or context, then its answer options."""
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        question = doc.get("question") or doc.get("question_stem")
        return "\n".join([question, *doc["choices"]["text"]])
    if task == "hellaswag":
        return "\n".join([doc["ctx"], *doc["endings"]])
    if task == "piqa":
        return "\n".join([doc["goal"], doc["sol1"], doc["sol2"]])
    return "\n".join([doc["sentence"], doc["option1"], doc["option2"]])  # winogrande


def eval_inputs(per_task: int, seed: int) -> list[str]:
    texts = []
    for task in EVAL_TASKS:
        docs = [json.loads(line) for line in eval_dataset_path(task).read_text().splitlines()]
        texts += [eval_text(task, d) for d in random.Random(f"{seed}:{task}").sample(docs, per_task)]
    return texts


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    prompt_ids, prompt_text = build_prompt(tokenizer, load_calibration("mixed", split="heldout"), 512)
    encoders = {k: SentenceEncoder(max_tokens=k) for k in KS}

    # --- agreement: one pool, routed with each K
    print("fitting the 16-centroid pool on 128-token embeddings ...", flush=True)
    passages = load_calibration("mixed", limit=1000, seed=args.seed)
    pool = cluster(encoders[128].encode(passages), 16, seed=args.seed)
    groups = {"evaluation items": eval_inputs(50, args.seed),
              "held-out passages": random.Random(args.seed).sample(load_calibration("mixed", split="heldout"), 200)}
    bert = encoders[REFERENCE].model.tokenizer
    agreement: dict[str, dict] = {}
    for name, texts in groups.items():
        lengths = [len(bert(t, add_special_tokens=True, verbose=False).input_ids) for t in texts]
        routes = {k: Router(pool.centroids).route_embeddings(encoders[k].encode(texts))[0] for k in KS}
        agreement[name] = {"inputs": len(texts), "median_encoder_tokens": statistics.median(lengths),
                           **{str(k): {"agreement": float((routes[k] == routes[REFERENCE]).float().mean()),
                                       "share_longer_than_k": sum(n > k for n in lengths) / len(lengths)}
                              for k in KS}}

    # --- cost: encoder + nearest centroid vs a 512-token prefill, interleaved
    routers = {k: Router(pool.centroids, encoders[k]) for k in KS}
    times: dict[str, list[float]] = {"prefill": [], **{str(k): [] for k in KS}}
    with torch.inference_mode():
        def prefill():
            model(input_ids=prompt_ids, past_key_values=DynamicCache(config=model.config), use_cache=True,
                  logits_to_keep=1)

        for round_ in range(1 + args.repeats):  # one warm-up round
            results = {"prefill": timed(prefill), **{str(k): timed(lambda k=k: routers[k].route([prompt_text]))
                                                     for k in KS}}
            if round_:
                for key, seconds in results.items():
                    times[key].append(seconds)
            print(f"  round {round_}/{args.repeats} done", flush=True)
    prefill_flops = flops(model.config, None, 512, logits="last")["total"]
    cost = {}
    for k in KS:
        with FlopCounterMode(display=False) as counter:
            routers[k].route([prompt_text])
        ratios = [e / p for e, p in zip(times[str(k)], times["prefill"], strict=True)]
        cost[str(k)] = {"encoder_tokens_read": min(k, len(bert(prompt_text, verbose=False).input_ids)),
                        "seconds_median": statistics.median(times[str(k)]),
                        "percent_of_prefill": 100 * statistics.median(ratios),
                        "percent_range": [100 * min(ratios), 100 * max(ratios)],
                        "flops": counter.get_total_flops(),
                        "flops_percent_of_prefill": 100 * counter.get_total_flops() / prefill_flops}
    report = {"model": "smollm2-135m", "encoder": encoders[REFERENCE].name, "prefill_tokens": 512,
              "prefill_seconds_median": statistics.median(times["prefill"]), "prefill_flops": prefill_flops,
              "repeats": args.repeats, "machine": machine_info(), "cost": cost, "agreement": agreement,
              "pool": {"centroids": len(pool.centroids), "fitted_on": "1000 'mixed' train passages, 128 tokens",
                       "sizes": pool.sizes, "seed": args.seed}, "target_percent": 3.0}
    write_json(RESULTS / "routing_overhead.json", report)

    load = report["machine"]["load_average"][0]
    print(f"\nsmollm2-135m 512-token prefill: {report['prefill_seconds_median'] * 1000:.0f} ms median "
          f"({prefill_flops / 1e9:.1f} GFLOPs), {args.threads} thread(s), load average {load:.1f}")
    head = ["K", "routing ms", "% of prefill (time)", "range", "% of prefill (FLOPs)",
            *[f"agree: {g}" for g in groups]]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for k in KS:
        c = cost[str(k)]
        agree = [f"{100 * agreement[g][str(k)]['agreement']:.1f}% "
                 f"({100 * agreement[g][str(k)]['share_longer_than_k']:.0f}% longer than K)" for g in groups]
        print(f"| {k} | {1000 * c['seconds_median']:.1f} | {c['percent_of_prefill']:.1f}% | "
              f"{c['percent_range'][0]:.1f}-{c['percent_range'][1]:.1f}% | {c['flops_percent_of_prefill']:.2f}% | "
              + " | ".join(agree) + " |")
    print(f"wrote {RESULTS / 'routing_overhead.json'}")


if __name__ == "__main__":
    main()
