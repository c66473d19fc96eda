"""What a radius gate on the router would change, replayed exactly from per-document results.

A cluster's mask is chosen on its own calibration text. An input the router sends to that cluster but that lies
farther from its centroid than almost every member (beyond the q-quantile of the members' distances) is unlike
anything the choice looked at; a gated router would run it under the global mask instead, the mask every
cluster starts from. Nothing here runs the model: each document's score under the global mask is already in the
global static mask's results (sleb-bB-mixed, the same documents), and each held-out passage's NLL under every mask
is in `domains.py score`'s cache, so the gated fit's results are the fit's with the gated documents' entries
swapped for the global mask's. Clusters that keep the global mask are unaffected.

    python research/domain-benchmark/radius_gate.py   # writes research/domain-benchmark/results/radius-gate.json
    python benchmarks/report.py                       # the radius-gate block of research/domain-benchmark/LOG.md
"""

from __future__ import annotations

import copy
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))  # the domain benchmark's bundles, results and caches
# ruff: noqa: E402

import torch
from domains import BUNDLES, GLOBAL, SEED, _versus, fit_dir, fit_passages, folder, heldout_ids
from headline import RESULTS as HEADLINE

from igprune.bundle import Bundle
from igprune.evaluation.results import load_results, paired_gain
from igprune.files import write_json
from igprune.masks import mask_row
from igprune.routing import Router, gate_radii

MODEL = "smollm2-135m"
OUT = HERE / "results" / "radius-gate.json"
QUANTILES = [0.9, 0.95, 0.99, 1.0]
# (blocks, fit): the domain fits whose six-task runs have per-document scores, each beside its global mask's
RUNS = [(8, "ig-global-n8-texts-requests-prefixed-auto-responses"), (8, "ig-sleb-n6-texts-pool-m3"),
        (15, "ig-sleb-n7-texts64-p0-domains-auto-unscored"),
        (22, "ig-global-n8-texts-requests-prefixed-auto-responses")]


def embed_members(bundle: Bundle, run: str) -> tuple[Router, torch.Tensor]:
    """The bundle's router and the embeddings of the passages its fit clustered (domains.fit_passages)."""
    router = Router.from_bundle(bundle, always_embed=True)
    embeddings = router.encoder.encode(fit_passages(bundle, run))
    clusters, _ = router.route_embeddings(embeddings)
    if [int((clusters == k).sum()) for k in range(bundle.n_clusters)] != bundle.config["cluster_sizes"]:
        raise SystemExit(f"{run}: routing the fit's passages does not give its clusters")
    return router, embeddings


def task_routes(router: Router, suite: str, limit: int | None) -> dict[str, tuple[list[int], list[float]]]:
    """Each task's documents as the harness routes them (igprune.evaluation.harness): cluster and distance."""
    from lm_eval.tasks import get_task_dict

    from igprune.evaluation.harness import shared_text
    from igprune.evaluation.tasks import GROUPS, PREFIX, task_manager

    out = {}
    for task in GROUPS[suite]:
        lm_task = get_task_dict([task], task_manager())[task]
        lm_task.build_all_requests(limit=limit, rank=0, world_size=1)
        contexts = defaultdict(list)
        for instance in lm_task.instances:
            contexts[instance.doc_id].append(instance.args[0])
        clusters, distances = router.route_embeddings(
            router.encoder.encode([shared_text(contexts[i]) for i in sorted(contexts)]))
        out[task.removeprefix(PREFIX)] = (clusters.tolist(), distances.tolist())
    return out


def gated(fit: dict[str, Any], fallback: dict[str, Any], routes: dict[str, tuple[list[int], list[float]]],
          outside: Callable[[int, float], bool]) -> tuple[dict[str, Any], int]:
    """The fit's results with every document `outside(cluster, distance)` given the fallback's score."""
    result, moved = copy.deepcopy(fit), 0
    for task, (clusters, distances) in routes.items():
        recorded = fit["tasks"][task].get("clusters")
        if recorded is not None and recorded != clusters:
            raise SystemExit(f"{task}: the replayed routing differs from the one the results recorded")
        items = result["tasks"][task]["items"]
        for i, (k, d) in enumerate(zip(clusters, distances, strict=True)):
            if outside(k, d):
                items[i], moved = fallback["tasks"][task]["items"][i], moved + 1
        result["tasks"][task]["value"] = 100 * sum(items) / len(items)
    return result, moved


def main() -> None:
    report: dict[str, Any] = {"model": MODEL, "quantiles": QUANTILES, "seed": SEED, "runs": []}
    dense = {250: load_results(HEADLINE / MODEL / "dense-l250.json"),
             500: load_results(HEADLINE / MODEL / "dense.json"),
             None: load_results(folder(MODEL) / "domains6-dense.json")}
    for blocks, run in RUNS:
        bundle = Bundle.load(fit_dir(MODEL, run, blocks))
        choice = bundle.logs.get("choose") or bundle.logs["search"]["choose"]
        router, members = embed_members(bundle, run)
        own = {k: choice["chosen"][k] != choice["default"] for k in range(bundle.n_clusters)}  # left the global mask
        radii = {q: gate_radii(bundle.centroids, members, q).tolist() for q in QUANTILES}
        entry: dict[str, Any] = {"blocks": blocks, "fit": run, "own_mask": [k for k, v in own.items() if v],
                                 "radii": radii, "tasks": {}, "heldout": {}}
        glob = GLOBAL.format(blocks=blocks)
        sets = [("paper6", 250, folder(MODEL) / f"paper6-{run}-b{blocks}.json", HEADLINE / MODEL / f"{glob}.json"),
                ("paper6", 500, folder(MODEL) / f"paper6-{run}-b{blocks}-l500.json",
                 HEADLINE / MODEL / f"{glob}-l500.json"),
                ("domains6", None, folder(MODEL) / f"domains6-{run}-b{blocks}.json",
                 folder(MODEL) / f"domains6-{glob}.json")]
        for suite, limit, fit_path, global_path in sets:
            if not (fit_path.is_file() and global_path.is_file()):
                continue
            fit, fallback = load_results(fit_path), load_results(global_path)
            routes = task_routes(router, suite, limit)
            scale = 100 / dense[limit]["average"]
            rows = {"none": [*(scale * x for x in paired_gain(fit, fallback)), 0]}
            for q, radius in radii.items():
                result, moved = gated(fit, fallback, routes, lambda k, d, r=radius, o=own: o[k] and d > r[k])
                rows[str(q)] = [*(scale * x for x in paired_gain(result, fallback)), moved]
            entry["tasks"][f"{suite}-l{limit}" if limit else suite] = rows
            print(blocks, run, suite, limit, json.dumps(rows), flush=True)
        entry["heldout"] = heldout(bundle, router, radii, own, blocks)
        report["runs"].append(entry)
    write_json(OUT, report)
    print(f"wrote {OUT}")


def heldout(bundle: Bundle, router: Router, radii: dict[float, list[float]], own: dict[int, bool],
            blocks: int) -> dict[str, Any]:
    """Held-out perplexity against the global mask (`domains.py score`'s passages and cached NLL), gated."""
    from igprune.models import load_tokenizer

    cache_path = folder(MODEL) / f"passages-b{blocks}.json"
    if not cache_path.is_file():
        return {}
    cache = json.loads(cache_path.read_text())
    tokenizer = load_tokenizer(MODEL)
    glob = mask_row(Bundle.load(BUNDLES / MODEL / GLOBAL.format(blocks=blocks)).masks[0])
    rows = [mask_row(m) for m in bundle.masks]
    if any(r not in cache for r in [glob, *rows]):
        return {}
    routes = {}
    for domain, ids in heldout_ids(tokenizer).items():
        clusters, distances = router.route_embeddings(
            router.encoder.encode(tokenizer.batch_decode(ids, skip_special_tokens=True)))
        routes[domain] = (clusters.tolist(), distances.tolist())
    fallback = {d: cache[glob][d] for d in routes}
    out = {}
    for q, radius in [(None, None), *radii.items()]:
        passages, moved = {}, 0
        for d, (clusters, distances) in routes.items():
            gate = [radius is not None and own[k] and x > radius[k] for k, x in zip(clusters, distances, strict=True)]
            masks = [glob if g else rows[k] for k, g in zip(clusters, gate, strict=True)]
            passages[d] = [cache[m][d][i] for i, m in enumerate(masks)]
            moved += sum(gate)
        lower = _versus(passages, fallback)["lower_than_best_static"]
        out["none" if q is None else str(q)] = {"overall": lower["overall"], "moved": moved,
                                                **{d: lower[d] for d in routes}}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
