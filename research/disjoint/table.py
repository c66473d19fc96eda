"""Markdown tables from results.json: per set, each method's % lower perplexity than the global mask (and than the
best static mask), overall and per domain, paired per text, +- stderr.

    python research/disjoint/table.py > research/disjoint/tables.md
"""

import json
from pathlib import Path

r = json.loads((Path(__file__).with_name("results.json")).read_text())
print(f"Bundle {r['bundle']}; global mask {r['global']}; candidates {r['candidates']}; chosen on dev: "
      f"{json.dumps(r['chosen_on_dev'])}\n")
for s, e in r["sets"].items():
    doms = list(next(iter(e["methods"].values()))["vs_global"])
    print(f"### {s} ({r['texts'][s]} texts; best static here: {e['best_static']})\n")
    print("| method | ppl | vs global: " + " | ".join(doms) + " | vs best static: all | headroom | left global |")
    print("|" + " --- |" * (len(doms) + 5))
    f = lambda x: f"{x[0]:+.1f} ± {x[1]:.1f}"  # noqa: E731
    for name, m in e["methods"].items():
        print(f"| {name} | {m['ppl']:.2f} | " + " | ".join(f(m["vs_global"][d]) for d in doms)
              + f" | {f(m['vs_best_static']['all'])} | {m['headroom_captured']} | {m['left_global']} |")
    print("\nStatic masks (ppl; % lower than the global mask): " + "; ".join(
        f"{k} {v['ppl']:.2f} ({v['vs_global'][0]:+.1f} ± {v['vs_global'][1]:.1f})" for k, v in e["static"].items()))
    print()
