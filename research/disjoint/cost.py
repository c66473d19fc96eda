"""Router cost in FLOPs, as a share of serving one request: a 512-token prompt and 128 generated tokens.

Base: prefill of 512 tokens under the global mask (logits at the last position) + 128 decode steps
(igprune.evaluation.flops, kv_policy "keep"). Routers:
  embedding   all-MiniLM-L6-v2 (6 layers, hidden 384, FFN 1536) on 64 tokens: 2 x tokens x weights + attention
  prompt T,m  scoring the first T prompt tokens under the global mask and m candidates in one batch: the m losing
              rows' forwards of T tokens with logits at every position, plus the winner's logits at its T - 1
              earlier positions (a plain prefill computes the last one only); the winner's KV cache is reused.

    PYTHONPATH=src python research/disjoint/cost.py   # writes research/disjoint/cost.json
"""

from __future__ import annotations

import json
from pathlib import Path

from igprune.bundle import Bundle
from igprune.evaluation.flops import Shape, decode_flops, flops, load_config

REPO = Path(__file__).resolve().parents[2]
PROMPT, GENERATED = 512, 128


def encoder_flops(tokens: int = 64, layers: int = 6, hidden: int = 384, ffn: int = 1536) -> int:
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * tokens * tokens * hidden
    return layers * per_layer


def main() -> None:
    config = load_config("smollm2-135m")
    shape = Shape.from_config(config)
    mask = Bundle.load(REPO / "benchmarks/bundles/smollm2-135m/sleb-b15-mixed").masks[0]
    base = flops(config, mask, seq_len=PROMPT, logits="last")["total"] + decode_flops(config, mask, PROMPT, GENERATED)
    lm_head_token = 2 * shape.hidden * shape.vocab
    out = {"base_flops": base, "encoder_64": encoder_flops() / base, "prompt": {}}
    for T in (16, 24, 32, 64):
        row = flops(config, mask, seq_len=T, logits="all")["total"]
        for m in (1, 2, 4):
            out["prompt"][f"T{T}-m{m}"] = (m * row + (T - 1) * lm_head_token) / base
    print(json.dumps(out, indent=1))
    (Path(__file__).with_name("cost.json")).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
