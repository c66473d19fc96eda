"""The figures of the reliability section (docs/reliability.md): runs the reliability tests and prints their counts.

    python benchmarks/reliability.py      (about five minutes on one thread; needs `igprune prepare` data)

tests/test_cli_errors.py  the table of bad inputs and damaged bundles through the CLI (cases tried, rejected)
tests/test_bundle_integrity.py  random byte flips in a bundle (refused, harmless, accepted damaged)
tests/test_kill_resume.py  fit and the long searches SIGKILLed and rerun (kills survived); Ctrl-C exits 130
tests/test_serve.py  requests generation cannot take (400s), a poisoned request inside a batch (others unharmed)
tests/test_fuzz.py  generated HTTP requests, command lines and --texts files (5xx, tracebacks, one-line refusals)

Every figure is counted by the tests themselves; a failing test fails this script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_cli_errors.py", "tests/test_bundle_integrity.py", "tests/test_kill_resume.py",
         "tests/test_serve.py", "tests/test_fuzz.py"]


def main() -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *TESTS], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("reliability:")]
    print("\n".join(lines) or "no figures printed")
    print((done.stdout.strip().splitlines() or ["no pytest output"])[-1])
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
