#!/usr/bin/env bash
# The main job on the built-in defaults: set up, then IG-Pruning on smollm2-135m with small demo
# recipe `fast` (4 clusters, 8 of 60 blocks skipped, a few minutes on 2 CPU cores), route a few prompts
# and generate with the pruned model.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-runs/demo-bundle}
if [ ! -f "$OUT/bundle.json" ]; then
  igprune fit --model smollm2-135m --recipe fast --blocks 8 --out "$OUT"
fi
igprune inspect "$OUT"
igprune route --bundle "$OUT" \
  "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)" \
  "The Treaty of Westphalia ended the Thirty Years' War in 1648." \
  "Once upon a time, a little rabbit found a shiny red ball in the garden." \
  "Der schnelle braune Fuchs springt über den faulen Hund."
igprune generate --bundle "$OUT" --prompt "The capital of France is" --max-new-tokens 12
