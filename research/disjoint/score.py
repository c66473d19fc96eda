"""Per-token NLL of every text of every set under every mask: the cache that routers are replayed from.

Sets (each text at most 192 tokens; the first CONTEXT = 64 are the "prompt" a router may read, the rest are scored):
  dev, test  research/disjoint/build.py's source-disjoint texts (192 tokens each)
  indist     the in-distribution domain benchmark's held-out documents (igprune.data.is_heldout: no search,
             clustering or fit passage comes from them): per domain of igprune.data.DOMAIN_SOURCES, INDIST
             passages of at least MIN_TOKENS tokens (max_chars 2048), seeded sample, first 192 tokens
  calib      training passages of the same six sources (the bundle's "domains" pool), CALIB per source, seeded:
             the learned router's training data (never scored by any report as a benchmark)

DISJOINT_MODEL=qwen2.5-0.5b scores another zoo model: dev and test are the same texts in its tokens.

Masks: dense, the project's static b15 bundles, each domain's wide-texts-p0 SLEB search (the candidates the
bundle chose among), and every mask of the bundle. Each (set, mask) is one file
<cache>/data/disjoint/nll/<set>-<sha of the set's ids>/<mask_row>.npy: float32 [texts, 191], per-token NLL of
token t+1 given tokens <= t (NaN past a text's end). Resumable: a file that exists is not recomputed.

    PYTHONPATH=src nice -n 5 python research/disjoint/score.py [--sets dev,test,indist,calib]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

MODEL = os.environ.get("DISJOINT_MODEL", "smollm2-135m")  # another zoo model re-tokenises dev/test's text
BLOCKS = 15
SEED = 0
TOKENS = 192
CONTEXT = 64
MIN_TOKENS = 128
INDIST = 12
CALIB = 16
BUNDLE = REPO / "benchmarks/bundles/smollm2-135m/domains/ig-sleb-n7-texts64-p0-domains-auto-unscored-b15"
STATIC = ["sleb-b15-mixed", "sleb-b15", "evopress-b15", "static-l0-b15", "shortened-ppl-b15"]
WIDE = REPO / "benchmarks/results/domains/smollm2-135m"
DOMAINS = ("code", "math", "wiki", "tiny", "multilingual", "qa")


def cache_dir() -> Path:
    from igprune.files import cache_root

    return cache_root() / "data" / "disjoint"


def load_set(name: str, tokenizer=None) -> list[dict]:
    """Records {"id", "domain", "ids", "text"} of one set, deterministic."""
    if tokenizer is None:
        from igprune.models import load_tokenizer
        tokenizer = load_tokenizer(MODEL)
    if name in ("dev", "test"):
        rows = [json.loads(line) for line in (cache_dir() / f"{name}.jsonl").open(encoding="utf-8")]
        if MODEL != "smollm2-135m":  # the same text (smollm2's first TOKENS tokens), in this model's tokens
            rows = [{**r, "ids": tokenizer(r["text"], add_special_tokens=False)["input_ids"][:TOKENS]} for r in rows]
        return rows
    from igprune.data import load_calibration

    split, limit = ("heldout", INDIST) if name == "indist" else ("train", CALIB)
    rows = []
    for d in DOMAINS:
        texts = load_calibration(d, split=split, max_chars=2048, seed=SEED)
        ok = [(t, ids[:TOKENS]) for t in texts
              if len(ids := tokenizer(t, add_special_tokens=False)["input_ids"]) >= MIN_TOKENS]
        rng = random.Random(f"{SEED}:{name}:{d}")
        chosen = sorted(rng.sample(range(len(ok)), min(limit, len(ok))))
        rows += [{"id": f"{name}-{d}-{k}", "domain": d, "ids": ok[i][1], "text": tokenizer.decode(ok[i][1])}
                 for k, i in enumerate(chosen)]
    return rows


def set_digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps([r["ids"] for r in rows]).encode()).hexdigest()[:12]


def named_masks(model) -> dict[str, torch.Tensor | None]:
    """label -> mask (None: dense): static bundles, the wide-texts-p0 domain searches, the bundle's masks."""
    from igprune.bundle import Bundle
    from igprune.finders.search import find_order_mask

    masks: dict[str, torch.Tensor | None] = {"dense": None}
    for name in STATIC:
        masks[name] = Bundle.load(REPO / "benchmarks/bundles" / MODEL / name).masks[0]
    for d in DOMAINS:
        order = json.loads((WIDE / f"wide-texts-p0-{d}-b{BLOCKS}.json").read_text())["order"]
        masks[f"wide-texts-p0-{d}"] = find_order_mask(model, order, "block")
    bundle = Bundle.load(BUNDLE)
    for k, m in enumerate(bundle.masks):
        masks[f"cluster{k}"] = m
    return masks


def mask_key(mask: torch.Tensor | None) -> str:
    from igprune.masks import mask_row

    return "dense" if mask is None else mask_row(mask)


@torch.no_grad()
def token_nll(model, rows: list[dict], batch: int = 8) -> np.ndarray:
    out = np.full((len(rows), TOKENS - 1), np.nan, dtype=np.float32)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["ids"]))
    for s in range(0, len(order), batch):
        chunk = order[s:s + batch]
        width = len(rows[chunk[0]]["ids"])
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        att = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            n = len(rows[i]["ids"])
            ids[r, :n] = torch.tensor(rows[i]["ids"])
            att[r, :n] = 1
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        for r, i in enumerate(chunk):
            n = len(rows[i]["ids"])
            out[i, :n - 1] = nll[r, :n - 1].numpy()
    return out


def nll_path(set_name: str, rows: list[dict], key: str) -> Path:
    return cache_dir() / "nll" / f"{set_name}-{set_digest(rows)}" / f"{key}.npy"


def scored(model, set_name: str, rows: list[dict], mask: torch.Tensor | None) -> tuple[np.ndarray, bool]:
    """The per-token NLL of `rows` under `mask` from the cache, computed and saved (atomically) if it is not there;
    and whether it was computed now."""
    from igprune.blocks import masked

    path = nll_path(set_name, rows, mask_key(mask))
    if path.is_file():
        return np.load(path), False
    path.parent.mkdir(parents=True, exist_ok=True)
    with masked(model, mask):
        arr = token_nll(model, rows)
    np.save(path.with_suffix(".tmp.npy"), arr)
    os.replace(path.with_suffix(".tmp.npy"), path)
    return arr, True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", default="dev,test,indist,calib")
    parser.add_argument("--masks", help="comma-separated labels (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from igprune import load_model

    model, tokenizer = load_model(MODEL)
    model.eval()
    masks = named_masks(model)
    if args.masks:
        masks = {k: v for k, v in masks.items() if k in args.masks.split(",")}
    labels = {}
    for label, m in masks.items():
        labels.setdefault(mask_key(m), label)
    bundle_keys = list(dict.fromkeys([mask_key(masks["sleb-b15-mixed"]),
                                     *(mask_key(m) for label, m in masks.items() if label.startswith("cluster"))]))
    other_keys = [k for k in labels if k not in bundle_keys and labels[k] != "dense"]
    # priority: the bundle's distinct masks everywhere, then the other static and search masks, then dense
    static_keys = [mask_key(masks[name]) for name in STATIC if mask_key(masks[name]) not in bundle_keys]
    jobs = [(s, k) for s in ("dev", "test") for k in bundle_keys]
    jobs += [(s, k) for s in ("test", "dev") for k in static_keys]
    jobs += [("calib", k) for k in bundle_keys]
    jobs += [("indist", k) for k in [*bundle_keys, *static_keys]]
    jobs += [(s, k) for s in ("dev", "test", "indist") for k in other_keys]
    jobs += [(s, k) for s in ("dev", "test", "indist") for k in labels if labels[k] == "dense"]
    wanted = args.sets.split(",")
    sets = {s: load_set(s, tokenizer) for s in wanted}
    for s, rows in sets.items():
        (cache_dir() / "nll" / f"{s}-{set_digest(rows)}").mkdir(parents=True, exist_ok=True)
    for set_name, key in jobs:
        if set_name not in sets:
            continue
        rows, label = sets[set_name], labels[key]
        start = time.time()
        arr, computed = scored(model, set_name, rows, masks[label])
        if not computed:
            continue
        print(f"{set_name} {label}: {len(rows)} texts, {time.time() - start:.0f}s, "
              f"mean nll {np.nanmean(arr[:, CONTEXT - 1:]):.3f}", flush=True)

if __name__ == "__main__":
    main()
