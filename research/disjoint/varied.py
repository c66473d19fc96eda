"""Does varied off-source text rank global masks as the disjoint benchmark does? (LOG section 18)

LOG 17 found that calibration-pool text ranks the 13 global masks of the draw studies unlike dev and test (rho
0.01-0.53), while dev ranks them as test does (0.96). This asks whether text from yet other sources, of many files
each, does what dev does: a "varied" set of the four domains built from files on this machine that neither the
calibration pools nor the disjoint benchmark read (Python packages installed by constraints.txt, Debian's docs
and message catalogues):

    code   .py of requests, urllib3, starlette, tqdm, typer, attr, yaml (build.py's chunker)
    docs   /usr/share/doc/**/*.md|rst|txt (not changelogs, licences, copyright), build.py's docs chunker
    maths  docstrings with maths of scipy, numpy, sklearn (build.py's rule)
    i18n   msgstr of /usr/share/locale/<lang>/LC_MESSAGES/*.mo, the disjoint benchmark's 12 languages

per domain N texts of 192 tokens (at most 2 per file or catalogue), seeded; tokens 64..191 scored, as on dev/test.

    PYTHONPATH=src python research/disjoint/varied.py [--threads 2] [--n 16]           # -> varied.json
    PYTHONPATH=src python research/disjoint/varied.py --pool                           # -> varied-pool.json

With --pool the texts are igprune's own "varied" calibration pool (igprune.data.VARIED: other packages' code,
maths libraries' docstrings, two web applications' translations; `igprune prepare` builds it): 4 x n passages
balanced over its 14 sources, each scored after its first 64 tokens as above.
"""

from __future__ import annotations

import argparse
import gettext
import gzip
import json
import random
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build  # noqa: E402
import score  # noqa: E402

CODE = {"requests": "requests", "urllib3": "urllib3", "starlette": "starlette", "tqdm": "tqdm", "typer": "typer",
        "attr": "attrs", "yaml": "PyYAML"}  # import folder: distribution
MATHS = {"scipy": "scipy", "numpy": "numpy", "sklearn": "scikit-learn"}
DOCS = Path("/usr/share/doc")
LOCALE = Path("/usr/share/locale")
PER_FILE = 2


def package_files(folder: str) -> list[tuple[str, str]]:
    root = Path(__import__(folder).__file__).parent
    return [(f"{folder}/{p.relative_to(root)}", p.read_text("utf-8", "replace")) for p in sorted(root.rglob("*.py"))]


def doc_files() -> list[tuple[str, str]]:
    out = []
    for p in sorted(DOCS.rglob("*")):
        name = p.name.removesuffix(".gz")
        if not p.is_file() or not name.endswith((".md", ".rst", ".txt")) or any(
                w in name.lower() for w in ("change", "license", "copyright", "news")):
            continue
        data = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
        out.append((f"docs/{p.relative_to(DOCS)}", data.decode("utf-8", "replace")))
    return out


def i18n_candidates() -> list[tuple[str, str]]:
    out = []
    for lang in build.LANGUAGES:
        for mo in sorted((LOCALE / lang / "LC_MESSAGES").glob("*.mo")):
            try:
                with mo.open("rb") as f:
                    catalog = gettext.GNUTranslations(f)._catalog  # msgid -> msgstr, the header under ""
            except (UnicodeDecodeError, OSError):  # a catalogue not in UTF-8: left out
                continue
            messages = [v.strip() for k, v in catalog.items() if k and isinstance(v, str) and len(v) >= build.MIN_MSG]
            out += [(f"locale/{lang}/{mo.stem}", c) for c in build.pack(messages, "\n")]
    return out


def candidates() -> dict[str, list[tuple[str, str]]]:
    code = [c for folder in CODE for c in build.code_candidates(package_files(folder))]
    maths = [c for folder in MATHS for c in build.maths_candidates(package_files(folder))]
    docs = [(n, c) for n, t in doc_files() for c in build.split_pieces(t.replace("\r\n", "\n").strip(),
                                                                           build.CHUNK_CHARS)]
    return {"code": code, "docs": docs, "maths": maths, "i18n": i18n_candidates()}


def select(tokenizer, domain: str, found: list[tuple[str, str]], n: int, seed: int) -> list[dict]:
    kept, per = [], {}
    for name, text in found:
        source = name.split(":")[0]
        if per.get(source, 0) >= PER_FILE:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= build.TOKENS:
            per[source] = per.get(source, 0) + 1
            kept.append((name, ids[:build.TOKENS]))
    rng = random.Random(f"{seed}:{domain}:varied")
    return [{"id": f"{domain}-varied-{i}", "domain": domain, "where": kept[j][0], "ids": kept[j][1]}
            for i, j in enumerate(sorted(rng.sample(range(len(kept)), min(n, len(kept)))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=16, help="texts per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", action="store_true", help="igprune's varied calibration pool instead")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from igprune import load_model
    from igprune.data import load_calibration
    from igprune.finders.search import find_order_mask

    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    if args.pool:  # igprune's "varied" pool: n x 4 passages, each a row of its first 192 tokens
        texts = load_calibration("varied", "train", limit=4 * args.n, seed=args.seed)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:build.TOKENS] for t in texts]
        rows = [{"id": f"pool-{i}", "domain": "pool", "where": f"varied:{i}", "ids": x} for i, x in enumerate(ids)]
        rows = [r for r in rows if len(r["ids"]) == build.TOKENS]
    else:
        rows = [r for domain, found in candidates().items() for r in select(tokenizer, domain, found, args.n,
                                                                            args.seed)]
    judges = json.loads((HERE / "judges.json").read_text())
    orders, ppl = judges["masks"], judges["perplexity"]
    report = {"seed": args.seed, "n": args.n, "texts": [{k: r[k] for k in ("id", "where")} for r in rows],
              "versions": {d: metadata.version(d) for d in (*CODE.values(), *MATHS.values())},
              "perplexity": {}, "spearman": {}}
    set_name = f"varied{'pool' if args.pool else ''}{args.seed}-{args.n}"
    nll = {}
    for name, order in orders.items():
        nll[name] = score.scored(model, set_name, rows, find_order_mask(model, order, "block"))[0][:, 63:]
        report["perplexity"][name] = float(np.exp(np.nanmean(nll[name])))
        print(name, round(report["perplexity"][name], 3), flush=True)

    def rho(keep: np.ndarray) -> dict[str, float]:
        judged = [float(np.nanmean(nll[k][keep])) for k in orders]
        return {split: round(float(spearmanr(judged, [ppl[split][k] for k in orders]).correlation), 3)
                for split in ppl}

    kinds = np.array([r["domain"] for r in rows])
    report["spearman"] = rho(np.ones(len(rows), bool))
    for kind in dict.fromkeys(kinds):  # which kind of text carries the ranking
        report["spearman"][f"without {kind}"] = rho(kinds != kind)
        report["spearman"][f"{kind} alone"] = rho(kinds == kind)
    for split in ppl:
        report[f"best by varied, its rank on {split}"] = sorted(orders, key=ppl[split].get).index(
            min(orders, key=report["perplexity"].get)) + 1
    print(json.dumps({k: v for k, v in report.items() if k not in ("texts", "perplexity")}, indent=1))
    (args.out or HERE / f"varied{'-pool' if args.pool else ''}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
