"""Write the generated parts of benchmarks/RESULTS.md and of the research logs (research/*/LOG.md) from the
committed results files and bundles.

Those files hold hand-written text between generated blocks; each block sits between `<!-- begin:NAME -->` and
`<!-- end:NAME -->` and is replaced by this script, so the prose stays and the numbers always come from the files.
A block is made only where a file has it. Figures are written to benchmarks/figures/. README.md is written by
hand; this script never touches it.

    python benchmarks/report.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from headline import RUNS, STATIC, Run, bundle_dir, result_path

from igprune.evaluation import figures
from igprune.evaluation.results import (
    gain_by_cluster_cell,
    gains_table,
    has_items,
    load_results,
    method_label,
    paired_gain,
    picked_per_task_gain,
    results_table,
)
from igprune.files import IGPruneError
from igprune.models import ZOO

HERE = Path(__file__).parent
REPORT = HERE / "RESULTS.md"
RESEARCH = HERE.parent / "research"  # investigations: their scripts, results and logs
FIGURES = HERE / "figures"
SMOL, QWEN = "smollm2-135m", "qwen2.5-0.5b"
PICK_REPEATS = 200  # seeded half splits behind each "picked on the other half" bound


def _find(model: str, name: str) -> Run:
    return next(r for r in RUNS if r.model == model and r.name == name)


def _json(name: str, folder: Path = HERE / "results") -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _units(model: str) -> int:
    """A zoo model's 2L blocks, for the footnotes."""
    return 2 * ZOO[model].layers


def _rows(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _table(runs: list[Run]) -> str:
    results = [{**load_results(result_path(r)), **({"method_label": r.label} if r.label else {})}
               for r in runs if result_path(r).is_file()]
    return results_table(results, stderr=True) if results else "_not run yet_"


def calibration_table() -> str:
    """Each method on each calibration set, its default-data run (from the other tables) first, rows named by data."""
    rows = [_find(SMOL, "dense-l250")]
    for default, label in (("ig16-b15-l250", "IG-Pruning (N=16)"), ("sleb-b15-l250", "SLEB")):
        run = _find(SMOL, default)
        rows.append(dataclasses.replace(run, label=f"{label}, {run.calibration}"))
        rows += [r for r in RUNS if r.table == "calibration" and r.method == run.method]
    return _table(rows)


def table(model: str, dense: str, name: str, blocks: list[int] | None = None) -> str:
    """The dense row, then every run of that table (at those block counts) in RUNS order."""
    chosen = [r for r in RUNS if r.model == model and r.table == name and (blocks is None or r.blocks in blocks)]
    return _table([_find(model, dense), *chosen])


def routing(model: str, name: str) -> str:
    path = result_path(_find(model, name))
    if not path.is_file():
        return "_not run yet_"
    result = load_results(path)
    n = result["n_clusters"]
    rows = []
    for task, counts in result["routing"].items():
        cells = [str(counts.get(str(k), counts.get(k, 0))) for k in range(n)]
        rows.append([task, *cells, str(sum(1 for c in cells if c != "0"))])
    return _rows(["Task", *(str(k) for k in range(n)), "clusters used"], rows)


def costs() -> str:
    """Wall time of each step that has run: making the bundle, and evaluating it, with the torch threads of each."""
    rows = []
    for run in RUNS:
        if not result_path(run).is_file():
            continue
        results = load_results(result_path(run))
        provenance = results["provenance"]
        # every task found in the result cache: the same mask was evaluated before (e.g. by another method)
        evaluated = "cached" if all(t.get("cached") for t in results["tasks"].values()) else \
            f"{provenance['seconds']['total'] / 60:.1f}"
        bundle = {} if run.bundle else _bundle_config(run)  # a reused bundle's cost is in its own run's row
        config = bundle.get("benchmark", {})
        load = config.get("load_average")
        made = f"{run.bundle}'s" if run.bundle else f"{_bundle_seconds(bundle) / 60:.1f}"
        if run.extends:  # a continued search: its own minutes, after the run it continued
            made += f" after {run.extends}'s"
        rows.append([run.model, run.name, made, str(config.get("torch_threads", "–")),
                     evaluated, str(provenance["machine"].get("torch_threads", "–")),
                     f"{load:.1f}" if load is not None else "–"])
    return _rows(["Model", "Run", "Bundle (min)", "Threads", "Eval (min)", "Threads",
                  "Load avg while making the bundle"], rows)


def _bundle_config(run: Run) -> dict[str, Any]:
    path = bundle_dir(run) / "bundle.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _bundle_seconds(config: dict[str, Any]) -> float:
    """Wall time of making a bundle; for a fit resumed across processes, at least its summed step times."""
    steps = sum(config.get("logs", {}).get("train", {}).get("seconds", []))
    return max(config.get("benchmark", {}).get("seconds", 0.0), steps)


def make_figures() -> str:
    FIGURES.mkdir(exist_ok=True)
    done = [r for r in RUNS if r.model == SMOL and result_path(r).is_file()]
    lines = []
    # one point per method and sparsity (no variants such as the first fit, nor the same mask again at another
    # limit), relative to dense at its limit
    sweep = [load_results(result_path(r)) for r in done
             if r.table in ("table1", "dense", "granularity") and not r.label and not r.bundle]
    if len(sweep) > 1:
        lines.append(_figure(partial(figures.accuracy_vs_sparsity, relative=True), sweep, "accuracy_vs_sparsity.png",
                             "Accuracy relative to dense against sparsity for each method and granularity "
                             "(paper Figure 3)"))
    clusters = [load_results(result_path(r)) for r in done if r.table == "clusters"]  # all at limit 250
    if len(clusters) > 1:
        lines.append(_figure(figures.accuracy_vs_clusters, clusters, "accuracy_vs_clusters.png",
                             "Average accuracy against the number of clusters at 15 of 60 blocks (paper Figure 5)"))
    for model, name, suffix, what in [(SMOL, "ig16-b15", "", "smollm2-135m, 15 of 60 blocks"),
                                      (QWEN, "ig16-b12", "_qwen", "qwen2.5-0.5b, 12 of 48 blocks")]:
        ig16, stem = bundle_dir(_find(model, name)), name.replace("-", "_") + suffix
        if (ig16 / "bundle.json").is_file():
            lines.append(_figure(figures.mask_heatmap, ig16, f"heatmap_{stem}.png",
                                 f"Masks of the N = 16 bundle, {what} (paper Figure 4)"))
            lines.append(_figure(figures.learning_curve, ig16, f"curve_{stem}.png",
                                 "Mask-training learning curve of that bundle"))
    return "\n\n".join(lines) or "_no figures yet_"


def _figure(plot: Callable, data: Any, name: str, caption: str) -> str:
    plot(data, FIGURES / name)
    return f"![{caption}](figures/{name})\n\n*{caption}.*"


def speed() -> str:
    """bench-speed: wall-clock speedups beside the FLOPs-ideal ones (benchmarks/speed.py)."""
    report = _json("speed_smollm2-135m.json")
    if report is None:
        return "_not run yet_"
    rows = []
    for r in report["results"]:
        cells = [r["label"], r["kv_policy"]]
        for phase in ("prefill", "decode", "end_to_end"):
            p = r.get(phase)
            if p is None:
                cells.append("–")
                continue
            low, high = p["speedup_range"]
            ideal = f" (ideal {p['flops_speedup']:.2f})" if "flops_speedup" in p else ""
            cells.append(f"{p['tokens_per_s']:.1f} tok/s, {p['speedup']:.2f}× [{low:.2f}, {high:.2f}]{ideal}")
        rows.append(cells)
    s, m = report["settings"], report["machine"]
    masks = (report["order"]["description"] if "order" in report else
             "for each bundle, the mask its router picks for the prompt (cluster in brackets), "
             "and routing times its own encoder")
    return (_rows(["Mask", "K/V of skipped attention", "Prefill", "Decode", "End to end (routing included)"], rows)
            + f"\n\n{s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens, batch {s['batch_size']}, "
            f"median of {s['repeats']} repeats, {s['threads']} thread, load average {m['load_average'][0]:.1f} "
            f"({m['utc']}); [min, max] of the per-repeat ratios. Masks: {masks}.")


def routing_overhead() -> str:
    """Encoder prefix length against routing cost and agreement (benchmarks/routing_overhead.py)."""
    report = _json("routing_overhead.json")
    if report is None:
        return "_not run yet_"
    agree = report["agreement"]
    rows = [[k, f"{c['percent_of_prefill']:.1f}%", f"{c['flops_percent_of_prefill']:.1f}%",
             *(f"{agree[src][k]['agreement'] * 100:.0f}%" for src in agree)] for k, c in report["cost"].items()]
    return _rows(["Encoder tokens", "Time, % of prefill", "FLOPs, % of prefill",
                  *(f"Same cluster as 256 tokens: {src}" for src in agree)], rows)


def baseline_cost() -> str:
    """Search time of each static method at 15 of 60 blocks (research/baseline-cost/baseline_cost.py)."""
    report = _json("baseline_cost.json", RESEARCH / "baseline-cost" / "results")
    if report is None:
        return "_not run yet_"
    rows = [[name, f"{r['seconds'] / 60:.1f}", f"{r['calibration']['tokens']}", str(r["masks_scored"]),
             f"{r['heldout_ppl']:.1f}", f"{r['attn_off']} / {r['ffn_off']}"] for name, r in report["runs"].items()]
    dense = report["setup"]["dense_heldout_ppl"]
    return (_rows(["Method", "Minutes", "Calibration tokens", "Masks scored", "Held-out wiki perplexity",
                   "Attention / FFN off"], rows) + f"\n\nDense held-out perplexity {dense:.1f}.")


def held_out_perplexity(blocks: int, tables: tuple[str, ...], also: tuple[str, ...] = ()) -> str:
    """Perplexity on held-out text, per IG-Pruning cluster, of dense, the masks at `blocks` skipped blocks
    shown in `tables` and the runs `also` (benchmarks/perplexity.py); bold: the best static mask on each cluster."""
    report = _json("headline_perplexity.json")
    if report is None:
        return "_not run yet_"
    chosen = {"dense", *also} | {r.bundle or r.name for r in RUNS  # a reused bundle is scored under its own run
                                 if r.model == SMOL and r.blocks == blocks and r.table in tables}
    runs = {r.name: report["runs"][r.name] for r in RUNS if r.name in chosen and r.name in report["runs"]}
    static = {r.name for r in RUNS if r.method not in ("dense", "ig-pruning")}
    header = ["Cluster", "Passages", *runs]
    rows = [["all", str(report["passages"]), *(f"{r['perplexity']:.1f}" for r in runs.values())]]
    for k, n in report["cluster_passages"].items():
        cells = [float(r["per_cluster"][k]) for r in runs.values()]
        best_static = min((c for name, c in zip(runs, cells, strict=True) if name in static), default=None)
        rows.append([k, str(n), *(f"**{c:.1f}**" if c == best_static else f"{c:.1f}" for c in cells)])
    return (_rows(header, rows) + f"\n\n{report['model']}, {report['passages']} held-out {report['data']} passages "
            f"(first {report['seq_len']} tokens of each), each assigned to a cluster by the {report['router']} "
            "router; bold: the best static mask on that cluster's passages.")


DOMAIN_LABELS = {"code": "code", "math": "maths", "wiki": "wiki", "tiny": "stories", "multilingual": "non-English",
                 "qa": "QA (SciQ)"}


def _pm(cell: list[float], digits: int = 1) -> str:
    return f"{cell[0]:.{digits}f} ± {cell[1]:.{digits}f}"


def _lower(diff: dict[str, float]) -> str:
    return f"{diff['lower_percent']:+.1f} ± {diff['stderr_percent']:.1f}"


def domain_matrix(blocks: int, model: str = SMOL) -> str:
    """Held-out perplexity of every static and per-domain mask on every domain (benchmarks/domains.py score)."""
    report = _json(f"domains/{model}/score-b{blocks}.json")
    if report is None:
        return "_not run yet_"
    domains = report["domains"]
    header = ["Mask", *(DOMAIN_LABELS[d] for d in domains), "all"]
    rows = []
    for label, cells in report["matrix"].items():
        own = label.replace(" ", "-").rsplit("-", 1)[-1]  # "mask of code", "sleb-8x128-texts-code": code
        name = f"**{label}**" if label == report["best_static"] else label
        rows.append([name, *(f"**{cells[d][0]:.1f}**" if d == own else f"{cells[d][0]:.1f}" for d in domains),
                     f"{report['overall'][label][0]:.1f}" if label in report["overall"] else "–"])
    n = report["passages"]
    return (_rows(header, rows) + f"\n\n{report['model']}, {blocks} of {_units(model)} blocks skipped; held-out "
            f"passages per domain: {', '.join(f'{DOMAIN_LABELS[d]} {n[d]}' for d in domains)}, first "
            f"{report['heldout']['seq_len']} tokens of each. Bold row: the best global static mask overall; bold "
            "cells: a domain's own mask on its own text (the diagonal).")


def domain_gains(blocks: int, model: str = SMOL) -> str:
    """The ceiling (each domain under its own mask) and every IG bundle, routed and oracle, against the best
    static mask: perplexity overall and how much lower than the static mask's, per domain (paired stderr)."""
    report = _json(f"domains/{model}/score-b{blocks}.json")
    if report is None:
        return "_not run yet_"
    domains = report["domains"]
    best = report["best_static"]
    rows = [[f"best static ({best})", "1", _pm(report["overall"][best]), "0", *("0" for _ in domains)]]

    def row(label: str, masks: str, entry: dict[str, Any]) -> list[str]:
        lower = entry["lower_than_best_static"]
        return [label, masks, _pm(entry["overall"]), _lower(lower["overall"]),
                *(_lower(lower[d]) if d in lower else "–" for d in domains)]

    if "ceiling" in report:
        rows.append(row("ceiling: each domain's own SLEB mask, 4 x 64 tokens", str(len(domains)), report["ceiling"]))
    for key in (key for key in report if key.startswith("ceiling_8x128")):  # domains.py wide, each variant
        found = len(report[key]["per_domain"])
        rows.append(row(f"ceiling: each domain's own SLEB mask, {_wide_label(key)}", str(found), report[key]))
    if "ceiling_chosen" in report:
        entry = report["ceiling_chosen"]
        rows.append(row(f"ceiling: per domain the best of the {entry['candidates']} masks found, chosen on its other "
                        "passages", str(len({m for pair in entry["chosen"].values() for m in pair})), entry))
    for run, b in report["bundles"].items():
        masks = f"{b['distinct_masks']} of {b['clusters']}"
        rows.append(row(f"{run} ({b['finder']}), routed", masks, b["routed"]))
        rows.append(row(f"{run} ({b['finder']}), oracle", masks, b["oracle"]))
    return (_rows(["Masks", "Distinct masks", "Perplexity", "% lower: all", *(DOMAIN_LABELS[d] for d in domains)],
                  rows) + "\n\n% lower: how much lower the perplexity is than the best static mask's on the same "
            "passages, ± a paired standard error over passages; negative is worse. Routed: each passage under the "
            "mask its own text routes to; oracle: under the best of the bundle's cluster masks for that passage.")


def _wide_label(key: str) -> str:
    """How a wide search's ceiling key reads: ceiling_8x128_texts_p0 is "8 x 128 tokens, texts, from the dense
    model (no shared prefix)"."""
    words = {"texts": "texts", "kl": "by KL", "p0": "from the dense model (no shared prefix)"}
    return ", ".join(["8 x 128 tokens", *(words.get(part, f"from the first {part[1:]} global units")
                                          for part in key.split("_")[2:])])


def domain_gold(blocks: int, model: str = SMOL) -> str:
    """Bits per byte of held-out GSM8K and MBPP reference solutions given their prompts (domains.py gold)."""
    report = _json(f"domains/{model}/gold-report-b{blocks}.json")
    if report is None:
        return "_not run yet_"
    tasks, best = list(report["records"]), report["best_static"]
    rows = [[f"**{label}**" if label == best else label, *(_pm(cells[t], 3) for t in tasks), _pm(cells["overall"], 3),
             ""] for label, cells in report["bpb"].items()]
    for run, b in report["bundles"].items():
        for kind in ("routed", "oracle"):
            entry = b[kind]
            rows.append([f"{run}, {kind}", *(_bits(entry, t) for t in tasks),
                         _pm(entry["bpb"], 3), _lower(entry["lower_than_best_static"]["overall"])])
    n = report["records"]
    return (_rows(["Mask", *(f"{t} bpb" for t in tasks), "all bpb", "% lower per-byte perplexity"], rows)
            + f"\n\n{report['model']}, {blocks} of {_units(model)} blocks skipped; held-out records: "
            f"{', '.join(f'{t} {k}' for t, k in n.items())} (prompt and solution at most "
            f"{report['settings']['max_tokens']} tokens). Only the solution is scored, given the prompt; each "
            "record is routed by its prompt. Bold: the best static mask. % lower: of 2^bpb against the best static "
            "mask, ± a paired standard error over records.")


def domain_fragments(blocks: int) -> str:
    """Which mask wins on the same held-out documents cut short or long and joined with EOS (domains.py fragments)."""
    report = _json(f"domains/{SMOL}/fragments-b{blocks}.json")
    if report is None:
        return "_not run yet_"
    rows = []
    for d, cuts in report["domains"].items():
        labels = list(cuts["fragments"])
        rows.append([DOMAIN_LABELS[d], labels[2].removeprefix("ig-sleb-n6-wide "),
                     *(f"{cuts[cut][label]:.1f}" for cut in ("fragments", "passages") for label in labels)])
    return _rows(["Domain", "routed to", "fragments: global", "own 8x128", "cluster", "passages: global",
                  "own 8x128", "cluster"], rows)


def _bits(entry: dict[str, Any], task: str) -> str:
    """A bundle's bpb on one task, from its per-byte perplexity."""
    ppl, se = entry["per_domain"][task]
    return f"{math.log2(ppl):.3f} ± {se / ppl / math.log(2):.3f}"


def domain_search_tokens(blocks: int) -> str:
    """Each domain's own mask against the best static mask on the tokens its search scored and on held-out text."""
    report = _json(f"domains/{SMOL}/score-b{blocks}.json")
    if report is None or "searched_tokens" not in report:
        return "_not run yet_"
    best = report["best_static"]
    rows = [[DOMAIN_LABELS[d], f"{v['own']:.1f}", f"{v['best_static']:.1f}",
             f"{report['matrix'][f'mask of {d}'][d][0]:.1f}", f"{report['matrix'][best][d][0]:.1f}"]
            for d, v in report["searched_tokens"].items()]
    return _rows(["Domain", "own mask, searched tokens", f"{best}, searched tokens", "own mask, held-out",
                  f"{best}, held-out"], rows)


def domain_routing(blocks: int, model: str = SMOL) -> str:
    """Which cluster each domain's held-out passages route to, per IG bundle."""
    report = _json(f"domains/{model}/score-b{blocks}.json")
    if report is None or not report["bundles"]:
        return "_not run yet_"
    parts = []
    for run, b in report["bundles"].items():
        rows = [[DOMAIN_LABELS[d], ", ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda x: -x[1]))]
                for d, counts in b["routing"].items()]
        parts.append(f"{run} ({b['clusters']} clusters, {b['distinct_masks']} distinct masks):\n\n"
                     + _rows(["Domain", "cluster: passages"], rows))
    return "\n\n".join(parts)


def domain_tasks(blocks: int, model: str = SMOL) -> str:
    """The domain benchmark's fits on the paper's six tasks beside the headline runs at the same limit."""
    return results_table(_domain_task_results(blocks, model), stderr=True)


def _domain_task_results(blocks: int, model: str = SMOL) -> list[dict[str, Any]]:
    """Dense, the headline's fits and static masks at the model's task limit, then every domain fit's results."""
    from domains import RUN_NAMES, task_limit

    limit = task_limit(model)
    names = [f"{m}-b{blocks}{tail}" for m in ("ig16", *STATIC) for tail in ("", f"-l{limit}")]
    runs = [r for r in RUNS if r.model == model and r.limit == limit and result_path(r).is_file()  # same limit
            and (r.method == "dense" or r.name in [*names, f"sleb-b{blocks}-mixed"])]
    results = [{**load_results(result_path(r)), **({"method_label": r.label} if r.label else {})} for r in runs]
    for run in RUN_NAMES:
        path = HERE / "results" / "domains" / model / f"paper6-{run}-b{blocks}.json"
        if path.is_file():
            results.append({**load_results(path), "method_label": f"IG-Pruning, {run} (domains pool)", "run": run})
    return results


def domain_cloze(blocks: int, model: str = SMOL) -> str:
    """Dense, every static mask and the IG fits on the six domain cloze tasks (`domains.py tasks --suite domains6`),
    each against the best static mask by per-document pairs, then where each IG fit routes each task's documents."""
    from domains import RUN_NAMES, STATIC

    folder = HERE / "results" / "domains" / model
    static = [p.format(blocks=blocks) for p in STATIC]
    paths = [("Dense", folder / "domains6-dense.json")]
    paths += [(run, folder / f"domains6-{run}.json") for run in static]
    paths.append((None, folder / f"domains6-ig16-b{blocks}.json"))
    paths += [(f"IG-Pruning, {run}", folder / f"domains6-{run}-b{blocks}.json") for run in RUN_NAMES]
    paths.append((None, folder / f"domains6-own-texts-p0-b{blocks}.json"))  # labelled in the file
    results = [{**load_results(path), **({"method_label": label} if label else {})} for label, path in paths
               if path.is_file()]
    if len(results) < 2:
        return "_not run yet_"
    routing = [[method_label(r), *(" ".join(f"{k}:{v}" for k, v in (r["routing"].get(t) or {}).items())
                                   for t in r["tasks"])] for r in results if r.get("routing")]
    tasks = [DOMAIN_LABELS[t.removeprefix("cloze_")] for t in results[0]["tasks"]]
    return "\n\n".join([results_table(results, stderr=True), _versus_best_static(results, static),
                        "Documents per cluster, routed by their context:", _rows(["Bundle", *tasks], routing)])


def _versus_best_static(results: list[dict[str, Any]], static: list[str]) -> str:
    """Every pruned configuration against the static mask with the highest average, by per-document pairs (the
    same documents under both), and the best configuration per domain picked on these very documents: an
    optimistic bound on any routing that gives each domain one of the measured masks."""
    dense = next(r for r in results if r["method"] == "dense")
    best = max((r for r in results if r.get("method_label") in static), key=lambda r: r["average"])  # named by run
    pruned = [r for r in results if r is not dense]
    picked = {t: max(pruned, key=lambda r, t=t: r["tasks"][t]["value"]) for t in dense["tasks"]}
    bound = sum(r["tasks"][t]["value"] for t, r in picked.items()) / len(picked)
    return (f"Against the static mask with the highest average here ({method_label(best)}), paired by document:\n\n"
            + gains_table(results, best)
            + "\n\nThe best measured configuration per domain, picked on these documents ("
            + ", ".join(f"{DOMAIN_LABELS[t.removeprefix('cloze_')]}: {method_label(r)}" for t, r in picked.items())
            + f"), averages {bound:.2f}, {100 * bound / dense['average']:.2f}% of dense: "
            + f"{100 * (bound - best['average']) / dense['average']:+.2f} over {method_label(best)}."
            + _picked_on_other_half(pruned, best, dense))


def _picked_on_other_half(pruned: list[dict[str, Any]], best: dict[str, Any], dense: dict[str, Any]) -> str:
    """The same bound with each domain's configuration picked on half its documents and scored on the other half,
    which no configuration's luck on the scored documents inflates (`picked_per_task_gain`)."""
    scored = [r for r in pruned if has_items(r)]
    if best not in scored or len(scored) < 2:
        return ""
    gain, stderr = (100 * x / dense["average"] for x in picked_per_task_gain(scored, best, repeats=PICK_REPEATS))
    return (f" Picked instead on half of each domain's documents and scored on the other half ({PICK_REPEATS} "
            f"seeded splits, among the {len(scored)} configurations with per-document scores): {gain:+.2f} ± "
            f"{stderr:.2f} points of dense, paired.")


def domain_margin(runs: tuple[str, ...] = ("ig-sleb-n6-texts-pool", "ig-sleb-n6-texts-pool-m3",
                                           "ig-sleb-n6-texts-pool-m3-64", "ig-sleb-n7-texts64-p0-pool-m3",
                                           "ig-sleb-n7-texts64-p0-domains-m3",
                                           "ig-sleb-n7-texts64-p0-domains-m3-128x64",
                                           "ig-sleb-n7-texts64-p0-domains-auto-fresh",
                                           "ig-sleb-n7-texts64-p0-domains-auto-unscored",
                                           "ig-global-n8-texts-requests-auto",
                                           "ig-global-n8-texts-requests-auto-256",
                                           "ig-global-n8-texts-requests-auto-responses",
                                           "ig-global-n8-texts-requests-prefixed-auto-responses")) -> str:
    """One choice recipe per row at every block count: held-out gain, its worst domain, the GSM8K/MBPP solutions
    and the six tasks against the best static method there, all routed."""
    rows = []
    for blocks in (8, 15, 22):
        score, gold = _json(f"domains/{SMOL}/score-b{blocks}.json"), _json(f"domains/{SMOL}/gold-report-b{blocks}.json")
        tasks = _domain_task_results(blocks)
        dense = next(r["average"] for r in tasks if r["method"] == "dense")
        best = max((r for r in tasks if r["method"] not in ("dense", "ig-pruning")), key=lambda r: r["average"])
        best_label = method_label(best)
        ours = {r["run"]: r for r in tasks if "run" in r}
        for run in runs:
            if score is None or run not in score["bundles"] or run not in ours:
                continue
            lower = score["bundles"][run]["routed"]["lower_than_best_static"]
            worst = min(score["domains"], key=lambda d: lower[d]["lower_percent"])
            rows.append([str(blocks), run, _lower(lower["overall"]),
                         f"{DOMAIN_LABELS[worst]} {_lower(lower[worst])}",
                         _lower(gold["bundles"][run]["routed"]["lower_than_best_static"]["overall"]),
                         _lower(gold["bundles"][run]["routed"]["lower_than_best_static"]["mbpp"]),
                         f"{100 * ours[run]['average'] / dense:.2f}%",
                         f"{100 * best['average'] / dense:.2f}% ({best_label})"])
    return (_rows(["Blocks", "Choice", "% lower held-out perplexity", "worst domain", "% lower GSM8K/MBPP",
                   "of which MBPP", "six tasks, % of dense", "best static on the six tasks"], rows)
            + "\n\nAll routed; % lower against the best static mask on held-out perplexity (each block count's "
            "domain-gains table), ± a paired stderr. Six tasks at limit 250 (each count's domain-tasks table).")


def six_task_floor() -> str:
    """The default fit (the headline's L0 fits) and every domain fit with per-document scores on the six tasks
    against the best static method there, at every limit both ran, paired by document: whether the gain on the
    domains costs anything where the paper measures, and, for a fit whose clusters default to the global mask,
    how much of a difference routing adds to that mask."""
    from domains import CHOSEN, GATED, GLOBAL, RUN_NAMES

    rows = []
    for blocks in (8, 15, 22):
        default = [(r.name, result_path(r)) for r in RUNS if r.model == SMOL and r.method == "ig-pruning"
                   and r.blocks == blocks and r.name in (f"ig16-b{blocks}", f"ig16-b{blocks}-l{r.limit}")]
        domain = [(run, path) for run in RUN_NAMES
                  for path in sorted((HERE / "results" / "domains" / SMOL).glob(f"paper6-{run}-b{blocks}*.json"))]
        for run, path in default + domain:
            fit = load_results(path) if path.is_file() else None
            if fit is None or not has_items(fit):
                continue
            same = [r for r in RUNS if r.model == SMOL and r.limit == fit["limit"] and result_path(r).is_file()]
            dense = load_results(result_path(next(r for r in same if r.method == "dense")))
            static = {r.bundle or r.name: {**load_results(result_path(r)), "run": r.name} for r in same
                      if r.blocks == blocks and r.method not in ("dense", "ig-pruning")}  # keyed by the mask
            best = max(static.values(), key=lambda r: r["average"])
            with_global = run in GATED or CHOSEN.get(run, {}).get("global")
            own = static.get(GLOBAL.format(blocks=blocks)) if with_global else None
            rows.append([str(blocks), str(fit["limit"]), run if run in RUN_NAMES else f"{run} (default)",
                         f"{100 * fit['average'] / dense['average']:.2f}%",
                         f"{best['run']}, {100 * best['average'] / dense['average']:.2f}%",
                         _paired_points(fit, best, dense), gain_by_cluster_cell(fit, best),
                         _paired_points(fit, own, dense) if own else "–"])
    return (_rows(["Blocks", "Documents per task", "Fit", "Fit, % of dense", "Best static there, % of dense",
                   "Fit minus best static, points of dense (paired)", "Net documents by cluster",
                   "Fit minus its global mask (paired)"], rows)
            + "\n\nsmollm2-135m. The static masks are the headline's at the same limit (`run.py headline`); the default "
            "rows are the headline's own IG-Pruning fits (`igprune fit` as shipped: L0, 16 clusters of the mixed "
            "pool), the others the domain fits' runs `run.py domains tasks --blocks B [--limit 500]`; fits whose results "
            "predate per-document scores are left out. Paired: the mean per-document difference and its stderr, task "
            "by task, as `igprune table FIT --against STATIC`. Net documents by cluster: how many more documents of "
            "all six tasks the fit gets right than the best static mask, per cluster they route to "
            "(`results.gain_by_cluster`; clusters with a net of 0 left out, – where the results predate "
            "per-document clusters). Its global mask: sleb-bB-mixed, which every cluster of a domain fit keeps "
            "unless its text clearly asks for another, so this column is what routing adds or costs.")


def _paired_points(fit: dict[str, Any], reference: dict[str, Any], dense: dict[str, Any]) -> str:
    """The fit's paired gain over `reference` in points of dense, or – where either lacks per-document scores."""
    try:
        gain, stderr = (100 * x / dense["average"] for x in paired_gain(fit, reference))
    except IGPruneError:
        return "–"
    return f"{gain:+.2f} ± {stderr:.2f}"


def radius_gate() -> str:
    """The radius gate replayed from per-document results (research/domain-benchmark/radius_gate.py), one row per
    quantile."""
    report = _json("radius-gate.json", RESEARCH / "domain-benchmark" / "results")
    if report is None:
        return "_not run yet_"

    def gain(cells: list[float] | None) -> str:
        return "–" if cells is None else f"{cells[0]:+.2f} ± {cells[1]:.2f} ({cells[2]})"

    rows = []
    for run in report["runs"]:
        sets = [run["tasks"].get(key, {}) for key in ("paper6-l250", "paper6-l500", "domains6")]
        for q in ["none", *map(str, report["quantiles"])]:
            held = run["heldout"].get(q)
            rows.append([str(run["blocks"]), run["fit"], "no gate" if q == "none" else q,
                         *(gain(cells.get(q)) for cells in sets),
                         "–" if held is None else f"{_lower(held['overall'])} ({held['moved']})"])
    return (_rows(["Blocks", "Fit", "Gate quantile", "Six tasks, 250 (moved)", "Six tasks, 500 (moved)",
                   "Domain cloze (moved)", "% lower held-out perplexity (moved)"], rows)
            + "\n\nsmollm2-135m. Each cell against the global mask (sleb-bB-mixed), paired: the six tasks and the "
            "domain cloze tasks in points of dense, held-out perplexity in percent lower; in brackets, how many "
            "documents or passages the gate sends to the global mask (only those routed to a cluster that left it "
            "count: the others run the global mask anyway).")


def cluster_phase() -> str:
    """Cluster-phase recipes from the same shared mask, per cluster (research/cluster-phase/cluster_phase.py)."""
    folder = RESEARCH / "cluster-phase"
    sys.path.insert(0, str(folder))
    from cluster_phase import RECIPES

    reports = {name: _json(f"{name}.json", folder / "results") for name in RECIPES}
    reports = {name: r for name, r in reports.items() if r is not None}
    if "shared" not in reports:
        return "_not run yet_"
    base = reports.pop("shared")
    shared = base["per_cluster"]
    rows = [["shared (static L0)", "–", "–", f"{base['perplexity']:.1f}", "–", "–"]]
    for name, r in reports.items():
        better = sum(v < shared[k] - 0.05 for k, v in r["per_cluster"].items())
        worse = sum(v > shared[k] + 0.05 for k, v in r["per_cluster"].items())
        rows.append([name, str(r["updates"]), f"{r['fit_seconds'] / 60:.1f}", f"{r['perplexity']:.1f}",
                     str(sum(1 for c in r["blocks_changed"] if c)), f"{better} / {worse}"])
    return _rows(["Recipe", "Updates", "Minutes", "Held-out perplexity", "Masks changed",
                  "Clusters better / worse than shared"], rows)


def fit_budget() -> str:
    """Gate learning rate against a CPU-sized budget (research/fit-budget/fit_budget.py)."""
    report = _json("fit_budget.json", RESEARCH / "fit-budget" / "results")
    if report is None:
        return "_not run yet_"
    rows = [[lr, str(report["steps"]), f"{r['seconds'] / 60:.1f}", f"{r['final_train_loss']:.2f}",
             f"{r['mask_perplexity']:.1f}"] for lr, r in report["runs"].items()]
    return (_rows(["Gate learning rate", "Steps", "Minutes", "Final training loss (sampled gates)",
                   "Held-out perplexity of the binarised mask"], rows)
            + f"\n\n{report['model']}, {report['blocks_skipped']} blocks off, batch {report['batch_size']} x "
            f"{report['seq_len']} tokens; dense held-out perplexity {report['dense_perplexity']:.1f}.")


BLOCKS: dict[str, Callable[[], str]] = {
    "table1-smollm2": lambda: table(SMOL, "dense", "table1", [8, 15]),
    "cluster-phase": cluster_phase,
    "table1-smollm2-b22": lambda: table(SMOL, "dense-l250", "table1", [22]),
    "table1-qwen": lambda: table(QWEN, "dense", "table1"),
    "clusters": lambda: table(SMOL, "dense-l250", "clusters"),
    "granularity": lambda: _table([_find(SMOL, "dense-l250"), _find(SMOL, "ig16-b15-l250"),
                                   *[r for r in RUNS if r.table == "granularity"]]),
    "calibration": calibration_table,
    "routing": lambda: routing(SMOL, "ig16-b15"),
    "routing-qwen": lambda: routing(QWEN, "ig16-b12"),
    "costs": costs,
    "speed": speed,
    "routing-overhead": routing_overhead,
    "baseline-cost": baseline_cost,
    "fit-budget": fit_budget,
    "perplexity": lambda: held_out_perplexity(15, ("table1", "clusters")),
    "perplexity-b8": lambda: held_out_perplexity(8, ("table1",)),
    "perplexity-b22": lambda: held_out_perplexity(22, ("table1",)),
    "perplexity-ablations": lambda: held_out_perplexity(15, ("granularity", "calibration"), also=("ig16-b15",)),
    "figures": make_figures,
    "domain-matrix-b15": lambda: domain_matrix(15),
    "domain-gains-b15": lambda: domain_gains(15),
    "domain-routing-b15": lambda: domain_routing(15),
    "domain-search-tokens-b15": lambda: domain_search_tokens(15),
    "domain-gold-b15": lambda: domain_gold(15),
    "domain-fragments-b15": lambda: domain_fragments(15),
    "domain-tasks-b15": lambda: domain_tasks(15),
    "domain-cloze-b15": lambda: domain_cloze(15),
    "domain-margin": domain_margin,
    "six-task-floor": six_task_floor,
    "radius-gate": radius_gate,
    **{f"domain-{part}-b{b}": partial(make, b) for b in (8, 22) for part, make in (
        ("matrix", domain_matrix), ("gains", domain_gains), ("routing", domain_routing), ("gold", domain_gold),
        ("tasks", domain_tasks), ("cloze", domain_cloze))},
    **{f"domain-{part}-qwen-b12": partial(make, 12, QWEN) for part, make in (
        ("matrix", domain_matrix), ("gains", domain_gains), ("routing", domain_routing), ("gold", domain_gold),
        ("tasks", domain_tasks), ("cloze", domain_cloze))},
}


def fill(path: Path, blocks: dict[str, Callable[[], str]]) -> None:
    """Replace each generated block the file has; the text around the blocks stays as written."""
    text = path.read_text()
    unknown = set(re.findall(r"<!-- begin:([\w-]+) -->", text)) - set(blocks)
    if unknown:
        print(f"{path}: no generator for block(s) {', '.join(sorted(unknown))}; left as they are")
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- begin:{name} -->\n).*?(<!-- end:{name} -->)", re.S)
        if not pattern.search(text):
            continue
        body = make()
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    path.write_text(text)
    print(f"wrote {path}")


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help says so
    for path in [REPORT, *sorted(RESEARCH.glob("*/LOG.md"))]:
        fill(path, BLOCKS)


if __name__ == "__main__":
    main()
