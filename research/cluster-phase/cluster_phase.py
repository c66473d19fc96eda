"""Which cluster-phase recipe lets each cluster's mask beat the shared mask on its own text.

IG-Pruning's first headline fit (ig16-b15-first) lost to static L0: its cluster masks were worse than the shared
mask even on the text they were trained for (benchmarks/results/headline_perplexity.json). This script isolates the
cluster phase. Every recipe starts from the same shared mask, static-l0-b15's gates (IG-Pruning's shared
phase with the same data, budget and seed), and the same clustering of the same 4096 passages (ig16-b15-first's
centroids); it runs only the cluster phase, on the same number of sample passes (one forward and backward
of one 64-token passage), and is scored by held-out perplexity on each cluster's share of 256 held-out
passages, routed by those centroids, beside the shared mask itself. Recipes are data (RECIPES below).

    python research/cluster-phase/cluster_phase.py                   # writes results/<recipe>.json here
    python research/cluster-phase/cluster_phase.py --recipes batch4  # some recipes (two processes can split them)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))  # the product benchmarks' runs, bundles and results
# ruff: noqa: E402

import torch
from headline import BUNDLES, FIT, SEED

from igprune import load_model
from igprune.bundle import Bundle
from igprune.clustering import cluster
from igprune.data import load_calibration
from igprune.dynamic import DynamicPrunedModel
from igprune.encoder import SentenceEncoder
from igprune.evaluation.perplexity import CHARS_PER_TOKEN, by_cluster, score_texts, token_perplexity
from igprune.files import write_json
from igprune.finders.l0 import MaskTrainer, TrainConfig, tokenize
from igprune.routing import Router

OUT = HERE / "results"
PASSES = 1024  # sample passes per recipe: 64 forwards of 16 passages
# cluster_batch: passages of every cluster per update; cluster_lr: the gates' learning rate in this phase.
RECIPES = {
    "shared": None,  # no cluster phase: every cluster keeps the shared mask (= static L0)
    # one passage of every cluster per update: the cluster phase of both headline fits (FIT, FIRST_FIT)
    "batch1": {"cluster_batch": 1, "cluster_lr": 0.1},
    "batch4": {"cluster_batch": 4, "cluster_lr": 0.1},
    # the shared gates scaled towards zero first, so that a few updates can reorder the blocks near the cut
    "batch4-shrink0.5": {"cluster_batch": 4, "cluster_lr": 0.1, "shrink": 0.5},
    "batch4-shrink0.25": {"cluster_batch": 4, "cluster_lr": 0.1, "shrink": 0.25},
    # control: the same passes spent on training the shared mask further, on all passages (more static L0)
    "static-more": {"cluster_batch": 16, "cluster_lr": 0.1, "one_mask": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--heldout", type=int, default=256, help="held-out passages scored")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    shared = Bundle.load(BUNDLES / "smollm2-135m" / "static-l0-b15")
    ig = Bundle.load(BUNDLES / "smollm2-135m" / "ig16-b15-first")
    texts = load_calibration("mixed", max_chars=4 * FIT["seq_len"], limit=FIT["samples"], seed=SEED)
    encoder = SentenceEncoder(ig.config["encoder"], max_tokens=ig.config["encoder_tokens"])
    clustering = cluster(encoder.encode(texts), ig.n_clusters, SEED)
    assert torch.allclose(clustering.centroids, ig.centroids, atol=1e-4), "not ig16-b15-first's clustering"
    router = Router.from_bundle(ig, always_embed=True)
    ids, mask = tokenize(tokenizer, texts, FIT["seq_len"])
    heldout = load_calibration("mixed", split="heldout", max_chars=CHARS_PER_TOKEN * 128, limit=args.heldout,
                               seed=SEED)
    for name in args.recipes.split(","):
        out = OUT / f"{name}.json"
        if out.is_file():
            continue
        started = time.perf_counter()
        if RECIPES[name] is None:
            masks, log = shared.masks.expand(ig.n_clusters, -1), None
        else:
            recipe = dict(RECIPES[name])
            n_masks = 1 if recipe.pop("one_mask", False) else ig.n_clusters
            shrink = recipe.pop("shrink", 1.0)
            config = TrainConfig(sparsity=shared.config["sparsity"], shared_steps=0,
                                 cluster_steps=PASSES // (n_masks * recipe["cluster_batch"]),
                                 batch_size=FIT["batch_size"], seq_len=FIT["seq_len"], warmup_fraction=0.0, seed=SEED,
                                 **recipe)
            trainer = MaskTrainer(model, n_masks, config, progress=True)
            with torch.no_grad():
                trainer.gates.log_alpha.copy_(shrink * shared.log_alpha.expand(n_masks, -1))
            labels = clustering.labels if n_masks > 1 else torch.zeros_like(clustering.labels)
            trainer.fit(ids, mask, labels)
            masks, log = trainer.masks().expand(ig.n_clusters, -1), trainer.log
        seconds = time.perf_counter() - started
        pruned = DynamicPrunedModel(model, tokenizer, router, masks.contiguous())
        scores, clusters = score_texts(model, tokenizer, heldout, 128, pruned=pruned)
        per_cluster = {str(k): token_perplexity(v) for k, v in by_cluster(scores, clusters).items()}
        write_json(out, {
            "recipe": RECIPES[name], "passes": PASSES, "updates": len(log.loss) if log else 0,
            "fit_seconds": round(seconds, 1), "threads": args.threads, "load_average": os.getloadavg()[0],
            "perplexity": token_perplexity(scores), "per_cluster": per_cluster,
            "cluster_passages": {k: clusters.count(int(k)) for k in per_cluster},
            "blocks_changed": [int((m != shared.masks[0]).sum()) // 2 for m in masks],
            "heldout": len(heldout), "seed": SEED, "log": dataclasses.asdict(log) if log else None})
        print(f"{name}: held-out perplexity {token_perplexity(scores):.1f} ({seconds / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
