"""The GPU benchmark: the paper's fitting budget and bench-speed on one CUDA GPU, unattended, in under 10 minutes.

1. Fit at the paper's budget (IG-Pruning sec. 4.1: 16 clusters, 1,000 samples of 512 tokens per cluster) on the
   largest zoo model, qwen2.5-1.5b, in bf16: a shared phase of 125 steps of 16 samples, then 125 cluster steps of
   8 samples of every cluster (125 x 8 = 1,000 per cluster), the LM loss on every position. The calibration
   corpus holds fewer passages of up to 512 tokens than 16,000 (the count is recorded), so the trainer draws them
   with replacement, as it always does. Reported: wall time, peak GPU memory, the masks.
2. The CPU-budget fit (benchmarks/configs/headline.yaml `fit`: 200 + 64 steps of 64-token samples) of the same model, for
   comparison; then held-out perplexity (256 passages of 512 tokens) of dense, the paper-budget and the
   CPU-budget bundles, each passage under its routed cluster's mask.
3. bench-speed (run first, being quick; the report is written after each part): prefill (512 tokens) and
   decode (64 tokens) at batch 1 and 16, keep and drop KV policies, at 25% of the blocks skipped (canonical
   attention-first masks), beside the FLOPs-ideal speedups (the aim: prefill >= 90% of FLOPs-ideal at batch 16).

    python benchmarks/gpu.py                    # writes benchmarks/results/gpu.json
    torchrun --nproc_per_node 4 benchmarks/gpu.py --only fit    # the fits data-parallel over 4 GPUs

Without CUDA it stops at once with one line and exit status 1. Needs the model prepared beforehand
(`igprune prepare --model qwen2.5-1.5b`): the GPU machine may have no network.

A GPU machine that the weights cannot reach (no network, and too little room to carry 3 GB) still measures time
and memory, which do not depend on the weights' values:

    python benchmarks/gpu.py --make-kit .kit            # here: configs, tokenizers, calibration text; no weights
    IGPRUNE_HOME=.kit/home python benchmarks/gpu.py --random-weights .kit --out gpu-random.json   # there

builds the model and the encoder from the kit's configs with seeded random weights. Fit time, peak memory and
speed are then the real model's; masks and perplexity would not be a model's, so they are left out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
OUT = HERE / "results" / "gpu.json"
SEED = 0
PAPER_FIT = {"shared_steps": 125, "batch_size": 16, "cluster_steps": 125, "cluster_batch": 8, "seq_len": 512,
             "loss_positions": None}
CPU_FIT = {"shared_steps": 200, "batch_size": 16, "cluster_steps": 64, "cluster_batch": 1, "seq_len": 64}
CPU_SAMPLES = 4096  # configs/headline.yaml fit.samples
PARTS = ("speed", "fit")


def need_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                 "nothing was run")


def make_kit(model: str, encoder: str, kit: Path) -> None:
    """What a machine without the weights needs to build them at random: the model's and the encoder's folders
    without their weights, and the calibration text (as IGPRUNE_HOME's data)."""
    from igprune.data import FILE_SOURCES, calibration_path
    from igprune.encoder import encoder_path
    from igprune.models import model_source

    weights = shutil.ignore_patterns("*.safetensors", "*.bin", "*.gguf", "README.md", ".gitattributes")
    shutil.copytree(model_source(model), kit / "model", ignore=weights, dirs_exist_ok=True)
    shutil.copytree(encoder_path(encoder), kit / "encoder", ignore=weights, dirs_exist_ok=True)
    data = kit / "home" / "data" / "calibration"
    data.mkdir(parents=True, exist_ok=True)
    for source in FILE_SOURCES:
        if calibration_path(source).is_file():
            shutil.copy2(calibration_path(source), data / calibration_path(source).name)
    print(f"wrote {kit}: set IGPRUNE_HOME={kit / 'home'} and pass --random-weights {kit} on the GPU machine")


def with_random_weights(folder: Path, out: Path, dtype: torch.dtype, encoder: bool = False) -> str:
    """`folder` (a config and a tokenizer) with seeded random weights, saved to `out`: the real architecture's
    time and memory, not its outputs."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    shutil.copytree(folder, out, dirs_exist_ok=True)
    torch.manual_seed(SEED)
    auto = AutoModel if encoder else AutoModelForCausalLM
    auto.from_config(AutoConfig.from_pretrained(folder), dtype=dtype).save_pretrained(out)
    return str(out)


def fit(model: Any, tokenizer: Any, name: str, recipe: dict[str, Any], samples: int | None, clusters: int,
        sparsity: float, gradient_checkpointing: bool, encoder: str) -> tuple[Any, dict[str, Any]]:
    """One fit_bundle with its wall time and peak GPU memory."""
    from igprune.pruner import fit_bundle, fit_config

    config = fit_config("paper", {"data": {"samples": samples}, "clusters": {"encoder": encoder},
                                  "l0": {**recipe, "gradient_checkpointing": gradient_checkpointing}},
                        n_clusters=clusters, sparsity=sparsity, seed=SEED)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    bundle = fit_bundle(model, tokenizer, config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    report = {"name": name, "recipe": recipe, "gradient_checkpointing": gradient_checkpointing,
              "seconds": round(seconds, 1), "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "calibration": bundle.config["calibration"], "cluster_sizes": bundle.config["cluster_sizes"],
              "final_loss": bundle.config["final_loss"], "masks": bundle.masks.to(torch.int).tolist()}
    return bundle, report


def fits(args: argparse.Namespace) -> dict[str, Any]:
    from igprune import distributed
    from igprune.evaluation.perplexity import perplexity
    from igprune.models import load_model

    model, tokenizer = load_model(args.model)  # device and dtype auto: this rank's GPU, bf16
    out: dict[str, Any] = {"dtype": str(model.dtype).removeprefix("torch."),
                           "ranks": distributed.world_size(), "clusters": args.clusters, "sparsity": args.sparsity}
    paper, out["paper_budget"] = fit(model, tokenizer, "paper budget", PAPER_FIT, None, args.clusters,
                                     args.sparsity, args.gradient_checkpointing, args.encoder)
    out["fit_under_10_minutes"] = out["paper_budget"]["seconds"] < 600
    if args.random_weights:  # masks from random weights say nothing, and there is nothing to compare them with
        del out["paper_budget"]["masks"], out["paper_budget"]["final_loss"]
        return out
    cpu, out["cpu_budget"] = fit(model, tokenizer, "CPU budget (the headline fit)", CPU_FIT, CPU_SAMPLES,
                                 args.clusters, args.sparsity, False, args.encoder)
    if distributed.is_main():  # perplexity is one process's job
        out["heldout_perplexity"] = {
            label: perplexity(model, tokenizer, bundle, seq_len=512, limit=256, batch_size=16, progress=False,
                              seed=SEED)["perplexity"]
            for label, bundle in (("dense", None), ("paper_budget", paper), ("cpu_budget", cpu))}
    return out


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig

    from igprune.evaluation.speed import SpeedSettings, run
    from igprune.models import model_source

    layers = AutoConfig.from_pretrained(model_source(args.model)).num_hidden_layers
    blocks = round(args.sparsity * 2 * layers)  # 14 of qwen2.5-1.5b's 56 blocks
    out: dict[str, Any] = {}
    for batch in (1, 16):
        settings = SpeedSettings(prompt_tokens=512, new_tokens=64, batch_size=batch, repeats=5, warmup=1)
        report = run(args.model, blocks=[blocks], kv_policies=("keep", "drop"), settings=settings, progress=False,
                     encoder=args.encoder)
        rows = [{"label": r["label"], "kv_policy": r["kv_policy"], "blocks_skipped": r["blocks_skipped"],
                 **{f"{phase}_{key}": r[phase][key] for phase in ("prefill", "decode")
                    for key in ("tokens_per_s", "speedup", "flops_speedup")}} for r in report["results"]]
        for row in rows:
            row["prefill_fraction_of_ideal"] = row["prefill_speedup"] / row["prefill_flops_speedup"]
        out[f"batch_{batch}"] = {"settings": report["settings"], "machine": report["machine"], "rows": rows}
    pruned = [r for r in out["batch_16"]["rows"] if r["blocks_skipped"]]
    # the aim: at batch 16 prefill speedup at least 90% of the FLOPs-ideal one
    out["prefill_at_least_90_percent_of_ideal_at_batch_16"] = all(r["prefill_fraction_of_ideal"] >= 0.9
                                                                   for r in pruned)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2")
    parser.add_argument("--make-kit", type=Path, metavar="DIR", help="write --model's and --encoder's folders "
                        "without weights, and the calibration text, to DIR, and stop (no GPU needed)")
    parser.add_argument("--random-weights", type=Path, metavar="KIT", help="build the kit's model and encoder with "
                        "seeded random weights: time and memory only (set IGPRUNE_HOME=KIT/home)")
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for the paper-budget fit")
    parser.add_argument("--only", choices=PARTS, help="run one part (default: both)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.make_kit:
        from igprune.files import IGPruneError

        try:
            make_kit(args.model, args.encoder, args.make_kit)
        except IGPruneError as error:  # an unprepared model or encoder: the one line says what to run
            sys.exit(f"benchmarks/gpu.py: {error}")
        return
    need_cuda()  # before the slow imports
    from igprune import distributed
    from igprune.files import write_json
    from igprune.models import ZOO, is_converted

    if args.model in ZOO and not args.random_weights and not is_converted(ZOO[args.model]):
        sys.exit(f"benchmarks/gpu.py: {args.model} is not prepared; run `igprune prepare --model {args.model}` "
                 "first (the GPU machine may have no network)")
    distributed.init_from_env()
    started = time.perf_counter()
    report: dict[str, Any] = {"model": args.model, "device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "weights": "real"}
    with tempfile.TemporaryDirectory(prefix="igprune-gpu-") as scratch:  # the random-weight copies, gone after
        if args.random_weights:
            built = Path(scratch)
            args.model = with_random_weights(args.random_weights / "model", built / "model", torch.bfloat16)
            args.encoder = with_random_weights(args.random_weights / "encoder", built / "encoder", torch.float32,
                                               True)
            report["weights"] = f"random (seed {SEED}) in {args.random_weights}'s architectures: time and memory only"
        for part, measure in (("speed", speed), ("fit", fits)):  # the quick part first; the report after each
            if args.only in (None, part) and (part == "fit" or distributed.is_main()):
                report[part] = measure(args)
                report["seconds"] = round(time.perf_counter() - started, 1)
                if distributed.is_main():
                    write_json(args.out, report)
                    print(f"wrote {args.out} ({part}) at {report['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
