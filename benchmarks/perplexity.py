"""Held-out perplexity of every headline mask, overall and on each IG-Pruning cluster's share of the text.

Accuracy on six tasks moves in steps of 1/limit with a standard error of about two points per task;
perplexity on held-out calibration text (never used for clustering, training or search) is a finer view of
what each mask costs. Every passage is assigned to a cluster by the IG-Pruning router, and every mask (dense,
each static one, and IG-Pruning with each passage under its own cluster's mask) is scored on the same
passages. So the per-cluster columns answer the question behind the headline: on the text a cluster's mask
was trained for, does that mask beat the best static mask?

    python benchmarks/perplexity.py            # writes results/headline_perplexity.json
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch
from headline import RESULTS, RUNS, bundle_dir

from igprune import load_model
from igprune.data import load_calibration
from igprune.evaluation.perplexity import CHARS_PER_TOKEN, score_texts
from igprune.files import write_json
from igprune.stage2.dynamic import DynamicPrunedModel

OUT = RESULTS.parent / "headline_perplexity.json"
SEED = 0


def ppl(scores: list[tuple[float, int]]) -> float:
    return math.exp(sum(s for s, _ in scores) / sum(n for _, n in scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--router", default="ig16-b15", help="headline run whose router assigns the clusters")
    parser.add_argument("--data", default="mixed", help="calibration source whose held-out split is scored")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--limit", type=int, default=256, help="held-out passages")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    texts = load_calibration(args.data, split="heldout", max_chars=CHARS_PER_TOKEN * args.seq_len,
                             limit=args.limit, seed=SEED)
    router = DynamicPrunedModel.from_bundle(model, bundle_dir(next(r for r in RUNS if r.name == args.router)),
                                            tokenizer)
    # route each passage by exactly the tokens that are scored, as score_texts does for a dynamic model
    scored = tokenizer.batch_decode([x[:args.seq_len] for x in tokenizer(texts)["input_ids"]], skip_special_tokens=True)
    clusters = [r.cluster for r in router.route(scored)]
    report = {"model": args.model, "data": args.data, "split": "heldout", "seq_len": args.seq_len,
              "passages": len(texts), "router": args.router, "seed": SEED, "threads": args.threads,
              "cluster_passages": {str(k): clusters.count(k) for k in sorted(set(clusters))}, "runs": {}}
    masks = [("dense", None)] + [(r.name, bundle_dir(r)) for r in RUNS
                                 if r.model == args.model and (bundle_dir(r) / "bundle.json").is_file()]
    for name, path in masks:
        pruned = None if path is None else DynamicPrunedModel.from_bundle(model, path, tokenizer)
        scores, _ = score_texts(model, tokenizer, texts, args.seq_len, pruned=pruned)
        by_cluster: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for score, cluster in zip(scores, clusters, strict=True):
            by_cluster[cluster].append(score)
        report["runs"][name] = {"perplexity": ppl(scores),
                                "per_cluster": {str(k): ppl(v) for k, v in sorted(by_cluster.items())}}
        print(f"{name}: {report['runs'][name]['perplexity']:.1f}", flush=True)
    write_json(OUT, report)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
