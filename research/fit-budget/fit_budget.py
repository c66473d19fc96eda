"""How the gate learning rate decides what a CPU-sized mask-training budget achieves.

The paper trains its gates at learning rate 0.1 (Table 5) for far more steps than two CPU cores allow. With a
few dozen steps the hard-concrete gates barely leave their start (P(z = 1) is only about 0.4 there), so most
training forwards run with many residual branches scaled by random fractions, and the ranking of log_alpha
that binarisation reads is still mostly noise. This script fits one static L0 mask (N = 1, the shared phase
alone) per learning rate on the same data and budget and scores each binarised mask by held-out perplexity,
beside the dense model.

    python research/fit-budget/fit_budget.py             # writes results/fit_budget.json and .png here
    python research/fit-budget/fit_budget.py --lrs 0.1,0.5 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from igprune import load_model  # noqa: E402
from igprune.data import load_calibration  # noqa: E402
from igprune.evaluation.perplexity import perplexity  # noqa: E402
from igprune.files import write_json  # noqa: E402
from igprune.pruner import IGPruner  # noqa: E402

HERE = Path(__file__).parent
OUT = HERE / "results" / "fit_budget"
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lrs", default="0.1,0.5", help="comma-separated gate (and multiplier) learning rates")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--blocks", type=int, default=15, help="blocks to skip")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--ppl-passages", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    sparsity = args.blocks / (2 * model.config.num_hidden_layers)
    texts = load_calibration("mixed", max_chars=4 * args.seq_len, limit=args.samples, seed=SEED)
    score = {"source": "mixed", "seq_len": args.seq_len, "limit": args.ppl_passages, "seed": SEED, "progress": False}
    report = {"model": args.model, "blocks_skipped": args.blocks, "steps": args.steps, "samples": len(texts),
              "batch_size": args.batch_size, "seq_len": args.seq_len, "seed": SEED, "threads": args.threads,
              "load_average": os.getloadavg()[0],
              "dense_perplexity": perplexity(model, tokenizer, **score)["perplexity"], "runs": {}}
    fig, ax = plt.subplots(figsize=(7, 4))
    for lr in (float(x) for x in args.lrs.split(",")):
        train = {"shared_steps": args.steps, "cluster_steps": 0, "batch_size": args.batch_size,
                 "seq_len": args.seq_len, "lr": lr, "lagrangian_lr": lr}
        started = time.perf_counter()
        pruner = IGPruner(model, tokenizer, "paper", config={"l0": train}, n_clusters=1, sparsity=sparsity, seed=SEED)
        bundle = pruner.fit(texts).to_bundle()
        seconds = time.perf_counter() - started
        log = bundle.logs["train"]
        report["runs"][str(lr)] = {
            "seconds": round(seconds, 1), "final_train_loss": bundle.config["final_loss"],
            "final_expected_sparsity": log["expected_sparsity"][-1],
            "mask_perplexity": perplexity(model, tokenizer, bundle, **score)["perplexity"],
            "mask": bundle.masks[0].int().tolist(), "curve": log["loss"]}
        print(f"lr {lr}: train loss {bundle.config['final_loss']:.2f}, "
              f"held-out perplexity {report['runs'][str(lr)]['mask_perplexity']:.1f} "
              f"(dense {report['dense_perplexity']:.1f}), {seconds:.0f} s", flush=True)
        ax.plot(log["loss"], label=f"lr {lr}")
    ax.set(xlabel="step", ylabel="training LM loss (sampled gates)",
           title=f"{args.model}: static L0 at {args.blocks}/{2 * model.config.num_hidden_layers} blocks")
    ax.legend()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT.with_suffix(".png"), dpi=120, bbox_inches="tight")
    write_json(OUT.with_suffix(".json"), report)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))


if __name__ == "__main__":
    main()
