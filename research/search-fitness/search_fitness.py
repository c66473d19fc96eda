"""Do the static searches' objectives rank masks as the tasks do? Score each Table 1 mask of a model on the
searches' own calibration data (8 x 128 wiki tokens): EvoPress's fitness (top-64 KL to dense) and SLEB's
(perplexity), beside the mask's average task accuracy from the headline results.

    python research/search-fitness/search_fitness.py --model qwen2.5-0.5b --blocks 12
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))  # the headline benchmark's runs, bundles and results
# ruff: noqa: E402

import torch
from headline import OPTIONS, RUNS, SEED, bundle_dir, result_path

from igprune import load_model
from igprune.bundle import Bundle
from igprune.data import load_calibration
from igprune.evaluation.results import load_results
from igprune.files import write_json
from igprune.finders import Scorer, make_calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--threads", type=int, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [r for r in RUNS if r.model == args.model and r.blocks == args.blocks and r.table == "table1"
            and result_path(r).is_file()]
    model, tokenizer = load_model(args.model)
    samples, seq_len = OPTIONS["sleb"]["samples"], OPTIONS["sleb"]["seq_len"]
    calibration = make_calibration(tokenizer, load_calibration("wiki", seed=SEED), samples, seq_len, SEED, "wiki")
    scorer = Scorer(model, calibration)
    rows = []
    for run in runs:
        bundle = Bundle.load(bundle_dir(run))
        for k, mask in enumerate(bundle.masks):
            if any(torch.equal(mask, bundle.masks[j]) for j in range(k)):
                continue  # clusters sharing a mask: score it once
            rows.append({"run": run.name, "cluster": k, "kl": scorer.kl(mask), "perplexity": scorer.perplexity(mask),
                         "average_accuracy": load_results(result_path(run))["average"]})
            print(f"{run.name:>14} mask {k:>2}: KL {rows[-1]['kl']:.4f}, perplexity {rows[-1]['perplexity']:.2f}, "
                  f"task average {rows[-1]['average_accuracy']:.2f}", flush=True)
    out = HERE / "results" / f"search_fitness_{args.model}_b{args.blocks}.json"
    write_json(out, {"model": args.model, "blocks": args.blocks, "calibration": calibration.info, "masks": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
