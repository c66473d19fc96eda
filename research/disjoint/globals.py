"""Does held-out text of the calibration sources rank static masks as source-disjoint text does? No forward pass.

Every mask of a block count that both caches hold (score.py's dev / test NLL files, and benchmarks/domains.py's
in-distribution passages, 24 per domain) is one static mask: its perplexity on each set, the rank correlation
of the in-distribution perplexity with dev's and test's, and what "search K global masks, keep the one with the
lowest in-distribution perplexity" would give on test, over every K-subset of the masks that were some fit's
or search's global mask (the named ones below). Named masks are the committed bundles' and fits' global masks.

    PYTHONPATH=src python research/disjoint/globals.py [--blocks 15] [--out research/disjoint/globals-b15.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import evaluate as E  # noqa: E402
from evaluate_bundle import global_mask  # noqa: E402
from score import MODEL, REPO, load_set, mask_key, nll_path  # noqa: E402

BUNDLES = REPO / "benchmarks/bundles" / MODEL
RUNS = REPO / "runs"  # the seeds of research/disjoint LOG 12-13, where present


def named_globals(blocks: int, model) -> dict[str, str]:
    """Mask key of each committed bundle's global mask (a static bundle's one mask; a fit's gate fallback or
    search global order) and of the seed searches kept under runs/."""
    from igprune.bundle import Bundle

    names = {}
    folders = [*BUNDLES.glob(f"*-b{blocks}*"), *(p.parent for p in RUNS.glob("**/bundle.json"))]
    for folder in sorted(p for p in folders if (p / "bundle.json").is_file()):
        b = Bundle.load(folder)
        if b.config.get("blocks_skipped") != blocks:
            continue
        if b.static:
            mask = b.masks[0]
        elif b.fallback is not None or "global_order" in b.logs.get("search", {}):
            mask = global_mask(b, model)
        else:
            continue
        names.setdefault(mask_key(mask), str(folder.relative_to(REPO)))
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from igprune import load_model

    model, tokenizer = load_model(MODEL)
    totals = json.loads((REPO / "benchmarks/results/domains" / MODEL / f"passages-b{args.blocks}.json").read_text())
    sets = {s: load_set(s, tokenizer) for s in ("dev", "test")}
    keys = [k for k in totals if k != "dense" and all(nll_path(s, rows, k).is_file() for s, rows in sets.items())]
    indist_rows = E.indist_rows(tokenizer)
    ppl = {}
    for s in ("dev", "test", "indist"):
        scores = E.Scores("indist", indist_rows, keys, totals) if s == "indist" else E.Scores(s, sets[s], keys)
        ppl[s] = np.exp(scores.cont_sum.sum(0) / scores.cont_n.sum())
    names = named_globals(args.blocks, model)
    rho = {s: round(float(spearmanr(ppl["indist"], ppl[s]).statistic), 3) for s in ("dev", "test")}
    named = [i for i, k in enumerate(keys) if k in names]
    picks = {}
    for k in args.k:  # keep the lowest in-distribution perplexity of k draws: test perplexity it gets
        got = [ppl["test"][min(c, key=lambda i: ppl["indist"][i])] for c in itertools.combinations(named, k)]
        one = [ppl["test"][i] for i in named]
        picks[k] = {"subsets": len(got), "mean_test_ppl_kept": round(float(np.mean(got)), 2),
                    "mean_test_ppl_one_draw": round(float(np.mean(one)), 2)}
    report = {"blocks": args.blocks, "masks": len(keys), "spearman_indist_vs": rho, "best_of_k": picks,
              "named": {names[keys[i]]: {s: round(float(ppl[s][i]), 2) for s in ppl} for i in named}}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
