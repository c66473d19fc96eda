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
    from igprune.encoder import DEFAULT_ENCODER

    tag = "" if encoder.name == DEFAULT_ENCODER else f"-{Path(encoder.name).name}"  # MiniLM's files predate the tag
    path = cache_dir() / "emb" / f"{set_name}-{len(rows)}-{hash_ids(rows)}{tag}.npy"
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

    def prefix_tokens(self, T: int) -> np.ndarray:
        return self.arr[:, :, :T - 1]

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
        chosen["knn"] = max(tuning["knn"],
                            key=lambda key: (tuning["knn"][key]["dev"], tuning["knn"][key]["indist_loso"]))
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
        if proposals.startswith("z"):  # "z<Z>-<proposals>": a paired test on the prompt tokens, no flat margin
            z, proposals = proposals.split("-", 1)
            pre_tok = sc.prefix_tokens(T)
            if proposals == "all":
                return R.prompt_route_z(pre_tok, g, float(z[1:])), len(cand) - 1
            if proposals == "centroid":
                p = R.nearest_centroid(emb[s], centroids, cluster_mask)[:, None]
                return np.where(p[:, 0] == g, g, R.prompt_route_z(pre_tok, g, float(z[1:]), p)), 1
            m = int(proposals[-1])
            return R.prompt_route_z(pre_tok, g, float(z[1:]), R.top_proposals(knn(s, k_best)[0], g, m)), m
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
        for T, z, proposals in itertools.product([16, 24, 32, 64], [1.0, 2.0, 3.0],
                                                 ["all", "centroid", "knn-top1", "knn-top2"]):
            route, m = prompt_routes("dev", T, 0.0, f"z{z}-{proposals}")
            tuning["prompt"][f"T{T}-m0.0-z{z}-{proposals}"] = {
                "dev": gain_over_global("dev", route), "extra_token_forwards": m * T,
                "cost": round(COST["prompt"][f"T{T}-m{m}"] + (ENCODER_SHARE if proposals != "all" else 0), 4)}

        def best_prompt(max_cost: float | None) -> str:
            ok = {key: v for key, v in tuning["prompt"].items() if max_cost is None or v["cost"] <= max_cost}
            return max(ok, key=lambda key: ok[key]["dev"])

        chosen.update({"prompt_any_cost": best_prompt(None), "prompt_5pct": best_prompt(0.05),
                       "prompt_7pct": best_prompt(0.07)})
    report["tuning"] = tuning
    report["chosen_on_dev"] = chosen

    # kNN trained on ten sources: the six calibration sources' held-out passages and the four dev sources; k, z and
    # margin chosen by leave-one-source-out over those ten (never on test); each text of indist and dev is predicted
    # with its own source left out, each test text from all ten.
    multi = {}
    if "dev" in scores:
        tr_emb = np.concatenate([emb["indist"], emb["dev"]])
        dev_sc = scores["dev"]
        tr_gain = np.concatenate([cal_gain, dev_sc.cont_mean[:, [g]] - dev_sc.cont_mean])
        tr_src = np.array([*cal.domains, *(f"dev-{d}" for d in dev_sc.domains)])
        tr_pick = np.concatenate([cal.cont_sum, dev_sc.cont_sum])
        tr_n = np.concatenate([cal.cont_n, dev_sc.cont_n])
        tuning["knn10_loso"] = {}
        for k, z, margin in itertools.product([8, 16, 32, 64], [0.0, 1.0, 2.0], [0.0, 0.02, 0.05]):
            mean, se, _ = R.knn_gain(tr_emb, tr_emb, tr_gain, k, tr_src[:, None] == tr_src[None])
            route = R.lcb_route(mean, se, g, z, margin)
            a = np.stack([tr_pick[np.arange(len(route)), route], tr_n], 1)
            b = np.stack([tr_pick[:, 0], tr_n], 1)
            tuning["knn10_loso"][f"k{k}-z{z}-m{margin}"] = paired(a, b)[0]
        best10 = max(tuning["knn10_loso"], key=tuning["knn10_loso"].get)
        chosen["knn10"] = best10
        k10, z10, m10 = (float(x[1:]) for x in best10.split("-"))

        def knn10(s: str) -> np.ndarray:
            if s == "test":
                mean, se, _ = R.knn_gain(emb[s], tr_emb, tr_gain, int(k10))
                return R.lcb_route(mean, se, g, z10, m10)
            mean, se, _ = R.knn_gain(tr_emb, tr_emb, tr_gain, int(k10), tr_src[:, None] == tr_src[None])
            route = R.lcb_route(mean, se, g, z10, m10)
            return route[:len(cal.domains)] if s == "indist" else route[len(cal.domains):]
        multi["knn10"] = knn10

    # familiarity gate: nearest centroid only for inputs whose 8 nearest fit passages are similar enough; tau the
    # lowest value (on a grid) at which the gated router is no worse than the global mask on dev overall and in no
    # dev domain beyond one stderr
    from domains import fit_passages

    fit_path = cache_dir() / "emb" / "fit-passages.npy"
    if not fit_path.is_file():
        np.save(fit_path, encoder.encode(fit_passages(bundle, "ig-sleb-n7-texts64-p0-domains-auto-unscored")).numpy())
    fit_emb = np.load(fit_path)
    fam = {s: R.familiarity(emb[s], fit_emb) for s in scores}
    if "dev" in scores:
        dev_nc = R.nearest_centroid(emb["dev"], centroids, cluster_mask)
        grid_tau = np.round(np.arange(0.30, 0.96, 0.025), 3)
        tuning["familiarity"] = {}
        chosen["familiarity_tau"] = float(grid_tau[-1])
        for tau in grid_tau:
            route = R.familiarity_gate(dev_nc, fam["dev"], tau, g)
            a, b = scores["dev"].picked(route), scores["dev"].picked(np.zeros(len(route), int))
            per = [paired(a[np.array(scores["dev"].domains) == d], b[np.array(scores["dev"].domains) == d])
                   for d in dict.fromkeys(scores["dev"].domains)]
            tuning["familiarity"][str(tau)] = {"dev": paired(a, b), "worst_domain": min(x[0] + x[1] for x in per)}
        ok = [t for t in grid_tau if tuning["familiarity"][str(t)]["dev"][0] >= 0
              and tuning["familiarity"][str(t)]["worst_domain"] >= 0]
        chosen["familiarity_tau"] = float(min(ok)) if ok else float(grid_tau[-1])
        tuning["familiarity_quantiles"] = {s: np.quantile(f, [0.05, 0.25, 0.5, 0.75, 0.95]).round(3).tolist()
                                           for s, f in fam.items()}

    # radius gate at other quantiles (radii over the fit's own passages, as routing.gate_radii): the largest q
    # at which the gated router is no worse than the global mask on dev overall and in no dev domain beyond 1 stderr
    d_fit = np.sqrt(((fit_emb[:, None, :] - centroids[None]) ** 2).sum(-1))
    k_fit = d_fit.argmin(1)

    def radii_at(q: float) -> np.ndarray:
        return np.array([np.quantile(d_fit[k_fit == c, c], q, method="higher") if (k_fit == c).any() else 0.0
                         for c in range(len(centroids))])

    if "dev" in scores:
        tuning["radius_gate"] = {}
        for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.95):
            route = R.radius_gate(emb["dev"], centroids, cluster_mask, radii_at(q), g)
            a, b = scores["dev"].picked(route), scores["dev"].picked(np.zeros(len(route), int))
            doms = np.array(scores["dev"].domains)
            per = [paired(a[doms == d], b[doms == d]) for d in dict.fromkeys(doms.tolist())]
            tuning["radius_gate"][str(q)] = {"dev": paired(a, b), "worst_domain": min(x[0] + x[1] for x in per)}
        ok = [q for q, v in tuning["radius_gate"].items() if v["dev"][0] >= 0 and v["worst_domain"] >= 0]
        chosen["radius_gate_q"] = float(max(ok, key=float)) if ok else 0.0

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
            "domain oracle (one mask per domain, cross-fitted halves)": R.domain_oracle_halves(sc.cont_mean,
                                                                                               sc.domains),
        }
        if s == "indist":  # in-source: each passage's neighbours from the other half of the passages (every source)
            half = np.arange(n) % 2
            mean_h, se_h, _ = R.knn_gain(emb[s], emb[s], cal_gain, k_best, half[:, None] == half[None])
            methods[f"knn_lcb ({chosen['knn']}), in-source: neighbours from the other half"] = R.lcb_route(
                mean_h, se_h, g, z_best, m_best)
            mean_h, se_h, _ = R.knn_gain(emb[s], emb[s], cal_gain, 16, half[:, None] == half[None])
            methods["knn_lcb (k16-z1.0-m0.0), in-source: neighbours from the other half"] = R.lcb_route(
                mean_h, se_h, g, 1.0, 0.0)
        if "radius_gate_q" in chosen:
            methods[f"radius gate q {chosen['radius_gate_q']} (on dev)"] = R.radius_gate(
                emb[s], centroids, cluster_mask, radii_at(chosen["radius_gate_q"]), g)
        if "familiarity_tau" in chosen:
            methods[f"familiarity-gated centroid (tau {chosen['familiarity_tau']} on dev)"] = R.familiarity_gate(
                methods["nearest_centroid"], fam[s], chosen["familiarity_tau"], g)
        if "knn10" in multi:
            methods[f"knn10_lcb ({chosen['knn10']}; LOSO outside test)"] = multi["knn10"](s)
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
        if sc.arr is not None:  # how predictable a text's best mask is from its own text: choose on tokens 64..127
            early = np.nanmean(sc.arr[:, :, CONTEXT - 1:CONTEXT + 63], 2)  # (by the oracle rule), score on 128..191
            late_sum = np.nansum(sc.arr[:, :, CONTEXT + 63:], 2)
            late_n = np.sum(~np.isnan(sc.arr[:, 0, CONTEXT + 63:]), 1)
            pick_late = lambda r: np.stack([late_sum[np.arange(n), r], late_n], 1)  # noqa: E731, B023
            entry["self_split"] = {
                "late_oracle_vs_global": paired(pick_late(R.oracle(late_sum / late_n[:, None])),
                                                pick_late(np.zeros(n, int))),
                "chosen_by_early_half_vs_global": paired(pick_late(early.argmin(1)), pick_late(np.zeros(n, int))),
                "chosen_by_early_half_margin0.05_vs_global": paired(
                    pick_late(R.prompt_route(early, g, 0.05)), pick_late(np.zeros(n, int)))}
        report["sets"][s] = entry
        print(s, json.dumps({k: (v["vs_global"]["all"], v["vs_best_static"]["all"])
                             for k, v in entry["methods"].items()}), flush=True)
    (HERE / "results.json").write_text(json.dumps(report, indent=1))
    print("chosen on dev:", chosen)

if __name__ == "__main__":
    main()
