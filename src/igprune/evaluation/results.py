"""Results as files: what every results file records, where results are cached, and the paper's table.

A results file is one JSON object (format FORMAT) for one model configuration: "kind" is "accuracy"
(`igprune eval`) or "perplexity" (`igprune ppl`), plus what was evaluated (model, method, sparsity,
n_clusters), the numbers, and provenance (versions, seed, machine, date, wall time). Files are written
atomically. The cache (<cache>/results/) keeps one small JSON file per configuration and task, named by a
hash of everything that decides the result, so a second identical run, or an interrupted benchmark run
again, only computes what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igprune.distributed import main_writes
from igprune.files import IGPruneError, cache_root, read_json, write_json

if TYPE_CHECKING:  # torch and transformers load only when a model is involved: `igprune table` stays fast
    from transformers import PreTrainedModel

    from igprune.bundle import Bundle

FORMAT = "igprune-results/1"

# Table columns, task (short name) -> header, in order: the paper's Table 1, then the domain cloze tasks.
COLUMNS = {"openbookqa": "OBQA", "winogrande": "WG", "hellaswag": "HS", "piqa": "PIQA", "arc_easy": "ARC-E",
           "arc_challenge": "ARC-C", "cloze_code": "code", "cloze_math": "maths", "cloze_wiki": "wiki",
           "cloze_tiny": "stories", "cloze_multilingual": "non-English", "cloze_qa": "QA (SciQ)", "mbpp": "MBPP",
           "gsm8k": "GSM8K", "humaneval": "HumanEval"}
METHOD_NAMES = {"dense": "Dense", "sleb": "SLEB", "shortened-ppl": "ShortenedLlama (PPL)",
                "shortened-taylor": "ShortenedLlama (Taylor)", "evopress": "EvoPress", "static-l0": "Static L0",
                "ig-pruning": "IG-Pruning"}


# ------------------------------------------------------------------------------------------- provenance


@cache
def versions() -> dict[str, str]:
    """Versions of the packages that decide a result."""
    out = {}
    for package in ("igprune", "lm_eval", "transformers", "torch"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def _git_commit() -> str | None:
    """The igprune checkout's commit (with "+dirty" for local changes), or None outside a git checkout."""
    where = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(seed: int, device: str, dtype: str) -> dict[str, Any]:
    """Versions, seed, machine and date, for a results file."""
    import torch

    return {
        "versions": dict(versions()),
        "igprune_git": _git_commit(),
        "seed": seed,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": device, "dtype": dtype},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def config_hash(data: Any) -> str:
    """sha256 of a JSON-able value, independent of key order."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def router_identity(bundle: Bundle) -> dict[str, Any]:
    """What decides which cluster an input goes to: the centroids, the encoder that embeds it, and a gate's radii."""
    identity = {"centroids": bundle.centroids.float().tolist(), "encoder": bundle.config.get("encoder"),
                "encoder_tokens": bundle.config.get("encoder_tokens")}
    return identity if bundle.radii is None else {**identity, "radii": bundle.radii.float().tolist()}


# ---------------------------------------------------------------------------------------- configuration


@dataclass
class Configuration:
    """What is evaluated: a model, dense or pruned by a bundle (checked against the model on load)."""

    model: PreTrainedModel
    bundle: Bundle | None = None
    bundle_path: str | None = None

    @classmethod
    def load(cls, model: PreTrainedModel, bundle: Bundle | str | Path | None = None) -> Configuration:
        from igprune.bundle import as_bundle

        path = None
        if bundle is not None:
            bundle, path = as_bundle(bundle)
            bundle.check_model(model, path or "")
        return cls(model, bundle, path)

    @property
    def dynamic(self) -> bool:
        return self.bundle is not None and not self.bundle.static

    @property
    def content_sha256(self) -> str | None:
        """Hash of exactly what changes predictions: masks (a gate's fallback too), centroids, encoder and radii;
        None when dense."""
        if self.bundle is None:
            return None
        return config_hash({"masks": self.bundle.route_masks.bool().tolist(), **router_identity(self.bundle)})

    def describe(self) -> dict[str, Any]:
        """model, method, sparsity and n_clusters, as results files record them."""
        from igprune.blocks import num_blocks
        from igprune.bundle import fingerprint

        name = self.model.name_or_path or fingerprint(self.model)["architecture"]
        if self.bundle is None:
            return {"model": name, "method": "dense", "n_clusters": None,
                    "sparsity": {"blocks_skipped": 0, "blocks_total": num_blocks(self.model), "granularity": None}}
        cfg, masks = self.bundle.config, self.bundle.masks
        return {"model": name, "method": cfg.get("method", "unknown"), "n_clusters": self.bundle.n_clusters,
                "sparsity": {"blocks_skipped": int((~masks[0]).sum()), "blocks_total": masks.shape[1],
                             "granularity": cfg.get("granularity"), "target": cfg.get("sparsity")}}

    def identity(self) -> dict[str, Any] | None:
        """The bundle's path and hashes, for provenance; None when dense."""
        if self.bundle is None:
            return None
        return {"path": self.bundle_path, "config_sha256": config_hash(self.bundle.config),
                "content_sha256": self.content_sha256}


# ------------------------------------------------------------------------------------------------ files


def save_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write a results file atomically."""
    path = Path(path)
    write_json(path, {"format": FORMAT, **{k: v for k, v in results.items() if k != "format"}})
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        results = read_json(path)
    except FileNotFoundError:
        raise IGPruneError(f"no results file {path}") from None
    except ValueError as err:
        raise IGPruneError(f"{path} is not valid JSON ({err}); write it again with `igprune eval`") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise IGPruneError(f"{path} is not an igprune results file (format {FORMAT})")
    return results


# ------------------------------------------------------------------------------------------------ cache


class ResultCache:
    """One JSON file per key under `folder`; the key itself is stored too, and checked on every read."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else cache_root() / "results"

    def path(self, key: dict[str, Any]) -> Path:
        return self.folder / f"{config_hash(key)[:24]}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        path = self.path(key)
        try:
            stored = read_json(path)
        except (OSError, ValueError):
            return None
        # A different stored key (hash collision or hand edit) is a miss, never a wrong answer.
        return stored.get("value") if stored.get("key") == json.loads(json.dumps(key, default=str)) else None

    def put(self, key: dict[str, Any], value: dict[str, Any]) -> None:
        with main_writes() as write:  # under torchrun every rank holds the same value
            if write:
                write_json(self.path(key), {"key": key, "value": value})


# ------------------------------------------------------------------------------------------- comparison


def task_average(tasks: dict[str, dict[str, Any]]) -> tuple[float, float | None]:
    """The mean of the tasks' values and its stderr, the tasks taken as independent (None if one has none)."""
    values, errors = [t["value"] for t in tasks.values()], [t["stderr"] for t in tasks.values()]
    stderr = None if None in errors else sum(e * e for e in errors) ** 0.5 / len(errors)
    return sum(values) / len(values), stderr


def paired_gain(result: dict[str, Any], reference: dict[str, Any]) -> tuple[float, float]:
    """`result`'s average minus `reference`'s, in points, and the stderr of that difference from per-document
    pairs. Both ran on the same documents, so what makes a document hard cancels; where two configurations agree
    on most documents the paired error is a fraction of the two unpaired errors together."""
    ours, theirs = _items(result, reference), _items(reference, reference)
    return _paired({task: [100.0 * (x - y) for x, y in zip(a, theirs[task], strict=True)]
                    for task, a in ours.items()})


def gain_by_cluster(result: dict[str, Any], reference: dict[str, Any]) -> dict[int, tuple[int, float]]:
    """Where a routed `result`'s difference from `reference` comes from: for each of its clusters, the documents
    routed there (all tasks together) and how many more of them it gets right (score differences summed)."""
    ours, theirs = _items(result, reference), _items(reference, reference)
    by_cluster: dict[int, list[float]] = {}
    for task, a in ours.items():
        clusters = result["tasks"][task].get("clusters")
        if clusters is None or len(clusters) != len(a):
            raise IGPruneError(f"{task} has no per-document clusters in the routed results; evaluate the bundle "
                               "again with this igprune, which records them")
        for cluster, x, y in zip(clusters, a, theirs[task], strict=True):
            count = by_cluster.setdefault(cluster, [0, 0.0])
            count[0] += 1
            count[1] += x - y
    return {cluster: (int(n), net) for cluster, (n, net) in sorted(by_cluster.items())}


def gain_by_cluster_cell(result: dict[str, Any], reference: dict[str, Any]) -> str:
    """`gain_by_cluster` as one table cell: "cluster: net of documents" for each cluster whose net is not 0
    ("none" where no cluster's is), or "–" for a result without per-document clusters (a static mask's, or one
    evaluated before they were recorded)."""
    try:
        counts = gain_by_cluster(result, reference)
    except IGPruneError:
        return "–"
    return ", ".join(f"{c}: {net:+.0f} of {n}" for c, (n, net) in counts.items() if net) or "none"


def picked_per_task_gain(results: list[dict[str, Any]], reference: dict[str, Any], repeats: int = 100,
                         seed: int = 0) -> tuple[float, float]:
    """What giving each task whichever of `results` (or `reference`) scores best on it gains over `reference`,
    in points, with the pick made on one half of the task's documents and scored on the other half (two-fold;
    the mean gain and mean paired stderr over `repeats` seeded splits; ties keep `reference`).

    Picking on the scored documents themselves credits a configuration with its luck on them, the more so the
    more configurations there are; this does not, so it is an honest ceiling for any routing by task among them."""
    theirs = _items(reference, reference)
    candidates = [theirs, *(_items(r, reference) for r in results if r is not reference)]
    rng = random.Random(seed)
    gains, stderrs = [], []
    for _ in range(repeats):
        differences = {}
        for task, ref in theirs.items():
            order = rng.sample(range(len(ref)), len(ref))
            halves = (order[: len(ref) // 2], order[len(ref) // 2:])
            diff = [0.0] * len(ref)
            for picked_on, scored_on in (halves, halves[::-1]):
                best = max(candidates, key=lambda c, task=task, on=picked_on: sum(c[task][i] for i in on))
                for i in scored_on:
                    diff[i] = 100.0 * (best[task][i] - ref[i])
            differences[task] = diff
        gain, stderr = _paired(differences)
        gains.append(gain)
        stderrs.append(stderr)
    return sum(gains) / repeats, sum(stderrs) / repeats


def has_items(result: dict[str, Any]) -> bool:
    """Whether every task of `result` kept its per-document scores (results from before they were kept did not)."""
    return all("items" in t for t in result["tasks"].values())


def _items(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, list[float]]:
    """`result`'s per-document scores by task, refused unless they pair with `reference`'s one to one."""
    if set(result["tasks"]) != set(reference["tasks"]):
        raise IGPruneError(f"the results cover tasks {sorted(result['tasks'])} and {sorted(reference['tasks'])}; "
                           "compare results on the same tasks")
    items = {}
    for task, entry in result["tasks"].items():
        a, b = entry.get("items"), reference["tasks"][task].get("items")
        if a is None or b is None:
            raise IGPruneError(f"{task} has no per-document scores in one of the results; evaluate it again "
                               "with this igprune, which records them")
        if len(a) != len(b) or len(a) < 2:
            raise IGPruneError(f"{task} was scored on {len(a)} and {len(b)} documents; compare results with the "
                               "same limit")
        items[task] = a
    return items


def _paired(differences: dict[str, list[float]]) -> tuple[float, float]:
    """The average over tasks of the mean per-document difference, and its stderr (tasks weigh alike, as in the
    task average)."""
    means, variances = [], []
    for d in differences.values():
        mean = sum(d) / len(d)
        means.append(mean)
        variances.append(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return sum(means) / len(means), sum(variances) ** 0.5 / len(means)


def percentage(result: dict[str, Any], dense: dict[str, Any]) -> float | None:
    """The paper's last column: a result's average as a percent of the dense model's, on the same tasks; None
    when the dense average is 0 (a tiny or broken model), of which no percentage means anything.

    Refuses a dense result for another model, limit or task set, where the ratio would mean nothing.
    """
    if dense.get("method") != "dense":
        raise IGPruneError(f"the reference result is {dense.get('method')!r}, not a dense model")
    for key in ("model", "limit"):
        if result.get(key) != dense.get(key):
            raise IGPruneError(f"the dense result has {key} {dense.get(key)!r} but this one {result.get(key)!r}; "
                               "evaluate the dense model with the same settings")
    if set(result["tasks"]) != set(dense["tasks"]):
        raise IGPruneError(f"the dense result covers tasks {sorted(dense['tasks'])}, this one "
                           f"{sorted(result['tasks'])}; evaluate both on the same tasks")
    return 100.0 * result["average"] / dense["average"] if dense["average"] else None


def method_label(result: dict[str, Any]) -> str:
    """A results row's name: its `method_label` if set, else the method's with N and a non-default granularity."""
    if result.get("method_label"):
        return result["method_label"]
    label = METHOD_NAMES.get(result["method"], result["method"])
    details = [f"N={result['n_clusters']}"] if result["method"] == "ig-pruning" and result.get("n_clusters") else []
    if result["sparsity"].get("granularity") == "layer":  # block granularity is the paper's default
        details.append("layer")
    return label + (f" ({', '.join(details)})" if details else "")


def _sparsity_label(result: dict[str, Any]) -> str:
    s = result["sparsity"]
    return f"{100 * s['blocks_skipped'] / s['blocks_total']:.1f}%"


def _cell(entry: dict[str, Any], stderr: bool) -> str:
    if stderr and entry.get("stderr") is not None:
        return f"{entry['value']:.2f} ± {entry['stderr']:.2f}"
    return f"{entry['value']:.2f}"


def gains_table(results: list[dict[str, Any]], reference: dict[str, Any], by_cluster: bool = False) -> str:
    """A Markdown table of each result's gain over `reference`, paired by document (`paired_gain`): in points of
    the average, in percent of the dense average where a dense result is among `results`, and with `by_cluster`
    the routed results' net documents per cluster (`gain_by_cluster_cell`). A result from before per-document
    scores were recorded gets "–"."""
    dense = next((r for r in results if r["method"] == "dense"), None)
    head = (["Configuration", "Gain in average (points)"] + (["Gain in percentage of dense"] if dense else [])
            + (["Net documents by cluster"] if by_cluster else []))
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        if r is reference or r is dense:
            continue
        if not (has_items(r) and has_items(reference)):
            cells = ["–"] * (len(head) - 1)
        else:
            gain, stderr = paired_gain(r, reference)
            cells = [f"{gain:+.2f} ± {stderr:.2f}"]
            if dense:
                scale = 100 / dense["average"] if dense["average"] else None
                cells.append(f"{scale * gain:+.2f} ± {scale * stderr:.2f}" if scale else "–")
            if by_cluster:
                cells.append(gain_by_cluster_cell(r, reference))
        lines.append("| " + " | ".join([method_label(r), *cells]) + " |")
    return "\n".join(lines)


def results_table(results: list[dict[str, Any]], stderr: bool = False) -> str:
    """A Markdown table in the layout of the paper's Table 1, rows ordered by sparsity (input order within one).

    A result's `method_label`, if set, names its row. Task cells are the paper's metric in percent (with its
    standard error when `stderr`); a sparsity is printed once per group, as in the paper; a Model column is
    added when the results cover more than one model. A result without a percentage of dense gets one from
    the table's dense row of the same model and limit, if there is one.
    """
    if not results:
        raise IGPruneError("no results to tabulate")
    for r in results:
        if r.get("kind") != "accuracy":
            raise IGPruneError(f"only accuracy results go in the table, not {r.get('kind')!r} ({r.get('model')})")
    many_models = len({r["model"] for r in results}) > 1
    columns = [t for t in COLUMNS if any(t in r["tasks"] for r in results)]
    head = (["Model"] if many_models else []) + ["Sparsity", "Method", *(COLUMNS[t] for t in columns), "Average",
                                                 "Percentage"]
    rows = sorted(results, key=lambda r: (r["model"], r["sparsity"]["blocks_skipped"] / r["sparsity"]["blocks_total"])
                  if many_models else r["sparsity"]["blocks_skipped"] / r["sparsity"]["blocks_total"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    dense = {(r["model"], r.get("limit")): r for r in results if r["method"] == "dense"}
    previous = None
    for r in rows:
        group = (r["model"], _sparsity_label(r))
        cells = ([r["model"] if previous is None or previous[0] != group[0] else ""] if many_models else [])
        cells.append(group[1] if group != previous else "")
        cells.append(method_label(r))
        cells += [_cell(r["tasks"][t], stderr) if t in r["tasks"] else "–" for t in columns]
        cells.append(_cell({"value": r["average"], "stderr": r.get("average_stderr")}, stderr))
        pct = r.get("percentage")
        if pct is None and (r["model"], r.get("limit")) in dense:
            pct = percentage(r, dense[r["model"], r.get("limit")])
        cells.append(f"{pct:.2f}%" if pct is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
        previous = group
    return "\n".join(lines)
