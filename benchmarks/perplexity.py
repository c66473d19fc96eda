"""Held-out perplexity of every headline mask, overall and on each IG-Pruning cluster's share of the text.

Accuracy on six tasks moves in steps of 1/limit with a standard error of about two points per task;
perplexity on held-out calibration text (never used for clustering, training or search) is a finer view of
what each mask costs. Every passage is assigned to a cluster by the IG-Pruning router, and every mask (dense,
each static one, and IG-Pruning with each passage under its own cluster's mask) is scored on the same
passages. So the per-cluster columns answer the question behind the headline: on the text a cluster's mask
was trained for, does that mask beat the best static mask?

    python benchmarks/perplexity.py            # writes results/headline_perplexity.json
    python benchmarks/perplexity.py --only static-l0-b8   # score these again, keep the other columns

Keeping columns is safe only while the passages and the router are the same: the file records both (the
router by a hash of its centroids and encoder), and a change rescores everything.
"""

from __future__ import annotations

import argparse

import torch
from headline import RESULTS, RUNS, bundle_dir

from igprune import load_model
from igprune.bundle import Bundle
from igprune.data import load_calibration
from igprune.dynamic import DynamicPrunedModel
from igprune.evaluation.perplexity import CHARS_PER_TOKEN, by_cluster, score_texts, token_perplexity
from igprune.evaluation.results import config_hash, router_identity
from igprune.files import read_json, write_json

OUT = RESULTS.parent / "headline_perplexity.json"
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--router", default="ig16-b15", help="headline run whose router assigns the clusters")
    parser.add_argument("--data", default="mixed", help="calibration source whose held-out split is scored")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--limit", type=int, default=256, help="held-out passages")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help="comma-separated runs to score again (the router always is); the other "
                                       "columns are kept from the existing file if its passages and router match")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    texts = load_calibration(args.data, split="heldout", max_chars=CHARS_PER_TOKEN * args.seq_len,
                             limit=args.limit, seed=SEED)
    runs = [r for r in RUNS if r.model == args.model and not r.bundle]  # each bundle once
    masks = [("dense", None)] + [(r.name, bundle_dir(r)) for r in runs if (bundle_dir(r) / "bundle.json").is_file()]
    if args.router not in dict(masks):
        raise SystemExit(f"no bundle for the router run {args.router}; make it with benchmarks/run.py headline")
    router = Bundle.load(dict(masks)[args.router])
    settings = {"model": args.model, "data": args.data, "split": "heldout", "seq_len": args.seq_len,
                "passages": len(texts), "router": args.router, "seed": SEED,
                "router_sha256": config_hash(router_identity(router))}
    previous = read_json(OUT) if OUT.is_file() else {}
    kept = {}
    if args.only:
        if any(previous.get(k) != v for k, v in settings.items()):
            print("the existing file has other passages or another router: scoring every mask", flush=True)
        else:
            only = set(args.only.split(",")) | {args.router}
            kept = {name: v for name, v in previous["runs"].items() if name not in only}
            masks = [(name, path) for name, path in masks if name in only]
    scores = {}
    for name, path in masks:
        pruned = None if path is None else DynamicPrunedModel.from_bundle(model, path, tokenizer)
        scores[name], routed = score_texts(model, tokenizer, texts, args.seq_len, pruned=pruned)
        if name == args.router:
            clusters = routed  # each passage routed by exactly the tokens that are scored
        print(f"{name}: {token_perplexity(scores[name]):.1f}", flush=True)
    report = {**settings, "threads": args.threads,
              "cluster_passages": {str(k): clusters.count(k) for k in sorted(set(clusters))}, "runs": kept}
    for name, run_scores in scores.items():
        report["runs"][name] = {"perplexity": token_perplexity(run_scores),
                                "per_cluster": {str(k): token_perplexity(v)
                                                for k, v in by_cluster(run_scores, clusters).items()}}
    write_json(OUT, report)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
