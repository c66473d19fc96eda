"""Input guidance on inputs that really differ: the headroom of per-domain masks, and how close fits get.

Six domains (igprune.data.DOMAIN_SOURCES): code, maths (GSM8K solutions), encyclopaedic prose (Wikipedia),
stories (TinyStories), non-English text and QA-style science prose (SciQ). Masks are searched or fitted on
each domain's training passages; everything is scored on held-out passages, from documents that no search,
clustering or fit passage comes from (igprune.data.is_heldout), by token-weighted perplexity.

    python benchmarks/run.py domains search --blocks 15  # per-domain SLEB masks from a shared global prefix
    python benchmarks/run.py domains wide --source code  # SLEB on 8 x 128 tokens of one source, same prefix
    python benchmarks/run.py domains wide --source code --packing texts  # rows cut as held-out passages
    python benchmarks/run.py domains wide --source code --packing texts --prefix 0  # from no shared prefix
    python benchmarks/run.py domains fit --blocks 15     # IG-Pruning fits on the domains pool (`fits`)
    python benchmarks/run.py domains choose --blocks 15  # fits' masks chosen on fresh cluster text (`chosen`)
    python benchmarks/run.py domains score --blocks 15   # the cross-domain matrix and every bundle, routed
    python benchmarks/run.py domains gold --blocks 15    # GSM8K / MBPP reference solutions: bits per byte
    python benchmarks/run.py domains fragments --blocks 15  # do short fit passages favour other masks?
    python benchmarks/run.py domains tasks --blocks 15   # the fits on the paper's six tasks (`task_limit`)
    python benchmarks/run.py domains tasks --suite domains6  # dense, static masks and fits on the domain cloze tasks
    python benchmarks/run.py domains tasks --blocks 8 --limit 500  # the six tasks at the headline's limit 500
    python benchmarks/report.py                       # then the tables in RESULTS.md

`search` gives the ceiling of input guidance: the mask of domain i, searched on domain i's text, scored on
the text of every domain j. Its diagonal against the best global static mask says where routing can pay and
by how much. `score` also runs each IG bundle routed by the passage's own text (never by the domain's name),
and an oracle that gives every passage the best of that bundle's cluster masks: the gap between the two is
what the router loses, the gap from the oracle to the ceiling what the masks lose. Every step keeps what it
has done (searches in a checkpoint folder, scores per distinct mask), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from igprune.texts import Request

HERE = Path(__file__).parent
BUNDLES = HERE / "bundles"
RESULTS = HERE / "results" / "domains"
CONFIG = yaml.safe_load((HERE / "configs" / "domains.yaml").read_text())  # the runs and settings, as data
SEED = CONFIG["seed"]
SEARCH, GLOBAL, GLOBAL_BY_MODEL = CONFIG["search"], CONFIG["global"], CONFIG["global_by_model"]
HELDOUT, GOLD, FIT_PASSAGES = CONFIG["heldout"], CONFIG["gold"], CONFIG["fit_passages"]
TASK_LIMIT, TASK_LIMIT_BY_MODEL = CONFIG["task_limit"], CONFIG["task_limit_by_model"]
CLOZE_LIMIT_BY_MODEL = CONFIG["cloze_limit_by_model"]
STATIC, POOL = CONFIG["static"], CONFIG["pool"]
FITS: dict[str, dict[str, Any]] = CONFIG["fits"]
CHOSEN: dict[str, dict[str, Any]] = CONFIG["chosen"]
GATED: dict[str, dict[str, Any]] = CONFIG["gated"]
RUN_NAMES = [*FITS, *CHOSEN, *GATED]  # every IG bundle this script makes, in the order they are made


def global_order(name: str, blocks: int) -> list[str]:
    """The global static SLEB mask's units (GLOBAL, or the model's GLOBAL_BY_MODEL), in its search's order."""
    from igprune.bundle import Bundle

    pattern = GLOBAL_BY_MODEL.get(name, GLOBAL)
    return Bundle.load(BUNDLES / name / pattern.format(blocks=blocks)).logs["search"]["order"]


def made_by(run: str, blocks: int) -> dict[str, Any]:
    """The whole recipe of a domain bundle, as data for its bundle.json ("reproduce"): every step from its FITS
    entry to `run` with the settings configs/domains.yaml gives it, in the order they are made, and the
    commands that remake it. The static and wide masks a step reads come from `run.py headline` and this script's
    `search` and `wide` steps."""
    specs = {**FITS, **CHOSEN, **GATED}
    step_of = {**dict.fromkeys(FITS, "fit"), **dict.fromkeys(CHOSEN, "choose"), **dict.fromkeys(GATED, "gate")}
    needed, pending = set(), [run]
    while pending:  # the run, what it was made from, and an `again` choice's earlier run
        name = pending.pop()
        needed.add(name)
        pending += [specs[name][k] for k in ("from", "again") if k in specs[name]]
    steps = [{"step": step_of[name], "run": name, **specs[name]} for name in RUN_NAMES if name in needed]
    steps = json.loads(json.dumps(steps).replace("{blocks}", str(blocks)))  # pool names as the bundles read them
    return {"by": "benchmarks/run.py domains", "config": "benchmarks/configs/domains.yaml", "seed": SEED,
            "steps": steps, "commands": [f"python benchmarks/run.py domains {s['step']} --blocks {blocks} "
                                         f"--only {s['run']}" for s in steps]}


def requests(fit: dict[str, Any]) -> list[str]:
    """FIT_PASSAGES whole training records (task and solution) of the instruct set's task that a FITS entry adds
    to the domains pool: requests for code, which no domain source holds."""
    return [r.prompt + r.response for r in request_pairs(fit)]


def request_pairs(fit: dict[str, Any]) -> list[Request]:
    """The records of `requests`, each as a Request: its prompt read, its solution scored."""
    from igprune.data import reference_solutions

    task = fit.get("requests")
    if not task:
        return []
    records = [Request(prompt, solution) for prompt, solution in reference_solutions("train")[task]]
    return random.Random(SEED).sample(records, min(FIT_PASSAGES, len(records)))  # as many as each domain's


def shared_prefix(name: str, blocks: int, units: int | str | None = None) -> list[str]:
    """The units every domain's and cluster's search starts from: the global SLEB search's first `units`, by
    default its first half ("all": the global mask itself, nothing left to search)."""
    order = global_order(name, blocks)
    return order if units == "all" else order[: int(round(0.5 * blocks)) if units is None else units]


def task_limit(model: str) -> int:
    """Documents per six-task run: the limit of the model's headline runs it is set beside."""
    return TASK_LIMIT_BY_MODEL.get(model, TASK_LIMIT)


def folder(model: str) -> Path:
    return RESULTS / model


def fit_dir(model: str, name: str, blocks: int) -> Path:
    return BUNDLES / model / "domains" / f"{name}-b{blocks}"


def wide_path(model: str, blocks: int, source: str, variant: str = "") -> Path:
    """The JSON of one wide search: its order and how its rows were cut (variant: wide_variant joined by "-")."""
    return folder(model) / f"{'-'.join(['wide', *filter(None, [variant]), source])}-b{blocks}.json"


# ---------------------------------------------------------------------------------------------- search


def search(model, tokenizer, name: str, blocks: int) -> None:
    from igprune.data import DOMAIN_SOURCES, load_calibration
    from igprune.files import write_json
    from igprune.finders.search import SearchConfig, search_cluster_masks

    out = folder(name) / f"search-b{blocks}.json"
    if out.is_file():
        print(f"{out} exists")
        return
    started = time.perf_counter()
    groups = [load_calibration(d, seed=SEED) for d in DOMAIN_SOURCES]
    sparsity = blocks / (2 * model.config.num_hidden_layers)
    log = search_cluster_masks(model, tokenizer, groups, sparsity, seed=SEED,
                               config=SearchConfig(**{k: v for k, v in SEARCH.items() if k != "choose_samples"},
                                                   prefix=shared_prefix(name, blocks)), with_global=False,
                               checkpoint=BUNDLES / name / f"domains-search-b{blocks}.checkpoint").log
    orders = {d: c["order"] for d, c in zip(DOMAIN_SOURCES, log.pop("clusters"), strict=True)}
    write_json(out, {"model": name, "blocks": blocks, "settings": SEARCH, "seed": SEED, "domain_orders": orders,
                     **log, "seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads(),
                     "load_average": os.getloadavg()[0]})
    print(f"wrote {out}")


def search_wide(model, tokenizer, name: str, blocks: int, source: str, packing: str, metric: str,
                prefix: int | None) -> None:
    """SLEB from the same prefix on 8 x 128 tokens of one source (the headline searches' budget, 4x the domain
    searches'): on "domains", the global static mask on the fits' text; on one domain, whether that domain's
    mask needs more calibration than 4 x 64 tokens to beat the global masks on its held-out text. With packing
    "texts", every row is one passage of up to 1,024 characters from its first token, cut and scored as the
    held-out passages and ig-sleb-n6-texts's cluster text are: that fit's per-domain ceiling. With metric "kl"
    SLEB judges removals by KL divergence from the dense model, not by perplexity. `prefix` starts from the global
    search's first that many units instead of its first half (0: a search from the dense model), to see whether
    the shared prefix caps how far a domain's mask can move."""
    from igprune.data import load_calibration
    from igprune.files import write_json
    from igprune.finders import find_mask

    out = wide_path(name, blocks, source, "-".join(wide_variant(packing, metric, prefix)))
    if out.is_file():
        print(f"{out} exists")
        return
    max_chars = 8 * HELDOUT["seq_len"] if packing == "texts" else 2048
    bundle = find_mask("sleb", model, tokenizer, load_calibration(source, max_chars=max_chars, seed=SEED),
                       blocks / (2 * len(model.model.layers)), "block", seed=SEED, source=source,
                       checkpoint=BUNDLES / name / f"domains-{out.stem}.checkpoint",
                       samples=8, seq_len=128, packing=packing, metric=metric,
                       start=shared_prefix(name, blocks, prefix))
    write_json(out, {"model": name, "blocks": blocks, "source": source, "packing": packing, "metric": metric,
                     "prefix": prefix, "max_chars": max_chars,
                     "order": bundle.logs["search"]["order"], "calibration": bundle.config["calibration"],
                     "seconds": bundle.config["fit_seconds"], "threads": torch.get_num_threads(),
                     "load_average": os.getloadavg()[0]})
    print(f"wrote {out}")


def wide_variant(packing: str, metric: str, prefix: int | None = None) -> list[str]:
    """What a wide search does unlike the first ones (joined rows, perplexity, the shared prefix): [], ["texts"],
    ["texts", "kl"], ["texts", "p0"]; it names the search's file (wide-texts-code), its matrix row
    (sleb-8x128-texts-code) and its ceiling."""
    return [*([packing] if packing != "joined" else []), *([metric] if metric != "ppl" else []),
            *([f"p{prefix}"] if prefix is not None else [])]


# ------------------------------------------------------------------------------------------------- fit


def fit(model, tokenizer, name: str, blocks: int, only: set[str] | None) -> None:
    """Each FITS entry with igprune fit's recipe (igprune.pruner.fit_bundle) on the domains pool; under torchrun
    (`torchrun --nproc-per-node 2 benchmarks/run.py domains fit ...`) the ranks split every search's masks."""
    from igprune import distributed
    from igprune.data import DOMAIN_SOURCES
    from igprune.files import remove_tree
    from igprune.finders.search import candidate_blocks
    from igprune.pruner import fit_bundle, fit_config

    for run, spec in FITS.items():
        path = fit_dir(name, run, blocks)
        if (only and run not in only) or (path / "bundle.json").is_file():
            continue
        print(f"== fit {run}", flush=True)
        started = time.perf_counter()
        changes = {"finder": "search" if spec["finder"] == "sleb" else "l0", "l0": spec.get("train", {}),
                   "data": {"source": "domains", "samples": FIT_PASSAGES * len(DOMAIN_SOURCES),
                            "max_chars": spec.get("max_chars")}}
        if spec["finder"] == "sleb":
            search = {**spec["search"], "prefix": shared_prefix(name, blocks, spec.get("prefix"))}
            # these fits predate the choice margin and choose by the lowest perplexity; CHOSEN adds margins
            choose = {"samples": search.pop("choose_samples", 8), "margin": search.pop("choose_margin", 0.0)}
            if choose["samples"]:
                search["global_order"] = global_order(name, blocks)
            if spec.get("pool"):
                search["candidates"] = [candidate_blocks(m) for m in pool_masks(name, blocks, spec["pool"]).values()]
            changes.update(search=search, choose=choose)
        config = fit_config("paper", changes, n_clusters=spec["n_clusters"],
                            sparsity=blocks / (2 * model.config.num_hidden_layers), seed=SEED)
        bundle = fit_bundle(model, tokenizer, config, requests(spec),
                            checkpoint_dir=path.with_name(path.name + ".checkpoint"))
        bundle.config["benchmark"] = {"run": run, "seconds": round(time.perf_counter() - started, 1),
                                      "load_average": os.getloadavg()[0], "torch_threads": torch.get_num_threads(),
                                      "ranks": distributed.world_size()}
        bundle.config["reproduce"] = made_by(run, blocks)
        with distributed.main_writes() as write:
            if write:
                bundle.save(path)
                remove_tree(path.with_name(path.name + ".checkpoint"))  # nothing left to resume
                print(f"wrote {path} ({bundle.config['benchmark']['seconds']} s)", flush=True)


def choose(model, tokenizer, name: str, blocks: int, only: set[str] | None) -> None:
    """Each CHOSEN bundle: its fit with every cluster's mask chosen among the candidates on that cluster's
    passages its search did not score (igprune.choosing.choose_masks): same centroids, same searches."""
    from igprune.bundle import Bundle
    from igprune.choosing import choose_masks
    from igprune.finders import make_calibration
    from igprune.finders.search import find_order_mask
    from igprune.routing import Router

    for run, spec in CHOSEN.items():
        out = fit_dir(name, run, blocks)
        if ((only and run not in only) or (out / "bundle.json").is_file()
                or not (fit_dir(name, spec["from"], blocks) / "bundle.json").is_file()):
            continue
        source, settings = fit_dir(name, spec["from"], blocks), FITS[spec["from"]]["search"]
        bundle = Bundle.load(source)
        texts = fit_passages(bundle, spec["from"])  # each in the cluster its embedding is nearest to
        router = Router.from_bundle(bundle, always_embed=True)
        labels = [r.cluster for r in router.route(texts)]
        if labels and [labels.count(k) for k in range(bundle.n_clusters)] != bundle.config["cluster_sizes"]:
            raise SystemExit("routing the fit's passages does not give its clusters; refit")
        groups = [[t for t, label in zip(texts, labels, strict=True) if label == k] for k in range(bundle.n_clusters)]
        searched = [make_calibration(tokenizer, g, settings["samples"], settings["seq_len"], SEED,
                                     packing=settings["packing"]).texts for g in groups]
        if spec.get("texts"):  # the pool's other training passages, which the fit never saw
            unseen = unseen_groups(router, texts, FITS[spec["from"]].get("max_chars"))
            if spec["texts"] == "fresh":
                groups, searched = unseen, [[] for _ in unseen]
            else:  # "unscored": with the fit's passages that no search and no earlier choice scored
                scored = scored_rows(model, tokenizer, name, blocks, spec["from"], groups, searched)
                groups = [[*g, *u] for g, u in zip(groups, unseen, strict=True)]
                searched = [[*s, *rows] for s, rows in zip(searched, scored, strict=True)]
        candidates = [find_order_mask(model, c["order"], "block") for c in bundle.logs["search"]["clusters"]]
        if spec["global"]:
            candidates.append(find_order_mask(model, global_order(name, blocks), "block"))
        found = pool_masks(name, blocks, spec.get("pool", []))
        if spec.get("domains"):
            domain_found, domain_rows = domain_masks(model, tokenizer, name, blocks, spec["domains"])
            found.update(domain_found)
            searched = [[*texts, *domain_rows] for texts in searched]
        pool = list(found)
        candidates += found.values()
        default = bundle.n_clusters if spec["global"] else None  # the global mask follows the cluster masks
        picked = range(len(groups))
        if spec.get("again"):  # only the clusters that are mostly requests; the rest keep the earlier choice's
            asked = set(requests(FITS[spec["from"]]))
            picked = [k for k, g in enumerate(groups) if 2 * sum(t in asked for t in g) > len(g)]
        if spec.get("responses"):  # requests scored on their solutions, as the gold step scores them
            pairs = {r.prompt + r.response: r for r in request_pairs(FITS[spec["from"]])}
            groups, searched = ([[pairs.get(t, t) for t in g] for g in lists] for lists in (groups, searched))
        chosen, log = choose_masks(model, tokenizer, [groups[k] for k in picked], torch.stack(candidates),
                                  samples=spec["samples"], seq_len=spec.get("seq_len", settings["seq_len"]),
                                  exclude=[searched[k] for k in picked], seed=SEED, packing=settings["packing"],
                                  default=default, margin=spec.get("margin", 0.0))
        masks = chosen
        if spec.get("again"):
            earlier = Bundle.load(fit_dir(name, spec["again"], blocks))
            masks, again = earlier.masks.clone(), log
            masks[list(picked)] = chosen.to(masks.dtype)
            log = {**earlier.logs["choose"], "again": {"clusters": picked, "seq_len": again["seq_len"]}}
            for key in ("chosen", "perplexity", "z_best_vs_default", "margins"):
                log[key] = list(log[key])
                for j, k in enumerate(picked):
                    log[key][k] = again[key][j]
        config = {k: v for k, v in bundle.config.items() if k not in ("sha256",)}
        Bundle(masks, bundle.centroids, {**config, "chosen_from": source.name, "chosen_with_global": spec["global"],
                                         "chosen_with_pool": pool, "chosen_on_responses": bool(spec.get("responses")),
                                         "reproduce": made_by(run, blocks)},
               None, {**bundle.logs, "choose": log}).save(out)
        print(f"wrote {out}: chosen {log['chosen']}", flush=True)


def fit_passages(bundle, run: str) -> list[str]:
    """The passages a FITS, CHOSEN or GATED bundle was clustered on (fit_bundle's recipe), in its fit's order."""
    from igprune.pruner import fit_texts

    while run not in FITS:
        run = {**CHOSEN, **GATED}[run]["from"]
    calibration = bundle.config["calibration"]
    return [*fit_texts("domains", calibration["samples"], calibration["seq_len"], SEED, FITS[run].get("max_chars")),
            *requests(FITS[run])]


def gate(model, name: str, blocks: int, only: set[str] | None) -> None:
    """Each GATED bundle: its source with a radius per cluster over the fit's own passages (stage2.router.gate_radii)
    and the global mask as the fallback beyond them."""
    from igprune.bundle import Bundle
    from igprune.finders.search import find_order_mask
    from igprune.routing import Router, gate_radii

    for run, spec in GATED.items():
        out, source = fit_dir(name, run, blocks), fit_dir(name, spec["from"], blocks)
        if (only and run not in only) or (out / "bundle.json").is_file() or not (source / "bundle.json").is_file():
            continue
        bundle = Bundle.load(source)
        embeddings = Router.from_bundle(bundle, always_embed=True).encoder.encode(fit_passages(bundle, spec["from"]))
        radii = gate_radii(bundle.centroids, embeddings, spec["quantile"])
        gated = bundle.with_gate(radii, find_order_mask(model, global_order(name, blocks), "block"), spec["quantile"])
        gated.config.update(gated_from=spec["from"], reproduce=made_by(run, blocks))
        gated.save(out)
        print(f"wrote {out}: radii {[round(r, 3) for r in radii.tolist()]}", flush=True)


def unseen_groups(router, seen: list[str], max_chars: int | None) -> list[list[str]]:
    """The domains pool's training passages outside `seen` (a fit's), each in the cluster its embedding is nearest
    to: text that no search and no choice scored."""
    from igprune.pruner import fit_texts

    skip = set(seen)
    unseen = [t for t in fit_texts("domains", None, HELDOUT["seq_len"], SEED, max_chars) if t not in skip]
    labels = [r.cluster for r in router.route(unseen)]
    groups = [[t for t, label in zip(unseen, labels, strict=True) if label == k] for k in range(router.n_clusters)]
    print(f"{len(unseen)} unseen passages, per cluster {[len(g) for g in groups]}", flush=True)
    return groups


def scored_rows(model, tokenizer, name: str, blocks: int, fit: str, groups: list[list[str]],
                searched: list[list[str]]) -> list[list[str]]:
    """Per cluster, the texts of every row that the fit's own choice and each CHOSEN choice on its passages
    scored, cut again as choose_masks cut them (same exclusions, seed and sizes)."""
    from igprune.finders import make_calibration

    settings = FITS[fit]["search"]
    earlier = [spec for spec in CHOSEN.values() if spec["from"] == fit and not spec.get("texts")]
    if settings["choose_samples"]:
        earlier.append({"samples": settings["choose_samples"]})
    variants = {spec["domains"] for spec in earlier if spec.get("domains")}  # each variant's rows rebuilt once
    domain_rows = {v: domain_masks(model, tokenizer, name, blocks, v)[1] for v in variants}
    rows: list[list[str]] = [[] for _ in groups]
    for spec in earlier:
        extra = domain_rows.get(spec.get("domains"), [])
        excluded = [[*s, *extra] for s in searched]
        for i, (texts, skip) in enumerate(zip(groups, map(set, excluded), strict=True)):
            rows[i] += make_calibration(tokenizer, [t for t in texts if t not in skip], spec["samples"],
                                        spec.get("seq_len", settings["seq_len"]), SEED,
                                        packing=settings["packing"]).texts
    return rows


# ----------------------------------------------------------------------------------------------- score


def heldout_ids(tokenizer) -> dict[str, list[list[int]]]:
    """Each domain's held-out passages as `score` scores them: HELDOUT["limit"] of them, their first
    HELDOUT["seq_len"] tokens; decoded, they are what the router reads."""
    from igprune.data import DOMAIN_SOURCES, load_calibration
    from igprune.evaluation.perplexity import CHARS_PER_TOKEN, truncate

    seq_len = HELDOUT["seq_len"]
    return {d: truncate(tokenizer, load_calibration(d, split="heldout", max_chars=CHARS_PER_TOKEN * seq_len,
                                                    limit=HELDOUT["limit"], seed=SEED), seq_len)[0]
            for d in DOMAIN_SOURCES}


def score(model, tokenizer, name: str, blocks: int) -> None:
    """Per-passage NLL of every distinct mask on every domain's held-out passages, then the report."""
    from igprune.bundle import Bundle
    from igprune.data import DOMAIN_SOURCES
    from igprune.files import read_json, write_json
    from igprune.finders.search import find_order_mask

    ids = heldout_ids(tokenizer)
    nll = _cached_nll(model, folder(name) / f"passages-b{blocks}.json", ids)
    masks = _static_masks(name, blocks)
    found_path = folder(name) / f"search-b{blocks}.json"
    found = read_json(found_path) if found_path.is_file() else None  # the ceiling needs `search` first
    domain_masks = {}
    wide: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}  # per variant, each domain's 8 x 128-token mask
    for path in sorted(folder(name).glob(f"wide-*-b{blocks}.json")):
        found_wide = read_json(path)
        variant = tuple(wide_variant(found_wide.get("packing", "joined"), found_wide.get("metric", "ppl"),
                                     found_wide.get("prefix")))
        mask = find_order_mask(model, found_wide["order"], "block")
        if found_wide["source"] == "domains":  # on the pool: one more global static mask
            masks["-".join(["sleb-8x128", *variant, "domains"])] = mask
        else:
            wide.setdefault(variant, {})[found_wide["source"]] = mask
    if found:
        domain_masks = {d: find_order_mask(model, order, "block") for d, order in found["domain_orders"].items()}
    per_domain = {f"mask of {d}": mask for d, mask in domain_masks.items()}  # each searched on one domain's text
    per_domain.update({"-".join(["sleb-8x128", *variant, d]): mask for variant, own in wide.items()
                       for d, mask in own.items()})
    matrix = {label: {d: _ppl(nll(mask)[d]) for d in DOMAIN_SOURCES} for label, mask in {**masks, **per_domain}.items()}
    static = {label: nll(mask) for label, mask in masks.items() if label != "dense"}
    best = min(static, key=lambda label: _ppl(_all(static[label]))[0])
    report: dict[str, Any] = {
        "model": name, "blocks": blocks, "heldout": HELDOUT, "seed": SEED, "domains": list(DOMAIN_SOURCES),
        "passages": {d: len(v) for d, v in ids.items()}, "search": found and {
            k: found[k] for k in ("settings", "shared_order", "domain_orders", "seconds")},
        "matrix": matrix, "overall": {label: _ppl(_all(nll(mask))) for label, mask in masks.items()},
        "best_static": best}
    if domain_masks:
        ceiling = {d: nll(domain_masks[d])[d] for d in DOMAIN_SOURCES}
        report["ceiling"] = {"overall": _ppl(_all(ceiling)), **_versus(ceiling, static[best])}
        report["searched_tokens"] = _on_search_tokens(model, tokenizer, domain_masks, masks[best])
    for variant, own in wide.items():  # each domain's 8 x 128-token mask on its own held-out text
        ceiling = {d: nll(own[d])[d] for d in DOMAIN_SOURCES if d in own}
        key = "_".join(["ceiling_8x128", *variant])
        report[key] = {"overall": _ppl(_all(ceiling)), **_versus(ceiling, {d: static[best][d] for d in ceiling})}
    route_texts = {d: tokenizer.batch_decode(ids[d], skip_special_tokens=True) for d in DOMAIN_SOURCES}
    report["bundles"] = {run: _bundle_report(path, nll, route_texts, static[best])
                         for run, path in _ig_runs(name, blocks)}
    found_masks = {label: mask for label, mask in {**masks, **per_domain}.items() if mask is not None}  # not dense
    for run, path in _ig_runs(name, blocks):
        if run not in GATED:  # a gated bundle's masks are its source's
            found_masks.update({f"{run} cluster {k}": mask for k, mask in enumerate(Bundle.load(path).masks)})
    report["ceiling_chosen"] = _cross_chosen({label: nll(mask) for label, mask in found_masks.items()},
                                             static[best])
    write_json(folder(name) / f"score-b{blocks}.json", report)
    print(f"wrote {folder(name) / f'score-b{blocks}.json'}")


def gold(model, tokenizer, name: str, blocks: int) -> None:
    """Log-likelihood tasks in the maths and code domains: bits per byte of the reference solutions of held-out
    GSM8K and MBPP records given their prompts, each routed by its prompt (what a served request shows)."""
    from igprune.data import reference_solutions
    from igprune.files import write_json
    from igprune.texts import tokens as text_tokens

    ids, context, weights, prompts, lengths = {}, {}, {}, {}, {}
    for task, pairs in reference_solutions("heldout").items():
        rows = []
        for request in (Request(prompt, solution) for prompt, solution in pairs):
            tokens, scored = text_tokens(tokenizer, request)  # the prompt read, the solution scored
            if len(tokens) <= GOLD["max_tokens"]:
                rows.append((request, tokens, scored.index(True)))
        rows = random.Random(SEED).sample(rows, min(GOLD["limit"], len(rows)))
        ids[task] = [tokens for _, tokens, _ in rows]
        context[task] = [read for *_, read in rows]
        weights[task] = [len(request.response.encode("utf-8")) for request, *_ in rows]
        prompts[task] = [request.prompt for request, *_ in rows]
        lengths[task] = {"prompt": statistics.median(context[task]),  # what a choice row of 128 tokens holds
                         "solution": statistics.median(len(tokens) - read for _, tokens, read in rows)}
    nll = _cached_nll(model, folder(name) / f"gold-b{blocks}.json", ids, context, weights)
    masks = _static_masks(name, blocks)
    static = {label: nll(mask) for label, mask in masks.items() if label != "dense"}
    best = min(static, key=lambda label: _rate(_all(static[label]))[0])
    report: dict[str, Any] = {
        "model": name, "blocks": blocks, "settings": GOLD, "seed": SEED, "records": {t: len(v) for t, v in ids.items()},
        "median_tokens": lengths,
        "bpb": {label: {t: _bpb(v) for t, v in nll(mask).items()} | {"overall": _bpb(_all(nll(mask)))}
                for label, mask in masks.items()},
        "best_static": best,
        "bundles": {run: _bundle_report(path, nll, prompts, static[best]) for run, path in _ig_runs(name, blocks)}}
    out = folder(name) / f"gold-report-b{blocks}.json"
    write_json(out, report)
    print(f"wrote {out}")


def fragments(model, tokenizer, name: str, blocks: int) -> None:
    """Does passage length change which mask wins? Per domain: the global mask, the domain's own 8 x 128-token
    mask and the ig-sleb-n6-wide cluster mask its held-out passages route to most, each on 16 x 128 tokens of
    the same held-out documents cut two ways: into fit-style fragments of at most 256 characters (fit_texts,
    seq_len 64) and into passages of up to 2,048 (the domain searches'), each joined with EOS."""
    from igprune.bundle import Bundle
    from igprune.data import DOMAIN_SOURCES, load_calibration
    from igprune.files import read_json, write_json
    from igprune.finders import Scorer, make_calibration
    from igprune.finders.search import find_order_mask

    report = read_json(folder(name) / f"score-b{blocks}.json")
    bundle_masks = Bundle.load(fit_dir(name, "ig-sleb-n6-wide", blocks)).masks
    routing = report["bundles"]["ig-sleb-n6-wide"]["routing"]
    global_mask = find_order_mask(model, global_order(name, blocks), "block")
    out: dict[str, Any] = {"model": name, "blocks": blocks, "tokens": "16 x 128", "seed": SEED, "domains": {}}
    for d in DOMAIN_SOURCES:
        cluster = max(routing[d], key=routing[d].get)
        masks = {"global": global_mask,
                 "own 8x128": find_order_mask(model, read_json(wide_path(name, blocks, d))["order"],
                                              "block"),
                 f"ig-sleb-n6-wide cluster {cluster}": bundle_masks[int(cluster)]}
        out["domains"][d] = {}
        for cut, max_chars in (("fragments", 256), ("passages", 2048)):
            texts = load_calibration(d, split="heldout", max_chars=max_chars, seed=SEED)
            scorer = Scorer(model, make_calibration(tokenizer, texts, 16, 128, SEED, f"{d} {cut}"))
            out["domains"][d][cut] = {label: scorer.perplexity(mask) for label, mask in masks.items()}
        print(d, out["domains"][d], flush=True)
    write_json(folder(name) / f"fragments-b{blocks}.json", out)


def _cached_nll(model, path: Path, ids: dict[str, list[list[int]]], context: dict[str, list[int]] | None = None,
                weights: dict[str, list[int]] | None = None):
    """nll(mask) -> {set: [[summed NLL, weight] per sequence]} under `mask` (None: dense), computed once per
    distinct mask and kept in `path`, so an interrupted run resumes. A sequence's first `context` tokens are
    read, not scored; its weight is the number of tokens scored, or `weights` (e.g. bytes)."""
    from igprune.blocks import masked
    from igprune.evaluation.perplexity import token_nll
    from igprune.files import read_json, write_json
    from igprune.masks import mask_row

    cache = read_json(path) if path.is_file() else {}

    def nll(mask: torch.Tensor | None) -> dict[str, list[list[float]]]:
        key = "dense" if mask is None else mask_row(mask)
        if key not in cache:
            print(f"scoring {key}", flush=True)
            scores = {}
            with masked(model, mask):
                for d, rows in ids.items():
                    pairs = token_nll(model, rows, 8, context and context[d])
                    scores[d] = [[x, weights[d][i] if weights else n] for i, (x, n) in enumerate(pairs)]
            cache[key] = scores
            write_json(path, cache)
        return cache[key]

    return nll


def domain_masks(model, tokenizer, name: str, blocks: int, variant: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every domain's wide search of `variant` (e.g. "texts-p0"), and the texts those searches scored (rebuilt
    as search_wide cut them, checked against the recorded hash), so that a choice can keep away from them."""
    from igprune.data import DOMAIN_SOURCES, load_calibration
    from igprune.files import read_json
    from igprune.finders import make_calibration
    from igprune.finders.search import find_order_mask

    masks, rows = {}, []
    for domain in DOMAIN_SOURCES:
        wide = read_json(wide_path(name, blocks, domain, variant))
        rows_of = wide["calibration"]
        calibration = make_calibration(tokenizer, load_calibration(domain, max_chars=wide["max_chars"], seed=SEED),
                                       rows_of["sequences"], rows_of["seq_len"], SEED, source=domain,
                                       packing=wide["packing"])
        if calibration.info.get("sha256") != wide["calibration"]["sha256"]:
            raise SystemExit(f"the {domain} search's rows cannot be rebuilt (hash differs); rerun its wide search")
        masks[f"wide-{variant}-{domain}"] = find_order_mask(model, wide["order"], "block")
        rows += calibration.texts
    return masks, rows


def pool_masks(name: str, blocks: int, patterns: list[str]) -> dict[str, torch.Tensor]:
    """The masks of the static bundles a pool names that exist for this model (qwen2.5-0.5b has fewer)."""
    from igprune.bundle import Bundle

    paths = [BUNDLES / name / pattern.format(blocks=blocks) for pattern in patterns]
    return {path.name: Bundle.load(path).masks[0] for path in paths if (path / "bundle.json").is_file()}


def _static_masks(name: str, blocks: int) -> dict[str, torch.Tensor | None]:
    """Dense (None) and every STATIC bundle's mask that exists."""
    return {"dense": None, **pool_masks(name, blocks, STATIC)}


def _ig_runs(name: str, blocks: int) -> list[tuple[str, Path]]:
    """The IG bundles that exist: the FITS, the CHOSEN, and the headline fit on the mixed pool for comparison."""
    headline = f"ig16-b{blocks}"
    runs = [(run, fit_dir(name, run, blocks)) for run in RUN_NAMES] + [(headline, BUNDLES / name / headline)]
    return [(run, path) for run, path in runs if (path / "bundle.json").is_file()]


def _bundle_report(path: Path, nll, route_texts: dict[str, list[str]],
                   static: dict[str, list[list[float]]]) -> dict[str, Any]:
    """One IG bundle on every set: each item under the mask its router picks from `route_texts`, and under the
    best of the bundle's masks for it (the oracle), against the best static mask, with the routing table."""
    from igprune.bundle import Bundle
    from igprune.masks import mask_row
    from igprune.routing import Router

    bundle = Bundle.load(path)
    router = Router.from_bundle(bundle, always_embed=True)
    per_cluster = [nll(m) for m in bundle.route_masks]  # a gate's fallback last
    routed, oracle, table = {}, {}, {}
    for d, texts in route_texts.items():
        clusters = [r.cluster for r in router.route(texts)]
        routed[d] = [per_cluster[c][d][i] for i, c in enumerate(clusters)]
        oracle[d] = [min((p[d][i] for p in per_cluster), key=lambda x: x[0]) for i in range(len(texts))]
        table[d] = {str(c): clusters.count(c) for c in sorted(set(clusters))}
    return {"path": str(path.relative_to(HERE)), "finder": bundle.config.get("finder", "l0"),
            "clusters": bundle.n_clusters, "distinct_masks": len({mask_row(m) for m in bundle.masks}),
            "fit_seconds": bundle.config.get("fit_seconds"), "routing": table,
            "routed": {"overall": _ppl(_all(routed)), "bpb": _bpb(_all(routed)), **_versus(routed, static)},
            "oracle": {"overall": _ppl(_all(oracle)), "bpb": _bpb(_all(oracle)), **_versus(oracle, static)}}


def tasks(model, tokenizer, name: str, blocks: int, only: set[str] | None, suite: str = "paper6",
          limit: int | None = None) -> None:
    """Each fit and chosen bundle on a task suite, the Percentage column against the dense model.

    "paper6": the paper's six tasks at the model's task limit (or `limit`, where the headline has a dense run at it;
    results then named "-l<limit>"), against the headline's dense run (the headline has the static masks there).
    "domains6": the six domain cloze tasks (igprune.data.CLOZE), whole or each task's first
    CLOZE_LIMIT_BY_MODEL documents, with dense and every static mask run here too; each document routed by its
    context."""
    from headline import RUNS, result_path

    from igprune.evaluation.benchmark import evaluate
    from igprune.evaluation.results import load_results, save_results

    tail = ""
    if suite == "paper6":
        tail = "" if limit in (None, task_limit(name)) else f"-l{limit}"
        limit = limit or task_limit(name)
        dense_run = next((r for r in RUNS if r.model == name and r.method == "dense" and r.limit == limit), None)
        if dense_run is None:
            raise SystemExit(f"run.py domains: error: the headline has no dense run of {name} at limit {limit}; "
                             "use its limit or add one to headline.RUNS")
        dense, runs = load_results(result_path(dense_run)), []
    elif limit is not None:
        raise SystemExit("run.py domains: error: --limit is for --suite paper6; domains6 runs cloze_limit_by_model")
    else:
        limit, dense_path = CLOZE_LIMIT_BY_MODEL.get(name), folder(name) / f"{suite}-dense.json"
        if not dense_path.is_file():  # seeded, so a saved dense run is the run this would repeat
            save_results(dense_path, evaluate(model, tokenizer, tasks=[suite], limit=limit, seed=SEED))
        dense = load_results(dense_path)
        headline = [pattern.format(blocks=blocks) for pattern in [*STATIC, "ig16-b{blocks}"]]  # names hold blocks
        runs = [(run, BUNDLES / name / run, folder(name) / f"{suite}-{run}.json") for run in headline]
    runs += [(run, fit_dir(name, run, blocks), folder(name) / f"{suite}-{run}-b{blocks}{tail}.json")
             for run in RUN_NAMES]
    for run, path, out in runs:
        if (path / "bundle.json").is_file() and not out.is_file() and (not only or run in only):
            results = evaluate(model, tokenizer, path, tasks=[suite], limit=limit, dense=dense, seed=SEED)
            save_results(out, results)
            print(f"{run}: average {results['average']:.2f}, {results['percentage']:.2f}% of dense", flush=True)
    if suite == "domains6" and (not only or "own" in only):
        _own_on_cloze(model, tokenizer, name, blocks, dense, limit)


def _own_on_cloze(model, tokenizer, name: str, blocks: int, dense: dict[str, Any], limit: int | None,
                  variant: str = "texts-p0") -> None:
    """Each domain's own SLEB search (`wide` of `variant`: from the dense model, rows cut as inputs) on that domain's
    cloze task alone: routing by the domain's name, which no router may. Where it beats every static mask, input
    guidance has room on accuracy; where it does not, no routing among these masks gains there."""
    from igprune.bundle import Bundle, fingerprint
    from igprune.data import CLOZE_TASKS
    from igprune.evaluation.benchmark import evaluate
    from igprune.evaluation.results import percentage, save_results, task_average
    from igprune.files import read_json
    from igprune.finders.search import find_order_mask

    out = folder(name) / f"domains6-own-{variant}-b{blocks}.json"
    paths = {task: wide_path(name, blocks, source, variant) for task, source in CLOZE_TASKS.items()}
    if out.is_file() or not all(path.is_file() for path in paths.values()):
        return
    result: dict[str, Any] = {}
    for task, path in paths.items():
        mask = find_order_mask(model, read_json(path)["order"], "block")
        own = Bundle(mask.unsqueeze(0), torch.zeros(1, 0), {"fingerprint": fingerprint(model), "model": name,
                                                            "method": "sleb", "granularity": "block"})
        part = evaluate(model, tokenizer, own, tasks=[task], limit=limit, seed=SEED)
        result = {**part, "tasks": {**result.get("tasks", {}), **part["tasks"]}}
    result["average"], result["average_stderr"] = task_average(result["tasks"])
    result["percentage"], result["method_label"] = percentage(result, dense), f"each domain's own mask ({variant})"
    save_results(out, result)
    print(f"own masks: average {result['average']:.2f}, {result['percentage']:.2f}% of dense", flush=True)


def _cross_chosen(candidates: dict[str, dict[str, list[list[float]]]],
                  static: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Each domain's passages under the one candidate mask with the lowest perplexity on the domain's other
    passages (the even-numbered choose for the odd and back): the best per-domain mask among every mask found,
    chosen by the domain's name and yet never scored on a passage that chose it. An estimate of the headroom
    that, unlike the per-passage oracle, does not fit the scored text's noise."""
    scored, chosen = {}, {}
    for d, reference in static.items():
        n = len(reference)
        scored[d], chosen[d] = [None] * n, []
        for half in (0, 1):
            judges = [i for i in range(n) if i % 2 == half]
            best = min(candidates, key=lambda label: _rate([candidates[label][d][i] for i in judges])[0])
            chosen[d].append(best)
            for i in range(1 - half, n, 2):
                scored[d][i] = candidates[best][d][i]
    return {"candidates": len(candidates), "chosen": chosen, "overall": _ppl(_all(scored)),
            **_versus(scored, static)}


def _versus(ours: dict[str, list[list[float]]], static: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Perplexity per domain, and how much lower than the static mask's, overall and per domain (paired)."""
    return {"per_domain": {d: _ppl(v) for d, v in ours.items()},
            "lower_than_best_static": {"overall": _paired(_all(ours), _all(static)),
                                       **{d: _paired(ours[d], static[d]) for d in ours}}}


def _on_search_tokens(model, tokenizer, domain_masks: dict[str, torch.Tensor],
                      best: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each domain's own mask and the best static mask on the very 4 x 64 tokens that domain's search scored:
    where the own mask wins there but loses on held-out text, the search fitted its calibration's noise."""
    from igprune.data import load_calibration
    from igprune.finders import Scorer, make_calibration

    out = {}
    for d, mask in domain_masks.items():
        scorer = Scorer(model, make_calibration(tokenizer, load_calibration(d, seed=SEED), SEARCH["samples"],
                                                SEARCH["seq_len"], SEED, d))
        out[d] = {"own": scorer.perplexity(mask), "best_static": scorer.perplexity(best)}
    return out


def _all(per_domain: dict[str, list[list[float]]]) -> list[list[float]]:
    return [x for d in sorted(per_domain) for x in per_domain[d]]


def _rate(passages: list[list[float]]) -> tuple[float, float]:
    """Token-weighted mean NLL of [nll, tokens] pairs and its standard error over passages (ratio estimator)."""
    m = len(passages)
    total, tokens = sum(p[0] for p in passages), sum(p[1] for p in passages)
    rate = total / tokens
    var = sum((p[0] - rate * p[1]) ** 2 for p in passages) / max(1, m * (m - 1))
    return rate, math.sqrt(var) / (tokens / m)


def _bpb(items: list[list[float]]) -> list[float]:
    """[bits per weight unit, its standard error]: bits per byte where the weights are bytes."""
    rate, se = _rate(items)
    return [rate / math.log(2), se / math.log(2)]


def _ppl(passages: list[list[float]]) -> list[float]:
    """[perplexity, its standard error] (delta method)."""
    rate, se = _rate(passages)
    return [math.exp(rate), math.exp(rate) * se]


def _paired(a: list[list[float]], b: list[list[float]]) -> dict[str, float]:
    """How much lower a's perplexity is than b's on the same passages, in percent, with a paired stderr."""
    rate, se = _rate([[x[0] - y[0], x[1]] for x, y in zip(a, b, strict=True)])
    return {"lower_percent": 100 * (1 - math.exp(rate)), "stderr_percent": 100 * math.exp(rate) * se}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="run.py domains", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["search", "wide", "fit", "choose", "gate", "score", "gold", "fragments",
                                         "tasks"])
    parser.add_argument("--source", default="domains", help="wide: calibration source")
    parser.add_argument("--packing", default="joined", choices=["joined", "texts"], help="wide: calibration rows")
    parser.add_argument("--metric", default="ppl", choices=["ppl", "kl"], help="wide: what SLEB minimises")
    parser.add_argument("--prefix", type=int, help="wide: units of the global order to start from (default half)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=15, help="blocks skipped of 2L")
    parser.add_argument("--only", help="fit, choose, gate, tasks: comma-separated run names")
    parser.add_argument("--suite", default="paper6", choices=["paper6", "domains6"], help="tasks: which tasks")
    parser.add_argument("--limit", type=int, help="tasks, paper6: documents per task (default: the model's task limit)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from igprune import distributed, load_model

    if distributed.init_from_env() and args.step != "fit":
        raise SystemExit("only `fit` runs on several ranks; run the other steps in one process")

    model, tokenizer = load_model(args.model)
    only = set(args.only.split(",")) if args.only else None
    if args.step == "search":
        search(model, tokenizer, args.model, args.blocks)
    elif args.step == "wide":
        search_wide(model, tokenizer, args.model, args.blocks, args.source, args.packing, args.metric, args.prefix)
    elif args.step == "fit":
        fit(model, tokenizer, args.model, args.blocks, only)
    elif args.step == "choose":
        choose(model, tokenizer, args.model, args.blocks, only)
    elif args.step == "gate":
        gate(model, args.model, args.blocks, only)
    elif args.step == "score":
        score(model, tokenizer, args.model, args.blocks)
    elif args.step == "gold":
        gold(model, tokenizer, args.model, args.blocks)
    elif args.step == "fragments":
        fragments(model, tokenizer, args.model, args.blocks)
    else:
        tasks(model, tokenizer, args.model, args.blocks, only, args.suite, args.limit)

