"""Paper Table 2 in shape (sparsity vs FLOPs vs % of dense) for smollm2-135m and qwen2.5-0.5b, from configs only.

FLOPs of one prefill of --seq-len tokens (2048, which with logits at every position reproduces the paper's
dense Llama-3-8B 32.94T, and 512, the speed benchmark's prompt) under masks in the two canonical orders
(igprune.evaluation.flops.ORDERS): attention-first, the stated canonical order, and ffn-first; any mask with
as many blocks off costs between the two. Bundle folders given as arguments get one row each (their
clusters averaged). Writes benchmarks/results/flops_table.md and .json:

    python benchmarks/flops.py [--seq-len 2048 512] [BUNDLE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import Qwen2Config

from igprune.bundle import Bundle
from igprune.evaluation.flops import ORDERS, Shape, bundle_table, canonical_table, human, load_config, markdown
from igprune.files import IGPruneError, write_json

RESULTS = Path(__file__).parent / "results"
MODELS = ("smollm2-135m", "qwen2.5-0.5b")
# Used only when qwen2.5-0.5b is not converted in the cache (its config is not shipped otherwise): the sizes
# published in Qwen2.5-0.5B's config.json, which Qwen2.5-Coder-0.5B-Instruct shares.
PUBLISHED = {"qwen2.5-0.5b": lambda: Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                                 tie_word_embeddings=True)}


def config_for(name: str):
    try:
        return load_config(name), f"config.json of the converted model in the cache ({name})"
    except IGPruneError:
        if name not in PUBLISHED:
            raise
        return PUBLISHED[name](), "published Qwen2.5-0.5B sizes (not converted in this cache)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", help="bundle folders to add as rows (for the model they were made for)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[2048, 512],
                        help="prefill lengths (2048: the paper's Table 2; 512: the speed benchmark's prompt)")
    args = parser.parse_args()
    report, lines = {"orders": ORDERS, "models": {}}, []
    for name in MODELS:
        config, source = config_for(name)
        shape = Shape.from_config(config)
        bundles = [b for b in args.bundles if Path(Bundle.load(b).config.get("model", "")).name == name]
        report["models"][name] = {"config_source": source, "shape": vars(shape), "tables": {}}
        lines += [f"## {name}: {shape.layers} layers, {shape.n_blocks} blocks, {human(shape.model_params())} weights",
                  "", f"Config: {source}. Params skipped: share of all weights (embeddings included) left unread.",
                  ""]
        for seq_len in args.seq_len:
            tables = {order: canonical_table(config, seq_len=seq_len, order=order) for order in ORDERS}
            if bundles:
                tables["bundles"] = bundle_table(config, bundles, seq_len=seq_len)
            report["models"][name]["tables"][str(seq_len)] = tables
            dense = tables["attention-first"][0]["keep"]["flops"]
            lines += [f"### {name}, prefill of {seq_len} tokens, logits at every position: dense {human(dense)}", ""]
            for order, rows in tables.items():
                lines += [f"**{order}**: {ORDERS.get(order, 'one row per bundle, its clusters averaged')}", "",
                          markdown(rows), ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "flops_table.json", report)
    text = "# FLOPs by sparsity (paper Table 2 in shape)\n\n" + "\n".join(lines)
    (RESULTS / "flops_table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
