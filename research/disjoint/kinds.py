"""Kind candidates: a mask per kind of the varied pool's text, offered to every cluster's choice (LOG section 20).

The default bundle at 15 of 60 loses on non-English text to sleb-b15-mixed, and offering that one mask to the
clusters' choice bought part of it back (LOG 19). This asks whether the recipe can find such masks on purpose:
continue the fit's shared prefix (its first `shared_units` units) to the full count on rows of one kind of the
varied pool's text (Python code, maths docstrings, web applications' translations: sources no benchmark reads),
then rerun only the choice of a committed bundle with those masks as extra candidates. The clusters are rebuilt
from the bundle's recorded fit config (checked against its centroids), every cluster's own search mask comes from
its logs, so nothing but the kind searches and the choice is recomputed.

    PYTHONPATH=src python research/disjoint/kinds.py benchmarks/bundles/smollm2-135m/default-b15 --out runs/kinds-b15
    PYTHONPATH=src python research/disjoint/evaluate_bundle.py runs/kinds-b15 --chosen-only --statics sleb-b15-mixed
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def kind_rows(tokenizer, kind: str, rows: int, seq_len: int, seed: int):
    """`rows` rows of one kind of the varied pool's training passages (as long as the global search's), each from a
    passage's first token."""
    from igprune.data import VARIED, documents, is_heldout, passages
    from igprune.finders import make_calibration

    found = [p for source, (*_, k) in VARIED.items() if k == kind
             for doc in documents(source) if not is_heldout(doc) for p in passages(doc, 2048)]
    texts = random.Random(f"{seed}:{kind}").sample(found, 4 * rows)
    return make_calibration(tokenizer, texts, rows, seq_len, seed, f"varied {kind}", "texts")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kinds", default="code,docstrings,translations")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from igprune import load_model
    from igprune.bundle import Bundle
    from igprune.choosing import describe_choice
    from igprune.config import FitConfig
    from igprune.finders import find_mask, make_calibration
    from igprune.finders.base import Found
    from igprune.finders.search import candidate_blocks, find_order_mask
    from igprune.pruner import IGPruner, fit_texts
    from igprune.routing import gate_radii
    from igprune.texts import routed

    bundle = Bundle.load(args.bundle)
    model, tokenizer = load_model(bundle.config["model"])
    model.eval()
    cfg = FitConfig().updated(bundle.config["fit"])
    log = bundle.logs["search"]
    search = cfg.search
    started = time.perf_counter()
    kinds = {}
    for kind in args.kinds.split(","):
        rows = kind_rows(tokenizer, kind, search.shared_samples, search.seq_len, cfg.seed)
        found = find_mask("sleb", model, tokenizer, [], cfg.sparsity, cfg.granularity, seed=cfg.seed, progress=False,
                          calibration=rows, start=log["shared_order"], metric=search.metric, lazy=search.lazy)
        kinds[kind] = found.logs["search"]["order"]
        print(f"{kind}: {kinds[kind][len(log['shared_order']):]} ({time.perf_counter() - started:.0f}s)", flush=True)
    masks = {kind: find_order_mask(model, order, cfg.granularity) for kind, order in kinds.items()}

    pruner = IGPruner(model, tokenizer, cfg)
    texts = fit_texts(cfg.data.source, cfg.data.samples, cfg.seq_len, cfg.seed, cfg.data.max_chars)
    pruner.clustering_, embeddings = pruner._cluster([routed(t) for t in texts])
    if not torch.allclose(pruner.clustering_.centroids.float(), bundle.centroids.float(), atol=1e-4):
        raise SystemExit("the rebuilt clusters differ from the bundle's: its fit config does not reproduce them")
    labels = pruner.clustering_.labels.tolist()
    groups = [[t for t, label in zip(texts, labels, strict=True) if label == c] for c in range(len(log["clusters"]))]
    own = [make_calibration(tokenizer, g, search.samples, search.seq_len, cfg.seed, f"cluster{i}", search.packing)
           for i, g in enumerate(groups)]
    g_mask = find_order_mask(model, log["global_order"], cfg.granularity)
    found = Found(torch.stack([find_order_mask(model, c["order"], cfg.granularity) for c in log["clusters"]]),
                  g_mask, torch.stack(list(masks.values())), [c.texts for c in own],
                  {**log, "candidates": [candidate_blocks(m) for m in masks.values()], "kinds": kinds})
    pruner.find_log_, pruner.fallback_ = found.log, g_mask
    pruner.masks_ = pruner._choose(groups, found)
    pruner.radii_ = gate_radii(pruner.clustering_.centroids, embeddings, cfg.route.gate)
    pruner.seconds_ = time.perf_counter() - started
    pruner.save(args.out)
    print(json.dumps({"kinds": kinds, "choice": describe_choice(found.log["choose"], len(groups)),
                      "seconds": round(pruner.seconds_)}))


if __name__ == "__main__":
    main()
