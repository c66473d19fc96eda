"""The headline benchmark (paper Table 1 and its ablations): IG-Pruning against static pruning.

Every configuration is a run of configs/headline.yaml (configuration as data). For each one it makes the
bundle (IG-Pruning fit, or a static method's search) unless it already exists under
benchmarks/bundles/<model>/<run>/, then evaluates it on the paper's six tasks with igprune's lm-eval
harness and writes benchmarks/results/headline/<model>/<run>.json. Each step is cached, so an
interrupted benchmark resumes where it stopped, across sessions: fits and the long searches continue
from <run>.checkpoint beside the bundle, and per-task evaluation results are cached inside igprune's
own result cache. Runs are ordered by priority: the 25% comparison first.

    python benchmarks/run.py headline            # everything still missing, in priority order
    python benchmarks/run.py headline --list     # done, bundle (not evaluated), begun or todo
    python benchmarks/run.py headline --only ig16-b15,sleb-b15
    python benchmarks/run.py headline --only sleb-b22-mixed --bundles-only   # the mask now, its tasks later
    python benchmarks/report.py                  # then write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

if TYPE_CHECKING:
    from igprune.config import FitConfig

HERE = Path(__file__).parent
BUNDLES = HERE / "bundles"
RESULTS = HERE / "results" / "headline"
CONFIG = yaml.safe_load((HERE / "configs" / "headline.yaml").read_text())
SEED = CONFIG["seed"]
FIT = CONFIG["fit"]  # IG-Pruning's fit options; a run's own options override them
STATIC = CONFIG["static"]
OPTIONS = CONFIG["options"]  # each static method's search budget, by name


@dataclass(frozen=True)
class Run:
    """One row of configs/headline.yaml (its header says what each field means)."""

    name: str
    model: str
    method: str
    blocks: int = 0
    limit: int = 500
    clusters: int = 16
    granularity: str = "block"
    data: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    table: str = "table1"
    label: str | None = None
    bundle: str | None = None
    extends: str | None = None
    encoder: str | None = None
    recipe: str = "paper"

    @property
    def calibration(self) -> str:
        return self.data or ("mixed" if self.method in ("ig-pruning", "static-l0") else "wiki")


def _run(spec: dict[str, Any]) -> Run:
    options = spec.get("options", {})
    return Run(**{**spec, "options": OPTIONS[options] if isinstance(options, str) else options})


RUNS: list[Run] = [_run(spec) for spec in CONFIG["runs"]]


def bundle_dir(run: Run) -> Path:
    return BUNDLES / run.model / (run.bundle or run.name)


def checkpoint_dir(run: Run) -> Path:
    """Where an interrupted fit or search keeps its progress; a rerun continues from it."""
    path = bundle_dir(run)
    return path.with_name(path.name + ".checkpoint")


def result_path(run: Run) -> Path:
    return RESULTS / run.model / f"{run.name}.json"


def make_bundle(run: Run, model, tokenizer) -> Path:
    """Fit or search the run's mask, unless its bundle exists."""
    from igprune.bundle import Bundle
    from igprune.data import load_calibration
    from igprune.finders import find_mask, get_method, make_calibration
    from igprune.pruner import fit_bundle

    path = bundle_dir(run)
    if (path / "bundle.json").is_file():
        return path
    sparsity = run.blocks / (2 * model.config.num_hidden_layers)
    checkpoint = checkpoint_dir(run)
    started = time.perf_counter()
    if run.method == "ig-pruning":
        fit = {**FIT, **run.options}
        bundle = fit_bundle(model, tokenizer, fit_config_of(run, sparsity), checkpoint_dir=checkpoint,
                            shared_dir=shared_dir(run, fit))  # `igprune fit --recipe paper`
        bundle.config["calibration"].update(fit)
    else:
        texts = load_calibration(run.calibration, seed=SEED)
        options = dict(run.options)
        if run.extends:  # continue that search, which must have scored the same calibration sequences
            prior = Bundle.load(BUNDLES / run.model / run.extends)
            opts = get_method(run.method).options(options)
            ours = make_calibration(tokenizer, texts, opts["samples"], opts["seq_len"], SEED, run.calibration).info
            if any(ours.get(k) != v for k, v in prior.config["calibration"].items()):  # older bundles: no sha256
                raise SystemExit(f"{run.name}: {run.extends} searched other calibration data; remove `extends`")
            options["start"] = prior.logs["search"]["order"][: run.blocks]  # greedy: a shorter search is a prefix
        bundle = find_mask(run.method, model, tokenizer, texts, sparsity, run.granularity, seed=SEED,
                           source=run.calibration, checkpoint=checkpoint, **options)
    bundle.config["benchmark"] = {"run": run.name, "seconds": round(time.perf_counter() - started, 1),
                                  "load_average": os.getloadavg()[0], "torch_threads": torch.get_num_threads()}
    bundle.save(path)
    return path


def fit_config_of(run: Run, sparsity: float) -> FitConfig:
    """An IG-Pruning run's fit: the paper recipe with the headline's budget and the run's options, or another
    recipe as it is (`igprune fit --recipe NAME`)."""
    from igprune.pruner import fit_config

    changes: dict[str, Any] = {"clusters": {"encoder": run.encoder}} if run.encoder else {}
    if run.recipe != "paper":
        return fit_config(run.recipe, changes, sparsity=sparsity, seed=SEED)
    fit = {**FIT, **run.options}
    changes.update({"granularity": run.granularity, "data": {"source": run.calibration, "samples": fit["samples"]},
                    "l0": {k: v for k, v in fit.items() if k != "samples"}})
    return fit_config("paper", changes, n_clusters=run.clusters, sparsity=sparsity, seed=SEED)


def shared_dir(run: Run, fit: dict[str, Any]) -> Path:
    """Where IG-Pruning's shared phase is kept: fits that differ only in N (or the cluster phase) reuse it."""
    from igprune.evaluation.results import config_hash
    from igprune.finders.l0 import CLUSTER_PHASE

    digest = config_hash({k: v for k, v in fit.items() if k not in CLUSTER_PHASE})[:8]
    return BUNDLES / run.model / f"shared-{run.calibration}-{run.granularity}-b{run.blocks}-{digest}.checkpoint"


def execute(run: Run, loaded: dict, bundle_only: bool = False) -> None:
    from igprune import load_model
    from igprune.evaluation.benchmark import evaluate
    from igprune.evaluation.results import load_results, save_results

    if run.model not in loaded:
        loaded.clear()  # one model in memory at a time
        loaded[run.model] = load_model(run.model)
    model, tokenizer = loaded[run.model]
    bundle = None if run.method == "dense" else make_bundle(run, model, tokenizer)
    if bundle_only:
        print(f"{run.model} {run.name}: {bundle}", flush=True)
        return
    # the percentage column against the committed dense run at the same limit, not only a cached one
    dense = next((result_path(r) for r in RUNS if r.model == run.model and r.method == "dense"
                  and r.limit == run.limit and r is not run and result_path(r).is_file()), None)
    results = evaluate(model, tokenizer, bundle, tasks=["paper6"], limit=run.limit, seed=SEED,
                       dense=load_results(dense) if dense else None)
    results["benchmark_run"] = dataclasses.asdict(run)
    save_results(result_path(run), results)
    pct = results.get("percentage")
    print(f"{run.model} {run.name}: average {results['average']:.2f}"
          + (f", {pct:.2f}% of dense" if pct is not None else ""), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="run.py headline", description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated run names (model/name or name)")
    parser.add_argument("--model", help="only runs of this model")
    parser.add_argument("--list", action="store_true", help="show each run's state and exit")
    parser.add_argument("--threads", type=int, help="torch threads (a busy machine may prefer 1)")
    parser.add_argument("--bundles-only", action="store_true", help="make the bundles, evaluate nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    runs = [r for r in RUNS if (not only or r.name in only or f"{r.model}/{r.name}" in only)
            and (not args.model or r.model == args.model)]
    if args.list:
        for r in runs:
            state = ("done" if result_path(r).is_file() else "bundle" if (bundle_dir(r) / "bundle.json").is_file()
                     else "begun" if checkpoint_dir(r).is_dir() else "todo")
            print(f"{state:>6}  {r.model}/{r.name}  ({r.method}, {r.blocks} blocks, limit {r.limit})")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    loaded: dict = {}
    for run in runs:
        made = run.method == "dense" or (bundle_dir(run) / "bundle.json").is_file()
        if result_path(run).is_file() or (args.bundles_only and made):
            continue
        print(f"== {run.model}/{run.name}", flush=True)
        execute(run, loaded, args.bundles_only)

