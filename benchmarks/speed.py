"""Speed of smollm2-135m pruned at 8, 15 and 22 of 60 blocks, KV policies keep and drop, against dense.

Masks come from the canonical attention-first order (igprune.evaluation.flops.ORDERS), since no bundle is
given; pass bundle folders to time their routed masks instead. Writes benchmarks/results/speed_<model>.json
and .png and prints the table. Run it niced on a shared machine and rerun when `uptime` shows low load:

    nice -n 10 python benchmarks/speed.py [--repeats 5] [--threads 1] [BUNDLE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from igprune.evaluation.figures import speed_chart
from igprune.evaluation.speed import SpeedSettings, markdown, run

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", help="bundle folders (default: canonical masks at --blocks)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 15, 22])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    settings = SpeedSettings(args.prompt_tokens, args.new_tokens, 1, args.repeats, args.warmup, args.threads)
    out = RESULTS / f"speed_{args.model}.json"
    report = run(args.model, args.bundles, args.blocks, ("keep", "drop"), settings=settings, out=out)
    speed_chart(report, out.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
