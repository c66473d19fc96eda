#!/usr/bin/env bash
# Run the tests on a fresh machine: set up (environment, install, prepare), then lint and pytest.
# Unit tests use tiny random models built in the tests; integration tests use the real smollm2-135m.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check src tests
python -m pytest -q "$@"
