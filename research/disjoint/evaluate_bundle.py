"""One bundle on the source-disjoint benchmark and the in-distribution domain passages: routed, gated, oracle.

For a search-finder bundle (its global mask in logs.search.global_order, or its gate's fallback) this scores each
of its distinct masks, and the static masks of score.STATIC (at the bundle's block count), on the dev and test
sets (build.py) and on benchmarks/domains.py's held-out passages (24 per domain, 128 tokens; its own cache, so the
numbers match its tables), then replays, paired per text:
  - nearest centroid (the paper's router) and a radius gate at each quantile of GATES (routing.gate_radii on the
    fit's own calibration passages, rebuilt from the bundle's recorded fit config);
  - the oracle: each text under the best of the bundle's masks on its scored tokens;
  - every static mask.
Each router runs twice: with each cluster's chosen mask (the bundle's) and with each cluster's own search mask (its
logs, before the choice). Against the bundle's global mask and against the best static mask of each set. The gate
quantile is chosen on dev (the largest whose dev gain and every dev domain's are >= 0), then reported on test and
in-distribution as chosen. Scoring is cached per (set, mask) and resumes.

    PYTHONPATH=src python research/disjoint/evaluate_bundle.py BUNDLE [--out research/disjoint/default-b15.json]

--chosen-only leaves the clusters' own search masks out ("own" then repeats "chosen"): a third of the scoring;
--statics sleb-b15-mixed scores only that static mask (renamed to the bundle's block count); --sets test leaves
dev out (a report, nothing chosen). DISJOINT_MODEL=qwen2.5-0.5b for another zoo model (score.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import evaluate as E  # noqa: E402
import routers as R  # noqa: E402
from score import MODEL, REPO, STATIC, cache_dir, load_set, mask_key, scored  # noqa: E402

GATES = (0.25, 0.5, 0.75, 0.9, 0.95, 1.0)


def global_mask(bundle, model) -> torch.Tensor:
    from igprune.finders.search import find_order_mask

    if bundle.fallback is not None:
        return bundle.fallback[0]
    return find_order_mask(model, bundle.logs["search"]["global_order"], bundle.config["granularity"])


def fit_embeddings(bundle) -> torch.Tensor:
    """The embeddings the fit clustered: its recorded calibration passages, through its encoder (cached)."""
    from igprune.config import FitConfig
    from igprune.encoder import SentenceEncoder
    from igprune.pruner import fit_texts

    fit = FitConfig().updated(bundle.config["fit"])
    key = hashlib.sha256(json.dumps(bundle.config["fit"], sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "emb" / f"fit-{key}.npy"
    if not path.is_file():
        texts = fit_texts(fit.data.source, fit.data.samples, fit.seq_len, fit.seed, fit.data.max_chars)
        encoder = SentenceEncoder(bundle.config["encoder"], device="cpu",
                                  max_tokens=bundle.config.get("encoder_tokens"))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, encoder.encode(texts).numpy())
    return torch.from_numpy(np.load(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chosen-only", action="store_true",
                        help="leave out the clusters' own search masks (only the bundle's and the global one)")
    parser.add_argument("--sets", default="dev,test",
                        help="the source-disjoint sets to score (the gate is chosen on dev when it is scored)")
    parser.add_argument("--statics", default=",".join(STATIC),
                        help="the static masks to score, comma-separated, named at 15 of 60 (default: all five)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from domains import _cached_nll, heldout_ids

    from igprune import load_model
    from igprune.bundle import Bundle
    from igprune.encoder import SentenceEncoder
    from igprune.finders.search import find_order_mask
    from igprune.routing import gate_radii

    model, tokenizer = load_model(MODEL)
    model.eval()
    bundle = Bundle.load(args.bundle)
    g_mask = global_mask(bundle, model)
    blocks = bundle.config["blocks_skipped"]
    statics = {name: Bundle.load(REPO / "benchmarks/bundles" / MODEL / name).masks[0]
               for name in (n.replace("-b15", f"-b{blocks}") for n in args.statics.split(","))}
    own = [find_order_mask(model, c["order"], bundle.config["granularity"]) for c in bundle.logs["search"]["clusters"]]
    own = list(bundle.masks) if args.chosen_only else own
    masks = {mask_key(g_mask): g_mask, **{mask_key(m): m for m in [*bundle.masks, *own]}}
    cand = list(masks)  # the global mask first, then the bundle's other distinct masks, then its searches'
    static_keys = {name: mask_key(m) for name, m in statics.items()}
    everything = {**masks, **{k: statics[n] for n, k in static_keys.items()}}
    routes = {"chosen": np.array([cand.index(mask_key(m)) for m in bundle.masks]),  # each cluster's choice
              "own": np.array([cand.index(mask_key(m)) for m in own])}  # each cluster's own search

    sets = {s: load_set(s, tokenizer) for s in args.sets.split(",")}
    for s, rows in sets.items():  # the bundle's masks first, then the statics
        for key in [*cand, *(k for k in static_keys.values() if k not in cand)]:
            start = time.time()
            if scored(model, s, rows, everything[key])[1]:
                print(f"{s} {key}: {time.time() - start:.0f}s", flush=True)
    nll = _cached_nll(model, REPO / "benchmarks/results/domains" / MODEL / f"passages-b{blocks}.json",
                      heldout_ids(tokenizer))
    totals = {k: nll(everything[k]) for k in [*cand, *static_keys.values()]}

    encoder = SentenceEncoder(bundle.config["encoder"], device="cpu", max_tokens=bundle.config.get("encoder_tokens"))
    indist_rows = E.indist_rows(tokenizer)
    emb = {s: E.embeddings(s, rows, encoder) for s, rows in sets.items()}
    emb["indist"] = E.embeddings("indist", indist_rows, encoder)
    centroids = bundle.centroids.float().numpy()
    fit_emb = fit_embeddings(bundle)
    radii = {q: gate_radii(bundle.centroids.float(), fit_emb, q).numpy() for q in GATES}

    E.GLOBAL_KEY = cand[0]
    report = {"bundle": str(args.bundle), "model": MODEL, "global": cand[0], "candidates": cand,
              "cluster_to_candidate": {k: v.tolist() for k, v in routes.items()}, "statics": static_keys, "sets": {}}
    keys = list(dict.fromkeys([*cand, *static_keys.values()]))
    for s in [*sets, "indist"]:
        scores = E.Scores("indist", indist_rows, keys, totals) if s == "indist" else E.Scores(s, sets[s], keys)
        n = len(scores.domains)
        ppl = {k: float(np.exp(scores.cont_sum[:, i].sum() / scores.cont_n.sum())) for i, k in enumerate(keys)}
        best_static = min(static_keys, key=lambda name: ppl[static_keys[name]])
        refs = {"global": scores.picked(np.zeros(n, int)),
                "best_static": scores.picked(np.full(n, keys.index(static_keys[best_static])))}
        methods = {}
        for which, cluster_mask in routes.items():
            methods[f"{which}, nearest centroid"] = R.nearest_centroid(emb[s], centroids, cluster_mask)
            for q in GATES:
                methods[f"{which}, radius gate {q}"] = R.radius_gate(emb[s], centroids, cluster_mask, radii[q], 0)
        methods["oracle"] = R.oracle(scores.cont_sum[:, :len(cand)] / scores.cont_n[:, None])
        for name, key in static_keys.items():
            methods[f"static {name}"] = np.full(n, keys.index(key))
        report["sets"][s] = {"texts": n, "best_static": best_static, "ppl": {k: round(v, 3) for k, v in ppl.items()},
                             "methods": {m: E.summary(scores, r, refs) for m, r in methods.items()}}
    dev = report["sets"]["dev"]["methods"] if "dev" in sets else None
    for which in routes if dev else ():
        safe = [q for q in GATES if all(v[0] >= 0 for v in dev[f"{which}, radius gate {q}"]["vs_global"].values())]
        report[f"{which}: gate chosen on dev"] = max(safe) if safe else None
    out = args.out or HERE / f"{args.bundle.name}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}; gates chosen on dev: {[report.get(f'{w}: gate chosen on dev') for w in routes]}")
    for s, rep in report["sets"].items():
        print(f"\n{s} (best static: {rep['best_static']})")
        for m, v in rep["methods"].items():
            print(f"  {m:28s} vs global {v['vs_global']['all']}  vs best static {v['vs_best_static']['all']}  "
                  f"left {v['left_global']}  " + " ".join(f"{d} {x[0]:+.1f}" for d, x in v["vs_global"].items()
                                                          if d != "all"))


if __name__ == "__main__":
    main()
