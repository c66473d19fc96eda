"""Is sleb-b15-mixed a lucky draw? Static one-mask bundles (e.g. the same SLEB search with other seeds, so other
calibration rows) scored on the source-disjoint dev and test sets and the in-distribution passages, against
sleb-b15-mixed, paired per text (LOG section 12).

    igprune baseline sleb --model smollm2-135m --blocks 15 --granularity block --data mixed --samples 8 \\
        --seq-len 128 --seed S --out runs/sleb-b15-mixed-sS
    PYTHONPATH=src python research/disjoint/seeds.py runs/sleb-b15-mixed-s1 ... [--out research/disjoint/seeds.json]

`--reference` names another static bundle to pair against (e.g. sleb-b8-mixed for masks at 8 of 60).

Scoring is cached per (set, mask) as score.py caches it, so a rerun only scores new masks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evaluate import paired, rate  # noqa: E402
from score import CONTEXT, MODEL, REPO, load_set, scored  # noqa: E402

REFERENCE = REPO / "benchmarks/bundles" / MODEL / "sleb-b15-mixed"


def continuation(arr: np.ndarray) -> np.ndarray:
    """(summed NLL, tokens) per text over the scored tokens CONTEXT..191, as evaluate.py scores them."""
    cont = arr[:, CONTEXT - 1:]
    return np.stack([np.nansum(cont, 1), np.sum(~np.isnan(cont), 1)], 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "seeds.json")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from igprune import load_model
    from igprune.bundle import Bundle

    model, tokenizer = load_model(MODEL)
    model.eval()
    bundles = {path.name: Bundle.load(path) for path in [args.reference, *args.bundles]}
    report = {}
    for set_name in ("dev", "test", "indist"):
        rows = load_set(set_name, tokenizer)
        domains = [r["domain"] for r in rows]
        scores = {}
        for name, bundle in bundles.items():
            scores[name] = continuation(scored(model, set_name, rows, bundle.masks[0])[0])
        ref, versus = scores[args.reference.name], f"vs_{args.reference.name}"
        report[set_name] = {
            name: {"ppl": round(float(np.exp(rate(s)[0])), 3), versus: {
                "all": paired(s, ref),
                **{d: paired(s[np.array(domains) == d], ref[np.array(domains) == d]) for d in dict.fromkeys(domains)}}}
            for name, s in scores.items()}
        print(set_name, {n: (r["ppl"], r[versus]["all"]) for n, r in report[set_name].items()}, flush=True)
    report["bundles"] = {name: {"order": b.logs.get("search", {}).get("order"), "seed": b.config.get("seed"),
                                "calibration": b.config.get("calibration")} for name, b in bundles.items()}
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
