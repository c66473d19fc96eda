"""Peak memory of mask training on the CPU, with and without gradient checkpointing.

Each setting runs in a fresh process (peak resident memory is per process): load the model, then a few
shared-phase steps of batch x seq_len tokens with the LM loss on every position, and report the process's peak
RSS beside the weights' own size. GPU peaks come from benchmarks/gpu.py.

    python research/fit-memory/fit_memory.py    # writes research/fit-memory/results/fit_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "results" / "fit_memory.json"


def measure(model_name: str, batch: int, seq_len: int, steps: int, checkpointing: bool) -> dict:
    """One setting, in this process."""
    import time

    import torch

    from igprune.finders.l0 import MaskTrainer, TrainConfig
    from igprune.models import load_model

    torch.set_num_threads(1)
    model, _ = load_model(model_name, device="cpu", dtype="float32")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator)
    config = TrainConfig(shared_steps=steps, cluster_steps=0, batch_size=batch, seq_len=seq_len,
                         loss_positions=None, gradient_checkpointing=checkpointing)
    started = time.perf_counter()
    MaskTrainer(model, 1, config, progress=False).fit(ids, torch.ones_like(ids), torch.zeros(batch, dtype=torch.long))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"model": model_name, "batch": batch, "seq_len": seq_len, "steps": steps,
            "gradient_checkpointing": checkpointing, "weights_gib": round(weights / 2**30, 3),
            "rss_after_load_gib": round(before / 2**30, 3), "peak_rss_gib": round(peak / 2**30, 3),
            "seconds_per_step": round((time.perf_counter() - started) / steps, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.batch, args.seq_len, args.steps, args.one == "checkpointed")))
        return
    rows = []
    for one in ("plain", "checkpointed"):
        done = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
                               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--one", one],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    OUT.write_text(json.dumps({"note": "CPU, float32, peak resident memory of the whole process (weights, "
                                       "activations, Python and torch)", "rows": rows}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
