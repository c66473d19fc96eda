"""SLEB (lazy) for the global mask on varied off-source text instead of the calibration pool (LOG section 18).

varied.py found that text of many other sources ranks global masks as the disjoint benchmark does (rho 0.89),
where calibration-pool text does not. This searches on such text: rows of varied texts (varied.py's sources,
a selection with another seed, the judge texts of varied.json left out), `--rows` x 128 tokens, each row from a
text's first token. Prints the order; `igprune baseline sleb --option 'start=[...]'` makes it a one-mask bundle
that seeds.py scores on dev and test.

    PYTHONPATH=src python research/disjoint/varied_search.py --rows 16 --seed 1 [--threads 1]
    PYTHONPATH=src python research/disjoint/varied_search.py --rows 16 --seed 0 --kinds   # igprune's pool by kind

With --kinds the rows come from igprune's varied pool (training documents), 2 x rows passages of each kind of
text, shuffled together: a third translations, where the pool balanced per wheel gives them 2 of 14 shares.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import varied  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", action="store_true",
                        help="igprune's varied pool balanced per kind of text instead of varied.py's local files")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from igprune import load_model
    from igprune.data import VARIED, documents, is_heldout, passages
    from igprune.finders import find_mask, make_calibration

    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    if args.kinds:  # igprune's varied pool, equal shares per kind of text (code, docstrings, translations)
        kinds: dict[str, list[str]] = {}
        for source, (*_, kind) in VARIED.items():
            kinds.setdefault(kind, []).extend(p for doc in documents(source) if not is_heldout(doc)
                                              for p in passages(doc, 2048))
        rng = random.Random(args.seed)
        texts = [t for found in kinds.values() for t in rng.sample(found, 2 * args.rows)]
    else:  # varied.py's local files, the judge's texts left out
        judged = {t["where"] for t in json.loads((HERE / "varied.json").read_text())["texts"]}
        texts = [tokenizer.decode(r["ids"]) for d, found in varied.candidates().items()
                 for r in varied.select(tokenizer, d, found, 4 * args.rows, args.seed) if r["where"] not in judged]
    rows = make_calibration(tokenizer, texts, args.rows, 128, args.seed, "varied", "texts")
    bundle = find_mask("sleb", model, tokenizer, [], args.blocks / 60, "block", seed=args.seed, calibration=rows,
                       lazy=True)
    order = bundle.logs["search"]["order"]
    report = {"rows": args.rows, "seed": args.seed, "kinds": args.kinds, "texts": len(texts), "order": order,
              "seconds": bundle.logs["search"].get("seconds")}
    print(json.dumps(report))
    out = args.out or HERE / f"varied-search{'-kinds' if args.kinds else ''}-r{args.rows}-s{args.seed}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
