"""The paper's figures as PNGs (matplotlib Figure objects, no pyplot: no display needed, and the process's
backend is left as it is).

    mask_heatmap       clusters x layers, FFN panel above attention (paper Figure 4), from a bundle
    accuracy_vs_sparsity  average (and per-task) accuracy against sparsity, one line per method and
                       granularity (paper Figure 3), from results JSON files
    accuracy_vs_clusters  average accuracy per number of clusters, grouped by sparsity (paper Figure 5)
    learning_curve     mask training: loss, expected vs target sparsity, seconds per step, from a bundle
    speed_chart        measured speedups beside FLOPs-ideal ones, from an `igprune bench-speed` report

A results file holds one result or a list of them, each
{"method", "sparsity": {"blocks_skipped", "blocks_total", "granularity"}, "n_clusters", "average",
 "tasks": {task: {"value", "stderr"}}} and optionally "model". Accuracies given as fractions are shown in %.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from igprune.bundle import Bundle, as_bundle
from igprune.files import IGPruneError, atomic_path

RUN, SKIP = "#1f4e9c", "#f2c230"  # the paper's colours: 1 = blue (run), 0 = yellow (skipped)
DPI = 130


def _save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise IGPruneError(f"figures are PNG files; give a path ending in .png, not {out.name}")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    return out


def _subplots(*grid: int, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """pyplot.subplots without pyplot: a Figure saved through its own Agg canvas, no global state."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def _bundle(bundle: str | Path | Bundle) -> tuple[Bundle, str]:
    if not isinstance(bundle, Bundle) and not Path(bundle).exists():
        raise IGPruneError(f"bundle {bundle} not found; give a folder made by `igprune fit` or `igprune baseline`")
    loaded, where = as_bundle(bundle)
    return loaded, Path(where).name if where else "bundle"


def _model_name(model: str | None) -> str:
    return Path(model).name if model else "model not recorded"


def mask_heatmap(bundle: str | Path | Bundle, out: str | Path) -> Path:
    """Paper Figure 4: each cluster's mask over the layers, FFN blocks above, attention blocks below."""
    loaded, name = _bundle(bundle)
    masks = loaded.masks.to(int).numpy()  # (N, 2L), 1 = run
    n, layers = masks.shape[0], masks.shape[1] // 2
    cfg = loaded.config
    sizes = cfg.get("cluster_sizes")
    labels = [f"{k}  (n={sizes[k]})" if sizes and len(sizes) == n else str(k) for k in range(n)]
    height = max(1.2, 0.28 * n + 0.9)
    fig, axes = _subplots(2, 1, figsize=(max(7.0, 0.26 * layers + 2.5), 2 * height + 1.2), sharex=True)
    cmap = ListedColormap([SKIP, RUN])
    for ax, (title, part) in zip(axes, (("FFN blocks", masks[:, 1::2]), ("attention blocks", masks[:, 0::2])),
                                 strict=True):
        ax.imshow(part, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(0, layers, max(1, layers // 15)))
        ax.set_yticks(range(n), labels, fontsize=8 if n <= 16 else 6)
        ax.set_xticks([x - 0.5 for x in range(layers + 1)], minor=True)  # cell borders
        ax.set_yticks([y - 0.5 for y in range(n + 1)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
        skipped = int((part == 0).sum())
        ax.set_title(f"{title}: {skipped} of {part.size} skipped", fontsize=10)
        ax.set_ylabel("cluster (calibration texts)" if sizes else "cluster")
    axes[1].set_xlabel("layer")
    total, off = masks.shape[1], cfg.get("blocks_skipped", int((masks[0] == 0).sum()))
    clusters = f"N={n} clusters" if n > 1 else "one static mask"
    fig.suptitle(f"{_model_name(cfg.get('model'))}: {cfg.get('method', 'masks')} ({name}), {clusters}, "
                 f"{off}/{total} blocks skipped ({100 * off / total:.1f}% sparsity)", fontsize=11)
    fig.legend(handles=[Patch(color=RUN, label="1 = block runs"), Patch(color=SKIP, label="0 = block skipped")],
               loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    return _save(fig, out)


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Results from JSON files (each one result or a list), checked against the schema; "_file" is added."""
    if not paths:
        raise IGPruneError("no results given; pass one or more results JSON files made by `igprune eval`")
    results = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise IGPruneError(f"cannot read results file {path}: {err}") from err
        for item in data if isinstance(data, list) else [data]:
            missing = [k for k in ("method", "sparsity", "average") if not isinstance(item, dict) or k not in item]
            if missing or not {"blocks_skipped", "blocks_total"} <= set(item["sparsity"]):
                raise IGPruneError(f"{path} is not a results file: needs method, sparsity.blocks_skipped, "
                                   "sparsity.blocks_total and average")
            results.append({**item, "_file": str(path)})
    if not results:
        raise IGPruneError("the results files hold no results")
    return results


def _scale(results: Sequence[dict[str, Any]]) -> float:
    """100 when accuracies are fractions (lm-eval's), else 1."""
    values = [r["average"] for r in results] + [t["value"] for r in results for t in r.get("tasks", {}).values()]
    return 100.0 if all(abs(v) <= 1.0 for v in values) else 1.0


def _average_stderr(result: dict[str, Any]) -> float:
    """The stderr of the task mean, tasks taken as independent; 0 when unknown."""
    if "average_stderr" in result:
        return float(result["average_stderr"])
    errors = [t.get("stderr") for t in result.get("tasks", {}).values()]
    if not errors or any(e is None or (isinstance(e, float) and math.isnan(e)) for e in errors):
        return 0.0
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def _sparsity_percent(result: dict[str, Any]) -> float:
    return 100 * result["sparsity"]["blocks_skipped"] / result["sparsity"]["blocks_total"]


def _is_dense(result: dict[str, Any]) -> bool:
    return result["method"] == "dense" or result["sparsity"]["blocks_skipped"] == 0


def _models(results: Sequence[dict[str, Any]], model: str | None) -> str:
    """The model name(s) for a title, with the items per task when the results were limited."""
    name = model or ", ".join(sorted({_model_name(r.get("model")) for r in results}))
    limits = {r.get("limit") for r in results}
    return name + (f" ({' / '.join(map(str, sorted(limits)))} items per task)" if None not in limits else "")


def _origin(result: dict[str, Any]) -> str:
    """Where a result came from, for error messages: its file, when it was read from one."""
    return result.get("_file", "a result passed in memory")


def _line_key(result: dict[str, Any], vary_clusters: bool) -> str:
    parts = [result["method"]]
    if vary_clusters and result.get("n_clusters"):
        parts.append(f"N={result['n_clusters']}")
    granularity = result["sparsity"].get("granularity")
    return " ".join(parts) + (f" ({granularity})" if granularity else "")


def accuracy_vs_sparsity(results: Sequence[dict[str, Any]], out: str | Path, model: str | None = None,
                         per_task: bool = True, relative: bool = False) -> Path:
    """Paper Figure 3: accuracy against sparsity, one line per method (and granularity, and N when a method
    has several); dense is each line's 0% point. Per-task panels follow the average when tasks are given.

    relative: each score as a percentage of the dense score at the same limit (the paper's Percentage
    column), so that results evaluated on different numbers of documents share one axis.
    """
    scale = _scale(results)
    dense = [r for r in results if _is_dense(r)]
    pruned = [r for r in results if not _is_dense(r)]
    if not pruned:
        raise IGPruneError("no pruned results to plot (all are dense); pass results at some sparsity")
    dense_at = {r.get("limit"): r for r in dense}
    limits = {r.get("limit") for r in results}
    if relative and (missing := {r.get("limit") for r in pruned} - dense_at.keys()):
        raise IGPruneError(f"relative accuracy needs a dense result at each limit; none at limit "
                           f"{', '.join(map(str, missing))}")
    if not relative and len(limits) > 1:
        raise IGPruneError(f"results at several limits ({', '.join(sorted(map(str, limits)))}) do not share an "
                           "accuracy axis; plot them relative to dense (--relative) or pass one limit")
    clusters = defaultdict(set)
    for r in pruned:
        clusters[r["method"]].add(r.get("n_clusters"))
    lines: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
    for r in pruned:
        key, x = _line_key(r, len(clusters[r["method"]]) > 1), _sparsity_percent(r)
        if x in lines[key]:
            raise IGPruneError(f"two results for {key} at {x:.1f}% sparsity ({_origin(lines[key][x])}, "
                               f"{_origin(r)}); pass one of them")
        lines[key][x] = r
    tasks = list(dict.fromkeys(t for r in results for t in r.get("tasks", {}))) if per_task else []
    panels = ["average", *tasks]
    cols = min(len(panels), 4 if len(panels) > 4 else len(panels))
    rows = math.ceil(len(panels) / cols)
    size = (4.2 * cols, 3.4 * rows) if len(panels) > 1 else (7.0, 4.8)
    fig, axes = _subplots(rows, cols, figsize=size, squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        def value(r: dict[str, Any], panel: str = panel, raw: bool = not relative) -> tuple[float, float] | None:
            if panel == "average":
                score = scale * r["average"], scale * _average_stderr(r)
            else:
                task = r.get("tasks", {}).get(panel)
                score = (scale * task["value"], scale * (task.get("stderr") or 0.0)) if task else None
            if raw or score is None:
                return score
            base = value(dense_at[r.get("limit")], panel, raw=True)
            return (100 * score[0] / base[0], 100 * score[1] / base[0]) if base and base[0] else None

        for key, points in sorted(lines.items()):
            pts = sorted((x, value(r)) for x, r in points.items() if value(r) is not None)
            if dense and value(dense[0]) is not None:
                pts.insert(0, (0.0, value(dense[0])))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o",
                            markersize=4, capsize=3, label=key)
        if dense and value(dense[0]) is not None:
            ax.axhline(value(dense[0])[0], color="grey", linestyle=":", linewidth=1, label="dense")
        ax.set_title("average of tasks" if panel == "average" else panel.removeprefix("igprune_"), fontsize=10)
        ax.set_xlabel("sparsity (% of blocks skipped)")
        ax.set_ylabel("% of dense accuracy" if relative else "accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    bottom = 0.0
    if len(panels) == 1:
        axes.flat[0].legend(fontsize=9, loc="best")
    elif len(panels) < rows * cols:  # the legend takes the first empty panel
        axes.flat[len(panels)].legend(handles, labels, loc="center", fontsize=9, title="method (granularity)")
    else:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False)
        bottom = 0.12 if rows == 1 else 0.06
    what = "accuracy relative to dense at the same limit" if relative else "zero-shot accuracy"
    fig.suptitle(f"{_models(results, model)}: {what} vs sparsity (error bars: stderr)", fontsize=12)
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    return _save(fig, out)


def accuracy_vs_clusters(results: Sequence[dict[str, Any]], out: str | Path, model: str | None = None,
                         method: str | None = None, granularity: str | None = "block") -> Path:
    """Paper Figure 5: average accuracy for each number of clusters, bars grouped by sparsity.

    Only results of `method` (default: all) and `granularity` (default block, the paper's; None: all) are shown.
    """
    scale = _scale(results)
    dense = [r for r in results if _is_dense(r)]
    chosen = [r for r in results if not _is_dense(r) and r.get("n_clusters") and method in (None, r["method"])
              and granularity in (None, r["sparsity"].get("granularity", granularity))]
    if not chosen:
        raise IGPruneError(f"no pruned results with n_clusters (method {method or 'any'}, granularity "
                           f"{granularity or 'any'})")
    cells: dict[tuple[float, int], dict[str, Any]] = {}
    for r in chosen:
        key = (_sparsity_percent(r), int(r["n_clusters"]))
        if key in cells:
            raise IGPruneError(f"two results at {key[0]:.1f}% sparsity with N={key[1]} ({_origin(cells[key])}, "
                               f"{_origin(r)}); pass one, or choose a method or granularity")
        cells[key] = r
    sparsities = sorted({s for s, _ in cells})
    counts = sorted({n for _, n in cells})
    width = 0.8 / len(counts)
    fig, ax = _subplots(figsize=(max(5.5, 1.6 * len(sparsities) * max(1, len(counts) / 2)), 4.2))
    for j, n in enumerate(counts):
        xs = [i + (j - (len(counts) - 1) / 2) * width for i, s in enumerate(sparsities) if (s, n) in cells]
        rs = [cells[(s, n)] for s in sparsities if (s, n) in cells]
        ys = [scale * r["average"] for r in rs]
        bars = ax.bar(xs, ys, width * 0.95, yerr=[scale * _average_stderr(r) for r in rs], capsize=3,
                      label=f"N = {n} cluster{'s' if n != 1 else ''}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    if dense:
        ax.axhline(scale * dense[0]["average"], color="grey", linestyle=":", linewidth=1, label="dense")
    ax.set_xticks(range(len(sparsities)), [f"{s:.1f}%" for s in sparsities])
    ax.set_xlabel("sparsity (% of blocks skipped)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_ylim(0, 1.15 * max([scale * r["average"] for r in cells.values()] +
                              [scale * d["average"] for d in dense[:1]]))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(counts) + bool(dense),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    methods = ", ".join(sorted({r["method"] for r in chosen}))
    grains = ", ".join(sorted({r["sparsity"].get("granularity") or "?" for r in chosen}))
    ax.set_title(f"{_models(results, model)}: {methods} ({grains}), average accuracy by number of clusters\n"
                 "(error bars: stderr of the task mean)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def learning_curve(bundle: str | Path | Bundle, out: str | Path) -> Path:
    """Mask training per step: LM loss, expected vs target sparsity, and seconds per step, by phase."""
    loaded, name = _bundle(bundle)
    log = loaded.logs.get("train") or {}
    if not log.get("loss"):
        raise IGPruneError(f"bundle {name} has no training log (logs.train); only trained bundles have a curve")
    steps = list(range(1, len(log["loss"]) + 1))
    phases = log.get("phase") or ["train"] * len(steps)
    cfg = loaded.config
    fig, axes = _subplots(3, 1, figsize=(8, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1.3]})
    axes[0].plot(steps, log["loss"], color="#9bb7d4" if len(steps) >= 50 else "#1f4e9c", linewidth=0.8,
                 label="loss per step")
    window = len(steps) // 25
    if window > 1:
        axes[0].plot(steps, _moving_average(log["loss"], window), color="#1f4e9c",
                     label=f"moving average of {window} steps")
    axes[0].set_ylabel(f"{cfg.get('train', {}).get('loss', 'lm')} loss (nats/token)")
    axes[1].plot(steps, [100 * v for v in log["expected_sparsity"]], color="#c0392b", label="expected sparsity")
    axes[1].plot(steps, [100 * v for v in log["target"]], color="black", linestyle="--", label="target")
    if "blocks_skipped" in cfg and "blocks_total" in cfg:
        final = 100 * cfg["blocks_skipped"] / cfg["blocks_total"]
        axes[1].axhline(final, color="grey", linestyle=":", label=f"final binary masks ({final:.1f}%)")
    axes[1].set_ylabel("sparsity (%)")
    axes[2].plot(steps, log["seconds"], color="#555555", linewidth=0.8)
    axes[2].set_ylabel("seconds / step")
    axes[2].set_xlabel("training step")
    boundaries = [i + 1 for i in range(1, len(phases)) if phases[i] != phases[i - 1]]
    for ax in axes:
        for b in boundaries:
            ax.axvline(b - 0.5, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
    starts = [1, *boundaries]
    for start, end in zip(starts, [*boundaries, len(steps) + 1], strict=True):
        axes[0].text((start + end) / 2, 1.01, f"{phases[start - 1]} phase", transform=axes[0].get_xaxis_transform(),
                     ha="center", va="bottom", fontsize=8, color="#444444")
    axes[0].legend(fontsize=8, loc="best")
    axes[1].legend(fontsize=8, loc="best")
    total = sum(log["seconds"])
    fig.suptitle(f"{_model_name(cfg.get('model'))}: mask training of {name} ({cfg.get('method', '?')}, "
                 f"N={loaded.n_clusters}), {len(steps)} steps in {total / 60:.1f} min", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, out)


def speed_chart(report: dict[str, Any] | str | Path, out: str | Path) -> Path:
    """Measured speedup over dense (bars, min-max over repeats; diamonds: on CPU time) beside the FLOPs-ideal
    speedup (outlined), per configuration and KV policy, for prefill, decode and end to end (routing included)."""
    if not isinstance(report, dict):
        try:
            report = json.loads(Path(report).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise IGPruneError(f"cannot read speed report {report}: {err}") from err
    pruned = [r for r in report.get("results", []) if r.get("mask") is not None]
    if not pruned:
        raise IGPruneError("the speed report holds no pruned configurations")
    labels = list(dict.fromkeys(r["label"] for r in pruned))
    policies = list(dict.fromkeys(r["kv_policy"] for r in pruned))
    colours = {"keep": "#1f4e9c", "drop": "#e67e22"}
    s = report["settings"]
    phases = [("prefill", f"prefill ({s['prompt_tokens']} tokens)"), ("decode", f"decode ({s['new_tokens']} steps)"),
              ("end_to_end", "end to end (routing + prefill + decode)")]
    fig, axes = _subplots(1, 3, figsize=(max(11.0, 1.3 * len(labels) * len(policies) + 6), 4.4), sharey=True)
    width = 0.8 / len(policies)
    for ax, (phase, title) in zip(axes, phases, strict=True):
        for j, policy in enumerate(policies):
            rows = {r["label"]: r for r in pruned if r["kv_policy"] == policy}
            xs = [i + (j - (len(policies) - 1) / 2) * width for i, lab in enumerate(labels) if lab in rows]
            got = [rows[lab][phase] for lab in labels if lab in rows]
            ys = [g["speedup"] for g in got]
            err = [[y - g["speedup_range"][0] for y, g in zip(ys, got, strict=True)],
                   [g["speedup_range"][1] - y for y, g in zip(ys, got, strict=True)]]
            ax.bar(xs, ys, width * 0.9, yerr=err, capsize=3, color=colours.get(policy), alpha=0.85,
                   label=f"measured, kv {policy}")
            ax.bar(xs, [g["flops_speedup"] for g in got], width * 0.9, fill=False, edgecolor="black",
                   linestyle="--", linewidth=1.0, label="FLOPs-ideal (dashed outline)")
            if all("cpu_speedup" in g for g in got):
                ax.scatter(xs, [g["cpu_speedup"] for g in got], marker="D", s=14, color="black", zorder=3,
                           label="measured on CPU time")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(labels)), [lab.replace(" ", "\n", 1) for lab in labels], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("blocks skipped (configuration)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("speedup over dense (x)")
    handles, names = axes[0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), fontsize=8, frameon=False)
    m = report["machine"]
    load = f", load average {m['load_average'][0]:.1f}" if m.get("load_average") else ""
    fig.suptitle(f"{_model_name(report.get('model'))}: speedup over dense, batch {s['batch_size']}, "
                 f"{m['torch_threads']} thread(s), median of {s['repeats']} (error bars: min-max), {m['cpu']}{load}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.94))
    return _save(fig, out)
