"""Leave-one-source-out on the in-distribution held-out passages: does a kNN gain predictor trained on five
calibration sources pick masks that help on the sixth? Replays domains.py's cache and evaluate.py's embeddings.

    PYTHONPATH=src python research/disjoint/explore_indist.py   # prints; results in LOG.md
"""
import itertools
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import routers as R  # noqa: E402
from evaluate import paired  # noqa: E402

REPO = HERE.parents[1]
totals = json.loads((REPO / "benchmarks/results/domains/smollm2-135m/passages-b15.json").read_text())
emb = np.load(sorted((Path.home() / ".cache/igprune/data/disjoint/emb").glob("indist-144-*.npy"))[0])
from igprune.bundle import Bundle  # noqa: E402
from igprune.masks import mask_row  # noqa: E402

bundle = Bundle.load(REPO / "benchmarks/bundles/smollm2-135m/domains/ig-sleb-n7-texts64-p0-domains-auto-unscored-b15")
glob_key = mask_row(Bundle.load(REPO / "benchmarks/bundles/smollm2-135m/sleb-b15-mixed").masks[0])
cand = list(dict.fromkeys([glob_key, *(mask_row(m) for m in bundle.masks)]))
doms = ["code", "math", "wiki", "tiny", "multilingual", "qa"]
src = np.array([d for d in doms for _ in range(24)])
S = np.stack([np.array([x[0] for d in doms for x in totals[k][d]]) for k in cand], 1)
n = np.array([x[1] for d in doms for x in totals[cand[0]][d]])
mean_nll = S / n[:, None]
gain = mean_nll[:, [0]] - mean_nll
exclude = src[:, None] == src[None]
def pick(r):
    return np.stack([S[np.arange(len(r)), r], n], 1)



glob = pick(np.zeros(len(n), int))
for k, z, m, smin in itertools.product([8, 16, 32], [0, 1, 2, 3], [0, 0.05], [0, 0.3, 0.4]):
    mu, se, sim = R.knn_gain(emb, emb, gain, k, exclude)
    r = R.lcb_route(mu, se, 0, z, m)
    r = np.where(sim >= smin, r, 0)
    out = paired(pick(r), glob)
    per = {d: paired(pick(r)[src == d], glob[src == d])[0] for d in doms}
    print(f"k{k} z{z} m{m} s{smin}: {out} left {(r != 0).sum()} {per}")
