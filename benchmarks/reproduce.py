"""Does `igprune fit` reproduce a published bundle? Compares a refit with the published one: clusters, centroids,
the learning curve step by step, and the masks block by block.

    igprune fit --model smollm2-135m --recipe paper --blocks 15 --out runs/paper-b15    # about 20 min, 2 threads
    python benchmarks/reproduce.py runs/paper-b15 benchmarks/bundles/smollm2-135m/ig16-b15
"""

from __future__ import annotations

import sys

from igprune.bundle import Bundle


def compare(refit: Bundle, published: Bundle) -> list[str]:
    lines = [f"cluster sizes equal: {refit.config['cluster_sizes'] == published.config['cluster_sizes']}",
             f"centroids: max difference {(refit.centroids - published.centroids).abs().max().item():.2e}"]
    curves = [b.logs.get("train", {}).get("loss", []) for b in (refit, published)]
    if all(curves):
        for step in sorted({0, 10, 100, len(curves[0]) - 1}):
            lines.append(f"training loss at step {step}: {curves[0][step]:.6f} vs {curves[1][step]:.6f}")
    differ = [int((a != b).sum()) for a, b in zip(refit.masks, published.masks, strict=True)]
    lines.append(f"masks: {sum(d == 0 for d in differ)} of {len(differ)} clusters identical; blocks that differ per "
                 f"cluster: {differ}")
    return lines


if __name__ == "__main__":
    print("\n".join(compare(Bundle.load(sys.argv[1]), Bundle.load(sys.argv[2]))))
