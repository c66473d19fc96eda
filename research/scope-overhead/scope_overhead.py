"""What `igprune.masked` costs: entering and leaving a scope, against the forwards it wraps, on smollm2-135m.

A scope installs the gated forward on every decoder layer and removes it on exit (igprune.blocks), so the
user's model is untouched outside it. This times an empty scope (mean of many), and, under one mask, a
one-token decode step and a 512-token prefill (medians), on one thread. Writes
research/scope-overhead/results/scope_overhead.json and prints the ratios:

    python research/scope-overhead/scope_overhead.py [--repeats 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from igprune.blocks import control_of, masked
from igprune.evaluation.flops import canonical_mask
from igprune.files import write_json
from igprune.models import load_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model("smollm2-135m")
    n_blocks = control_of(model).n_blocks
    mask = canonical_mask(n_blocks, 15, "attention-first")
    started = time.perf_counter()
    for _ in range(args.repeats):
        with masked(model, mask):
            pass
    scope = (time.perf_counter() - started) / args.repeats

    def median_seconds(ids: torch.Tensor, rounds: int) -> float:
        times = []
        with torch.inference_mode(), masked(model, mask):
            for _ in range(rounds):
                started = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    decode = median_seconds(torch.tensor([[1]]), 30)
    prefill = median_seconds(torch.randint(10, 1000, (1, 512), generator=torch.Generator().manual_seed(0)), 5)
    report = {"model": "smollm2-135m", "layers": n_blocks // 2, "threads": 1, "scope_seconds": scope,
              "decode_step_seconds": decode, "prefill_512_seconds": prefill,
              "scope_percent_of_decode_step": 100 * scope / decode,
              "scope_percent_of_prefill": 100 * scope / prefill}
    write_json(RESULTS / "scope_overhead.json", report)
    print(f"scope {1e6 * scope:.0f} us = {report['scope_percent_of_decode_step']:.2f}% of a one-token step "
          f"({1e3 * decode:.1f} ms), {report['scope_percent_of_prefill']:.3f}% of a 512-token prefill "
          f"({1e3 * prefill:.0f} ms)")


if __name__ == "__main__":
    main()
