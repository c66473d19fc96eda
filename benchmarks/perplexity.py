"""Held-out perplexity of every headline bundle that exists, beside the dense model.

Accuracy on six tasks moves in steps of 1/limit and carries a standard error of about two points per task;
perplexity on held-out calibration text (never used for clustering, training or search) is a finer view of
how much each mask costs, and for IG-Pruning it is also reported per cluster.

    python benchmarks/perplexity.py            # writes results/headline_perplexity.json
"""

from __future__ import annotations

import argparse

import torch
from headline import RESULTS, RUNS, bundle_dir

from igprune import load_model
from igprune.evaluation.perplexity import perplexity
from igprune.files import write_json

OUT = RESULTS.parent / "headline_perplexity.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="mixed", help="calibration source whose held-out split is scored")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--limit", type=int, default=256, help="held-out passages")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    score = {"source": args.data, "seq_len": args.seq_len, "limit": args.limit, "progress": False}
    report = {"model": args.model, "data": args.data, "split": "heldout", "seq_len": args.seq_len,
              "limit": args.limit, "threads": args.threads, "runs": {}}
    report["runs"]["dense"] = perplexity(model, tokenizer, **score)
    for run in RUNS:
        path = bundle_dir(run)
        if run.model == args.model and (path / "bundle.json").is_file():
            report["runs"][run.name] = perplexity(model, tokenizer, path, **score)
            print(f"{run.name}: {report['runs'][run.name]['perplexity']:.1f}", flush=True)
    write_json(OUT, report)
    print(f"dense {report['runs']['dense']['perplexity']:.1f}; wrote {OUT}")


if __name__ == "__main__":
    main()
