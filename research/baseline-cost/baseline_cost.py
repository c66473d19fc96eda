"""What each static baseline costs: wall time on smollm2-135m at 15 of 60 blocks (25%), block granularity.

Every method runs with its registry defaults on wiki calibration. Each finished method is recorded at once
in research/baseline-cost/results/baseline_cost.json, with the machine's load since the machine may be shared (merged
into the file as it is then, so methods may run in parallel processes), and its bundle is saved under
research/baseline-cost/bundles/smollm2-135m/<method>-b15/. An interrupted run resumes where it stopped; --force reruns
methods already recorded. Held-out wiki perplexity of each mask is recorded
too, as a sanity check rather than an evaluation.

    python research/baseline-cost/baseline_cost.py [--methods sleb,evopress] [--force] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

from igprune import load_model
from igprune.bundle import Bundle
from igprune.data import load_calibration
from igprune.files import read_json, write_json
from igprune.finders import METHODS, Scorer, find_mask, make_calibration
from igprune.masks import mask_row

HERE = Path(__file__).parent
MODEL, BLOCKS, GRANULARITY, DATA, SEED = "smollm2-135m", 15, "block", "wiki", 0
RESULTS = HERE / "results" / "baseline_cost.json"
BUNDLES = HERE / "bundles" / MODEL  # the headline benchmark keeps its own under benchmarks/bundles/<model>


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to run")
    parser.add_argument("--force", action="store_true", help="rerun methods already recorded")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a busy machine 1 can beat 2 several times over")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    results = read_json(RESULTS) if RESULTS.is_file() else {"runs": {}}
    model, tokenizer = load_model(MODEL)
    n_blocks = 2 * model.config.num_hidden_layers
    texts = load_calibration(DATA, split="train", seed=SEED)
    heldout = Scorer(model, make_calibration(tokenizer, load_calibration(DATA, split="heldout"), 8, 128, SEED, DATA))
    results["setup"] = {"model": MODEL, "blocks_off": BLOCKS, "blocks_total": n_blocks, "granularity": GRANULARITY,
                        "calibration": DATA, "seed": SEED, "torch_threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                        "heldout": heldout.calibration.info,
                        "dense_heldout_ppl": heldout.perplexity(torch.ones(n_blocks, dtype=torch.bool))}
    for method in methods:
        if method in results["runs"] and not args.force:
            print(f"{method}: recorded, skipping (--force to rerun)")
            continue
        load_before = os.getloadavg()
        started = time.perf_counter()
        bundle: Bundle = find_mask(method, model, tokenizer, texts, BLOCKS / n_blocks, GRANULARITY, seed=SEED,
                                   source=DATA)
        seconds = time.perf_counter() - started
        bundle.save(BUNDLES / f"{method}-b{BLOCKS}")
        mask = bundle.masks[0]
        run = {
            "seconds": round(seconds, 1),
            "mask": mask_row(mask),
            "order": bundle.logs["search"]["order"],
            "attn_off": bundle.config["attn_skipped"], "ffn_off": bundle.config["ffn_skipped"],
            "masks_scored": bundle.logs["search"]["masks_scored"],
            "forward_tokens": bundle.logs["search"]["forward_tokens"],
            "options": bundle.config["options"], "calibration": bundle.config["calibration"],
            "heldout_ppl": heldout.perplexity(mask),
            "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "torch_threads": torch.get_num_threads(),
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        results = record(method, run, results["setup"])
        print(f"{method}: {seconds / 60:.1f} min  {mask_row(mask)}", flush=True)
    print_table(read_json(RESULTS))


def record(method: str, run: dict, setup: dict) -> dict:
    """Add one run to the results file as it is now, so runs of other methods in parallel are kept."""
    results = read_json(RESULTS) if RESULTS.is_file() else {"runs": {}}
    results["setup"] = setup
    results["runs"][method] = run
    write_json(RESULTS, results)
    return results


def print_table(results: dict) -> None:
    print(f"\n{'method':<18}{'minutes':>8}{'masks':>7}{'attn/ffn off':>14}{'heldout ppl':>13}  load  mask")
    for method, run in results["runs"].items():
        print(f"{method:<18}{run['seconds'] / 60:>8.1f}{run['masks_scored']:>7}"
              f"{str(run['attn_off']) + '/' + str(run['ffn_off']):>14}{run['heldout_ppl']:>13.2f}  "
              f"{run['load_average_1min'][0]:>4.1f}  {run['mask']}")
    print(f"dense held-out ppl: {results['setup']['dense_heldout_ppl']:.2f}")


if __name__ == "__main__":
    main()
