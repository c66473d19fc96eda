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
ENCODER_SHARE = 0.01  # all-MiniLM-L6-v2 on 64 tokens against smollm2-135m (45 of 60 blocks) on 640: see LOG.md


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

    def __init__(self, set_name: str, rows: list[dict], keys: list[str]):
        self.rows, self.keys = rows, keys
        arrs = [np.load(nll_path(set_name, rows, k)) for k in keys]
        self.arr = np.stack(arrs, 1)  # (n, M, 191)
        cont = self.arr[:, :, CONTEXT - 1:]
        self.cont_sum = np.nansum(cont, 2)
        self.cont_n = np.sum(~np.isnan(cont), 2)[:, 0]
        self.cont_mean = self.cont_sum / self.cont_n[:, None]
        self.domains = [r["domain"] for r in rows]

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


def main() -> None:
    global GLOBAL_KEY
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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

    sets = {s: load_set(s, tokenizer) for s in ("calib", "dev", "test", "indist")}
    scores = {s: Scores(s, rows, cand) for s, rows in sets.items()
              if all(nll_path(s, rows, k).is_file() for k in cand)}
    emb = {s: embeddings(s, sets[s], encoder) for s in scores}
    report = {"model": MODEL, "blocks": 15, "bundle": str(BUNDLE.relative_to(REPO)), "global": GLOBAL,
              "candidates": [label[k] for k in cand], "cluster_to_candidate": cluster_mask.tolist(),
              "context_tokens": CONTEXT, "texts": {s: len(r) for s, r in sets.items()}, "sets": {}}

    # the learned router's training data: calibration texts' gains over the global mask
    cal = scores["calib"]
    cal_gain = cal.cont_mean[:, [g]] - cal.cont_mean  # (n, M) > 0: candidate better
    cal_src = np.array(cal.domains)

    def knn(s: str, k: int, loso: bool = False):
        exclude = (np.array(scores[s].domains)[:, None] == cal_src[None]) if loso else None
        return R.knn_gain(emb[s], emb["calib"], cal_gain, k, exclude)

    # --- choose the learned router's k, z, margin on dev (and LOSO on calib): the best dev gain over global
    grid = list(itertools.product([8, 16, 32], [0.0, 1.0, 2.0], [0.0, 0.02, 0.05]))

    def gain_over_global(s: str, route: np.ndarray) -> float:
        sc = scores[s]
        return paired(sc.picked(route), sc.picked(np.zeros(len(route), int)))[0]

    tuning = {"knn": {}, "prompt": {}}
    for k, z, margin in grid:
        mean, se, _ = knn("dev", k)
        mean_l, se_l, _ = knn("calib", k, loso=True)
        tuning["knn"][f"k{k}-z{z}-m{margin}"] = {
            "dev": gain_over_global("dev", R.lcb_route(mean, se, g, z, margin)),
            "calib_loso": gain_over_global("calib", R.lcb_route(mean_l, se_l, g, z, margin))}
    best_knn = max(tuning["knn"], key=lambda key: (tuning["knn"][key]["dev"], tuning["knn"][key]["calib_loso"]))
    k_best, z_best, m_best = (float(x[1:]) for x in best_knn.split("-"))
    k_best = int(k_best)

    # --- prompt scoring: T, margin, proposals chosen on dev
    def prompt_routes(s: str, T: int, margin: float, proposals: str):
        sc = scores[s]
        pre = sc.prefix(T)
        if proposals == "all":
            return R.prompt_route(pre, g, margin), len(cand) - 1
        if proposals == "centroid":
            p = R.nearest_centroid(emb[s], centroids, cluster_mask)[:, None]
            return np.where(p[:, 0] == g, g, R.prompt_route(pre, g, margin, p)), 1
        m = int(proposals[-1])
        mean, _, _ = knn(s, k_best)
        return R.prompt_route(pre, g, margin, R.top_proposals(mean, g, m)), m

    for T, margin, proposals in itertools.product([16, 24, 32, 64], [0.0, 0.02, 0.05, 0.1],
                                                  ["all", "centroid", "knn-top1", "knn-top2"]):
        route, m = prompt_routes("dev", T, margin, proposals)
        tuning["prompt"][f"T{T}-m{margin}-{proposals}"] = {"dev": gain_over_global("dev", route),
                                                          "cost": round(m * T / COST_TOKENS + ENCODER_SHARE, 4)}

    def best_prompt(max_cost: float | None) -> str:
        ok = {key: v for key, v in tuning["prompt"].items() if max_cost is None or v["cost"] <= max_cost}
        return max(ok, key=lambda key: ok[key]["dev"])

    chosen = {"knn": best_knn, "prompt_any_cost": best_prompt(None), "prompt_5pct": best_prompt(0.05)}
    report["tuning"] = tuning
    report["chosen_on_dev"] = chosen

    def parse_prompt(key: str):
        T, margin, proposals = key.split("-", 2)
        return int(T[1:]), float(margin[1:]), proposals

    for s, sc in scores.items():
        n = len(sc.rows)
        ref_static = {}
        static_keys = {name: key for name, key in statics.items()
                       if nll_path(s, sets[s], key).is_file()}
        static_sc = {name: Scores(s, sets[s], [key]) for name, key in static_keys.items()}
        for name, ssc in static_sc.items():
            ref_static[name] = ssc.picked(np.zeros(n, int))
        best_static = min(ref_static, key=lambda name: rate(ref_static[name])[0])
        refs = {"global": sc.picked(np.zeros(n, int)), "best_static": ref_static[best_static]}
        mean, se, _ = knn(s, k_best, loso=(s == "calib"))
        methods = {
            "global": np.zeros(n, int),
            "nearest_centroid": R.nearest_centroid(emb[s], centroids, cluster_mask),
            "radius_gate_0.95": R.radius_gate(emb[s], centroids, cluster_mask, radii, g),
            f"knn_lcb ({best_knn})": R.lcb_route(mean, se, g, z_best, m_best),
            "oracle": R.oracle(sc.cont_mean),
        }
        for tag in ("prompt_any_cost", "prompt_5pct"):
            T, margin, proposals = parse_prompt(chosen[tag])
            methods[f"{tag} ({chosen[tag]})"] = prompt_routes(s, T, margin, proposals)[0]
        methods["issue rule (T64-m0.05-all)"] = prompt_routes(s, 64, 0.05, "all")[0]
        entry = {"best_static": best_static, "static": {}, "methods": {}}
        for name, ref in ref_static.items():
            entry["static"][name] = {"ppl": round(math.exp(rate(ref)[0]), 3),
                                     "vs_global": paired(ref, refs["global"])}
        dense = nll_path(s, sets[s], "dense")
        if dense.is_file():
            d = Scores(s, sets[s], ["dense"]).picked(np.zeros(n, int))
            entry["static"]["dense"] = {"ppl": round(math.exp(rate(d)[0]), 3), "vs_global": paired(d, refs["global"])}
        orc = sc.picked(methods["oracle"])
        head = rate(refs["global"])[0] - rate(orc)[0]
        for name, route in methods.items():
            entry["methods"][name] = summary(sc, route, refs)
            entry["methods"][name]["headroom_captured"] = round(
                (rate(refs["global"])[0] - rate(sc.picked(route))[0]) / head, 3) if head > 0 else None
        report["sets"][s] = entry
        print(s, json.dumps({k: (v["vs_global"]["all"], v["vs_best_static"]["all"]) for k, v in entry["methods"].items()}))
    (HERE / "results.json").write_text(json.dumps(report, indent=1))
    print("chosen on dev:", chosen)


if __name__ == "__main__":
    main()
