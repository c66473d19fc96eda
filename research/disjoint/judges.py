"""Does held-out calibration-pool text rank global masks as source-disjoint text does? (LOG section 17)

Every 15-block static mask the draw studies scored (seeds.json, draws-b15.json, lazy.json, draws-long-b15.json:
13 distinct masks) is scored on 48 rows of long train passages of the mixed pool (max_chars 2048, a seeded
sample no fit of those files read from first token), cut four ways, and each ranking is compared with the masks'
perplexity on dev, test and the in-distribution set (Spearman's rho).

    PYTHONPATH=src python research/disjoint/judges.py [--threads 2] [--out research/disjoint/judges.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
STUDIES = ("seeds.json", "draws-b15.json", "lazy.json", "draws-long-b15.json")
# name: (row length, packing, leading tokens read but not scored)
CUTS = {"joined 128": (128, "joined", 0), "texts 128": (128, "texts", 0), "texts 192": (192, "texts", 0),
        "texts 192, first 64 unscored": (192, "texts", 64)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8], help="passage samples")
    parser.add_argument("--out", type=Path, default=HERE / "judges.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from igprune import load_model
    from igprune.data import load_calibration
    from igprune.finders.search import find_order_mask
    from igprune.scoring import Calibration, Scorer, make_calibration

    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    orders, seen, ppl = {}, set(), {"dev": {}, "test": {}, "indist": {}}
    for study in (json.loads((HERE / name).read_text()) for name in STUDIES):
        for name, bundle in study["bundles"].items():
            blocks = frozenset(bundle.get("order") or [])
            if len(blocks) == 15 and blocks not in seen:  # one entry per mask, whatever the order it was found in
                seen.add(blocks)
                orders[name] = bundle["order"]
                for split in ppl:
                    ppl[split][name] = study[split][name]["ppl"]
    masks = {name: find_order_mask(model, order, "block") for name, order in orders.items()}
    report = {"masks": orders, "perplexity": ppl, "judges": {}}
    for seed in args.seeds:
        texts = load_calibration("mixed", split="train", limit=200, seed=seed)
        for cut, (seq_len, packing, context) in CUTS.items():
            rows = make_calibration(tokenizer, texts, args.rows, seq_len, 101, "judge", packing)
            scored = torch.ones_like(rows.input_ids, dtype=torch.bool)
            scored[:, :context] = False
            scorer = Scorer(model, Calibration(rows.input_ids, rows.info, scored=scored))
            judged = {name: scorer.score(mask) for name, mask in masks.items()}
            rho = {split: float(spearmanr([judged[n] for n in orders], [ppl[split][n] for n in orders]).correlation)
                   for split in ppl}
            report["judges"][f"{cut}, sample {seed}"] = {"perplexity": judged, "spearman": rho}
            print(cut, seed, {k: round(v, 2) for k, v in rho.items()}, flush=True)
            args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
