"""Replay routers from score.py's cache and report them: per domain and overall, paired per text.

For each set (dev, test: source-disjoint; indist: the domain benchmark's held-out documents) and each method, the
continuation tokens (64..192) of every text under the mask the method picks, against the global mask
(sleb-b15-mixed, the bundle's fallback) and against the best static mask on that set, paired per text
(ratio-estimator stderr, as benchmarks/domains.py). Routers read only the first 64 tokens (the prompt): its
embedding (the bundle's encoder, all-MiniLM-L6-v2, 64 tokens) and, for prompt scoring, its first T tokens' NLL.

Everything tunable (k, z, margins, T) is chosen on `dev` (and leave-one-source-out on `calib`), then reported
on `test` as chosen; the JSON says which.

    PYTHONPATH=src python research/disjoint/evaluate.py   # writes research/disjoint/results.json
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import routers as R  # noqa: E402
from score import BUNDLE, CONTEXT, MODEL, REPO, STATIC, cache_dir, load_set, mask_key, named_masks, nll_path  # noqa: E402

GATED = BUNDLE.with_name(BUNDLE.name.replace("-b15", "-gate95-b15"))
GLOBAL = "sleb-b15-mixed"
COST_TOKENS = 512 + 128  # a 512-token prompt and 128 generated tokens
COST = json.loads((HERE / "cost.json").read_text())  # research/disjoint/cost.py: FLOPs shares of 512 + 128 tokens
ENCODER_SHARE = COST["encoder_64"]


def embeddings(set_name: str, rows: list[dict], encoder) -> np.ndarray:
    path = cache_dir() / "emb" / f"{set_name}-{len(rows)}-{hash_ids(rows)}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        prompts = [encoder_tokenizer_decode(r) for r in rows]
        np.save(path, encoder.encode(prompts).numpy())
    return np.load(path)


def hash_ids(rows):
    from score import set_digest
    return set_digest(rows)


_TOK = None


def encoder_tokenizer_decode(row: dict) -> str:
    """The prompt a router reads: the text's first CONTEXT tokens, decoded."""
    global _TOK
    if _TOK is None:
        from igprune.models import load_tokenizer
        _TOK = load_tokenizer(MODEL)
    return _TOK.decode(row["ids"][:CONTEXT])


class Scores:
    """Per set: continuation (sum NLL, tokens) and prefix mean NLL per text and candidate."""

    def __init__(self, set_name: str, rows: list[dict], keys: list[str], totals: dict | None = None):
        self.rows, self.keys = rows, keys
        self.domains = [r["domain"] for r in rows]
        if totals is not None:  # domains.py's cache: {key: {domain: [[sum, n], ...]}}, whole passages scored
            self.arr = None
            per = [np.array([x for d in dict.fromkeys(self.domains) for x in totals[k][d]]) for k in keys]
            self.cont_sum = np.stack([p[:, 0] for p in per], 1)
            self.cont_n = per[0][:, 1]
        else:
            arrs = [np.load(nll_path(set_name, rows, k)) for k in keys]
            self.arr = np.stack(arrs, 1)  # (n, M, 191)
            cont = self.arr[:, :, CONTEXT - 1:]
            self.cont_sum = np.nansum(cont, 2)
            self.cont_n = np.sum(~np.isnan(cont), 2)[:, 0]
        self.cont_mean = self.cont_sum / self.cont_n[:, None]

    def prefix(self, T: int) -> np.ndarray:
        return self.arr[:, :, :T - 1].mean(2)

    def picked(self, route: np.ndarray) -> np.ndarray:
        """[[nll sum, tokens], ...] per text under the routed candidate."""
        return np.stack([self.cont_sum[np.arange(len(route)), route], self.cont_n], 1)


def rate(p: np.ndarray) -> tuple[float, float]:
    m = len(p)
    r = p[:, 0].sum() / p[:, 1].sum()
    var = ((p[:, 0] - r * p[:, 1]) ** 2).sum() / max(1, m * (m - 1))
    return r, math.sqrt(var) / (p[:, 1].sum() / m)


def paired(a: np.ndarray, b: np.ndarray) -> list[float]:
    """% lower perplexity of a than b on the same texts, and its paired stderr."""
    r, se = rate(np.stack([a[:, 0] - b[:, 0], a[:, 1]], 1))
    return [round(100 * (1 - math.exp(r)), 2), round(100 * math.exp(r) * se, 2)]


def summary(s: Scores, route: np.ndarray, refs: dict[str, np.ndarray]) -> dict:
    a = s.picked(route)
    out = {"ppl": round(math.exp(rate(a)[0]), 3), "left_global": int((route != s.keys.index(GLOBAL_KEY)).sum())}
    for name, ref in refs.items():
        out[f"vs_{name}"] = {"all": paired(a, ref)}
        for d in dict.fromkeys(s.domains):
            idx = np.array([x == d for x in s.domains])
            out[f"vs_{name}"][d] = paired(a[idx], ref[idx])
    return out


GLOBAL_KEY = None


def indist_rows(tokenizer) -> list[dict]:
    """benchmarks/domains.py's held-out passages (HELDOUT: 24 per domain, first 128 tokens), as its `score` step
    cached them: the in-distribution benchmark, and the learned router's training text (leave-one-source-out)."""
    from domains import heldout_ids

    return [{"id": f"indist-{d}-{i}", "domain": d, "ids": ids}
            for d, rows in heldout_ids(tokenizer).items() for i, ids in enumerate(rows)]


def main() -> None:
    global GLOBAL_KEY
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from igprune import load_model
    from igprune.bundle import Bundle
    from igprune.encoder import SentenceEncoder

    model, tokenizer = load_model(MODEL)
    masks = named_masks(model)
    bundle, gated = Bundle.load(BUNDLE), Bundle.load(GATED)
    GLOBAL_KEY = mask_key(masks[GLOBAL])
    # candidates: the global mask first, then the bundle's other distinct masks
    cand = list(dict.fromkeys([GLOBAL_KEY, *(mask_key(m) for m in bundle.masks)]))
    cluster_mask = np.array([cand.index(mask_key(m)) for m in bundle.masks])
    g = 0
    statics = {name: mask_key(masks[name]) for name in STATIC}
    label = {}
    for name, m in masks.items():
        label.setdefault(mask_key(m), name)
    encoder = SentenceEncoder(bundle.config["encoder"], device="cpu", max_tokens=bundle.config.get("encoder_tokens"))
    centroids = bundle.centroids.float().numpy()
    radii = gated.radii.float().numpy()

    totals = json.loads((REPO / "benchmarks/results/domains" / MODEL / "passages-b15.json").read_text())
    sets = {"indist": indist_rows(tokenizer), **{s: load_set(s, tokenizer) for s in ("dev", "test")}}
    scores = {"indist": Scores("indist", sets["indist"], cand, totals)}
    scores.update({s: Scores(s, sets[s], cand) for s in ("dev", "test")
                   if all(nll_path(s, sets[s], k).is_file() for k in cand)})
    emb = {s: embeddings(s, sets[s], encoder) for s in scores}
    report = {"model": MODEL, "blocks": 15, "bundle": str(BUNDLE.relative_to(REPO)), "global": GLOBAL,
              "candidates": [label[k] for k in cand], "cand_keys": cand, "cluster_to_candidate": cluster_mask.tolist(),
              "context_tokens": CONTEXT, "texts": {s: len(sets[s]) for s in scores},
              "router_training": "indist (domains.py held-out passages of the six calibration sources, whole "
                                 "passages scored); on indist itself leave-one-source-out", "sets": {}}

    # the learned router's training data: per passage, the gain of each candidate over the global mask
    cal = scores["indist"]
    cal_gain = cal.cont_mean[:, [g]] - cal.cont_mean  # (n, M) > 0: candidate better
    cal_src = np.array(cal.domains)

    def knn(s: str, k: int):
        exclude = (np.array(scores[s].domains)[:, None] == cal_src[None]) if s == "indist" else None
        return R.knn_gain(emb[s], emb["indist"], cal_gain, k, exclude)

    def gain_over_global(s: str, route: np.ndarray) -> float:
        sc = scores[s]
        return paired(sc.picked(route), sc.picked(np.zeros(len(route), int)))[0]

    tuning: dict = {"knn": {}, "prompt": {}}
    chosen: dict = {}
    if "dev" in scores:
        for k, z, margin in itertools.product([8, 16, 32], [0.0, 1.0, 2.0], [0.0, 0.02, 0.05]):
            tuning["knn"][f"k{k}-z{z}-m{margin}"] = {
                "dev": gain_over_global("dev", R.lcb_route(*knn("dev", k)[:2], g, z, margin)),
                "indist_loso": gain_over_global("indist", R.lcb_route(*knn("indist", k)[:2], g, z, margin))}
        chosen["knn"] = max(tuning["knn"], key=lambda key: (tuning["knn"][key]["dev"], tuning["knn"][key]["indist_loso"]))
    else:
        chosen["knn"] = "k16-z1.0-m0.0"
    k_best, z_best, m_best = (float(x[1:]) for x in chosen["knn"].split("-"))
    k_best = int(k_best)

    keep = np.ones(len(cand), bool)
    if "dev" in scores:  # the candidates whose nearest-centroid texts on dev gain by more than 1 stderr
        dev_route = R.nearest_centroid(emb["dev"], centroids, cluster_mask)
        dev_gain = scores["dev"].cont_mean[:, 0] - scores["dev"].cont_mean[np.arange(len(dev_route)), dev_route]
        keep = R.validated_clusters(dev_route, dev_gain, len(cand), g, 1.0)
        chosen["validated_on_dev"] = [label[cand[c]] for c in np.flatnonzero(keep)]

    def prompt_routes(s: str, T: int, margin: float, proposals: str):
        sc = scores[s]
        pre = sc.prefix(T)
        if proposals == "validated":
            p = R.restrict(R.nearest_centroid(emb[s], centroids, cluster_mask), keep, g)[:, None]
            return np.where(p[:, 0] == g, g, R.prompt_route(pre, g, margin, p)), 1
        if proposals == "all":
            return R.prompt_route(pre, g, margin), len(cand) - 1
        if proposals == "centroid":
            p = R.nearest_centroid(emb[s], centroids, cluster_mask)[:, None]
            return np.where(p[:, 0] == g, g, R.prompt_route(pre, g, margin, p)), 1
        m = int(proposals[-1])
        mean = knn(s, k_best)[0]
        return R.prompt_route(pre, g, margin, R.top_proposals(mean, g, m)), m

    if "dev" in scores:
        for T, margin, proposals in itertools.product([16, 24, 32, 64], [0.0, 0.02, 0.05, 0.1],
                                                      ["all", "centroid", "validated", "knn-top1", "knn-top2"]):
            route, m = prompt_routes("dev", T, margin, proposals)
            tuning["prompt"][f"T{T}-m{margin}-{proposals}"] = {
                "dev": gain_over_global("dev", route), "extra_token_forwards": m * T,
                "cost": round(COST["prompt"][f"T{T}-m{m}"] + (ENCODER_SHARE if proposals != "all" else 0), 4)}

        def best_prompt(max_cost: float | None) -> str:
            ok = {key: v for key, v in tuning["prompt"].items() if max_cost is None or v["cost"] <= max_cost}
            return max(ok, key=lambda key: ok[key]["dev"])

        chosen.update({"prompt_any_cost": best_prompt(None), "prompt_5pct": best_prompt(0.05),
                       "prompt_7pct": best_prompt(0.07)})
    report["tuning"] = tuning
    report["chosen_on_dev"] = chosen

    def parse_prompt(key: str):
        T, margin, proposals = key.split("-", 2)
        return int(T[1:]), float(margin[1:]), proposals

    for s, sc in scores.items():
        n = len(sc.rows)
        ref_static = {}
        for name, key in statics.items():
            if s == "indist":
                ref_static[name] = Scores(s, sets[s], [key], totals).picked(np.zeros(n, int))
            elif nll_path(s, sets[s], key).is_file():
                ref_static[name] = Scores(s, sets[s], [key]).picked(np.zeros(n, int))
        best_static = min(ref_static, key=lambda name: rate(ref_static[name])[0])
        refs = {"global": sc.picked(np.zeros(n, int)), "best_static": ref_static[best_static]}
        mean, se, _ = knn(s, k_best)
        methods = {
            "global": np.zeros(n, int),
            "nearest_centroid": R.nearest_centroid(emb[s], centroids, cluster_mask),
            "radius_gate_0.95": R.radius_gate(emb[s], centroids, cluster_mask, radii, g),
            f"knn_lcb ({chosen['knn']})": R.lcb_route(mean, se, g, z_best, m_best),
            "oracle": R.oracle(sc.cont_mean),
        }
        if "validated_on_dev" in chosen:
            methods["validated centroid (z1 on dev)"] = R.restrict(methods["nearest_centroid"], keep, g)
        if sc.arr is not None and "prompt_5pct" in chosen:
            for tag in ("prompt_any_cost", "prompt_7pct", "prompt_5pct"):
                T, margin, proposals = parse_prompt(chosen[tag])
                methods[f"{tag} ({chosen[tag]})"] = prompt_routes(s, T, margin, proposals)[0]
            methods["issue rule (T64-m0.05-all)"] = prompt_routes(s, 64, 0.05, "all")[0]
        entry = {"best_static": best_static, "static": {}, "methods": {}}
        for name, ref in ref_static.items():
            entry["static"][name] = {"ppl": round(math.exp(rate(ref)[0]), 3), "vs_global": paired(ref, refs["global"])}
        if s != "indist" and nll_path(s, sets[s], "dense").is_file():
            d = Scores(s, sets[s], ["dense"]).picked(np.zeros(n, int))
            entry["static"]["dense"] = {"ppl": round(math.exp(rate(d)[0]), 3), "vs_global": paired(d, refs["global"])}
        orc = sc.picked(methods["oracle"])
        head = rate(refs["global"])[0] - rate(orc)[0]
        for name, route in methods.items():
            entry["methods"][name] = summary(sc, route, refs)
            entry["methods"][name]["headroom_captured"] = round(
                (rate(refs["global"])[0] - rate(sc.picked(route))[0]) / head, 3) if head > 0 else None
            entry["methods"][name]["routes"] = {d: np.bincount(route[np.array(sc.domains) == d],
                                                               minlength=len(cand)).tolist()
                                                for d in dict.fromkeys(sc.domains)}
        report["sets"][s] = entry
        print(s, json.dumps({k: (v["vs_global"]["all"], v["vs_best_static"]["all"])
                             for k, v in entry["methods"].items()}), flush=True)
    (HERE / "results.json").write_text(json.dumps(report, indent=1))
    print("chosen on dev:", chosen)

if __name__ == "__main__":
    main()
