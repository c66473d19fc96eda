"""Figures: each kind is written as a valid, non-trivial PNG (Agg); bad input is a clear IGPruneError."""

import json

import matplotlib.image
import pytest
import torch
from tiny_models import bundle_config
from typer.testing import CliRunner

from igprune.bundle import Bundle
from igprune.cli import app
from igprune.evaluation import figures
from igprune.files import IGPruneError

TASKS = ["igprune_openbookqa", "igprune_winogrande", "igprune_hellaswag", "igprune_piqa", "igprune_arc_easy",
         "igprune_arc_challenge"]


def result(method, blocks, granularity="block", n_clusters=16, drop=0.0):
    """A fake evaluation result in the schema of `igprune eval` (fractions, as lm-eval reports them)."""
    tasks = {t: {"value": 0.6 - drop - 0.02 * i, "stderr": 0.01} for i, t in enumerate(TASKS)}
    return {"method": method, "model": "smollm2-135m", "n_clusters": n_clusters,
            "sparsity": {"blocks_skipped": blocks, "blocks_total": 60, "granularity": granularity},
            "average": sum(t["value"] for t in tasks.values()) / len(tasks), "tasks": tasks}


@pytest.fixture
def results_file(tmp_path):
    items = [result("dense", 0, None, None)]
    items += [result("ig-pruning", k, g, 16, k / 200 * (1 if g == "block" else 1.4))
              for k in (8, 15, 22) for g in ("block", "layer")]
    items += [result("ig-pruning", k, "block", n, k / 200 * (2 - n / 16)) for k in (8, 15, 22) for n in (4, 8)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(items))
    return path


@pytest.fixture
def bundle_dir(tmp_path):
    gen = torch.Generator().manual_seed(0)
    masks = torch.ones(4, 60, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(60, generator=gen)[:15]] = False
    steps = 30
    logs = {"train": {"phase": ["shared"] * 10 + ["cluster"] * 20, "loss": [3 - 0.02 * i for i in range(steps)],
                      "expected_sparsity": [0.25 * i / steps for i in range(steps)],
                      "target": [min(0.25, 0.05 * i) for i in range(steps)], "seconds": [1.5] * steps}}
    config = bundle_config(masks, model="smollm2-135m", cluster_sizes=[50, 30, 12, 8], train={"loss": "lm"})
    return Bundle(masks, torch.zeros(4, 8), config, logs=logs).save(tmp_path / "bundle")


def assert_png(path, min_pixels=300):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height >= min_pixels and width >= min_pixels


def test_each_figure_is_a_png(tmp_path, bundle_dir, results_file):
    results = figures.load_results([results_file])
    assert_png(figures.mask_heatmap(bundle_dir, tmp_path / "heatmap.png"))
    assert_png(figures.learning_curve(bundle_dir, tmp_path / "curve.png"))
    assert_png(figures.accuracy_vs_sparsity([r for r in results if r["n_clusters"] in (16, None)],
                                            tmp_path / "accuracy.png"))
    assert_png(figures.accuracy_vs_sparsity(results, tmp_path / "average.png", per_task=False))
    assert_png(figures.accuracy_vs_clusters(results, tmp_path / "clusters.png", method="ig-pruning"))


def test_relative_accuracy_puts_results_at_several_limits_on_one_axis(tmp_path, monkeypatch):
    """Each score is divided by the dense score at its own limit; absolute accuracy refuses mixed limits."""
    def at(limit, item):
        return {**item, "limit": limit}

    dense500, dense250 = at(500, result("dense", 0, None, None)), at(250, result("dense", 0, None, None, drop=0.1))
    pruned = [at(500, result("sleb", 15, n_clusters=None, drop=0.06)),
              at(250, result("sleb", 22, n_clusters=None, drop=0.15))]
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, out: drawn.setdefault("fig", fig) and out)
    figures.accuracy_vs_sparsity([dense500, dense250, *pruned], tmp_path / "r.png", per_task=False, relative=True)
    line = next(c for c in drawn["fig"].axes[0].containers if c.get_label() == "sleb (block)").lines[0]
    expected = [100.0, 100 * pruned[0]["average"] / dense500["average"],
                100 * pruned[1]["average"] / dense250["average"]]
    assert line.get_ydata().tolist() == pytest.approx(expected)
    with pytest.raises(IGPruneError, match="several limits"):
        figures.accuracy_vs_sparsity([dense500, dense250, *pruned], tmp_path / "a.png")
    with pytest.raises(IGPruneError, match="needs a dense result at each limit; none at limit 250"):
        figures.accuracy_vs_sparsity([dense500, *pruned], tmp_path / "a.png", relative=True)


def test_speed_chart_is_a_png(tmp_path):
    def entry(label, policy, mask, speed):
        phase = {"speedup": speed, "speedup_range": [speed - 0.05, speed + 0.05], "flops_speedup": speed + 0.1}
        return {"label": label, "kv_policy": policy, "mask": mask, "prefill": phase, "decode": phase,
                "end_to_end": phase}
    report = {"model": "smollm2-135m", "settings": {"prompt_tokens": 512, "new_tokens": 128, "batch_size": 1,
                                                    "repeats": 5},
              "machine": {"torch_threads": 1, "cpu": "test cpu"},
              "results": [entry("dense", "keep", None, 1.0)] + [entry(f"{k}/60", p, [1] * 60, 1 + k / 60)
                                                                 for k in (8, 15) for p in ("keep", "drop")]}
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(report))
    assert_png(figures.speed_chart(path, tmp_path / "speed.png"))


def test_cli_plot_commands(tmp_path, bundle_dir, results_file):
    runner = CliRunner()
    for args in (["heatmap", "--bundle", str(bundle_dir)], ["curve", "--bundle", str(bundle_dir)],
                 ["clusters", str(results_file), "--method", "ig-pruning"]):
        out = tmp_path / f"{args[0]}.png"
        done = runner.invoke(app, ["plot", *args, "--out", str(out)])
        assert done.exit_code == 0, done.output
        assert_png(out)


def test_bad_input_is_a_clear_error(tmp_path, bundle_dir, results_file):
    with pytest.raises(IGPruneError, match="not found"):
        figures.mask_heatmap(tmp_path / "missing", tmp_path / "x.png")
    with pytest.raises(IGPruneError, match="no results given"):
        figures.load_results([])
    with pytest.raises(IGPruneError, match="cannot read"):
        figures.load_results([tmp_path / "missing.json"])
    (tmp_path / "bad.json").write_text(json.dumps({"method": "x"}))
    with pytest.raises(IGPruneError, match="not a results file"):
        figures.load_results([tmp_path / "bad.json"])
    results = figures.load_results([results_file])
    with pytest.raises(IGPruneError, match="two results"):  # N=4, 8 and 16 at one sparsity, one line each only
        figures.accuracy_vs_clusters(results + results, tmp_path / "x.png")
    with pytest.raises(IGPruneError, match="no pruned results"):
        figures.accuracy_vs_sparsity([r for r in results if r["method"] == "dense"], tmp_path / "x.png")
    with pytest.raises(IGPruneError, match=r"\.png"):
        figures.mask_heatmap(bundle_dir, tmp_path / "x.pdf")
    untrained = Bundle(torch.ones(1, 60, dtype=torch.bool), torch.zeros(1, 0),
                       bundle_config(torch.ones(1, 60, dtype=torch.bool)))
    with pytest.raises(IGPruneError, match="no training log"):
        figures.learning_curve(untrained.save(tmp_path / "static"), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
