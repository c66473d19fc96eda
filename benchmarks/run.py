"""The benchmarks' one runner. A benchmark is a config in benchmarks/configs/ (its runs and settings, as data) and
the module beside this file that knows how to run them; every run is cached and resumes where it stopped.

    python benchmarks/run.py                        # the benchmarks and their configs
    python benchmarks/run.py headline [--list] [--only RUN,...] [--bundles-only]   # six tasks, IG vs static
    python benchmarks/run.py domains STEP [--blocks B] [--model M] [--only RUN,...]  # held-out domain passages
    python benchmarks/report.py                     # then the tables in RESULTS.md
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "headline": "IG-Pruning against every static method on the paper's six tasks (paper Table 1 and ablations)",
    "domains": "per-input masks on six domains' held-out passages: the cross-domain matrix, fits, routed and oracle",
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHMARKS:
        print(__doc__)
        for name, what in BENCHMARKS.items():
            print(f"  {name:<9} configs/{name}.yaml  {what}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else f"unknown benchmark {argv[0]!r}")
    sys.path.insert(0, str(HERE))
    importlib.import_module(argv[0]).main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
