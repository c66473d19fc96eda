"""Source-disjoint held-out text for issue 40: four domains whose sources no calibration pool of igprune reads.

No calibration pool (igprune.data: exllamav3's c4/wiki/code/technical/tiny/multilingual files, GSM8K, MBPP, SciQ)
and no fit, search or choice of the project reads any of these packages. Each domain has a `dev` split (for
choosing margins, thresholds, routers) and a `test` split (for reporting only), from DIFFERENT packages:

    domain     dev                                   test
    code       networkx 3.6.1 wheel, *.py            rich 15.0.0 wheel, *.py
    docs       flask 3.1.3 + jinja2 3.1.6 sdists,    click 8.5.1 + werkzeug 3.1.9 sdists,
               docs/**/*.rst|md                      docs/**/*.rst|md
    maths      mpmath 1.3.0 wheel, docstrings        sympy 1.14.0 wheel, docstrings of its maths subpackages
    i18n       django 5.2.20 wheel, django.po        sphinx 8.2.3 wheel, sphinx.po
               msgstr of LANGUAGES                   msgstr of LANGUAGES

Every file is a pinned PyPI file, fetched with `pip download --no-deps` into <cache>/data/disjoint/downloads
(its sha256 recorded in the manifest) and read from the archive, never installed. Selection, per split:
every candidate text (below) tokenised with smollm2-135m's tokenizer, those with at least TOKENS tokens kept,
at most PER_SOURCE per file (code, docs, maths) or PER_LANGUAGE per language (i18n), then a seeded sample of N
(random.Random
f"{SEED}:{domain}:{split}"), in candidate order. A text is its first TOKENS tokens (ids kept; "text" is their
decoding). Candidates:
  code   each .py file (not tests) cut at top-level `def`/`class`/decorator lines into chunks, greedily packed to
         at most CHUNK_CHARS characters;
  docs   each .rst/.md file (not changelogs) cut at blank lines into chunks of at most CHUNK_CHARS (igprune.data.
         split_pieces);
  maths  every docstring (ast, inspect.cleandoc) of at least MIN_DOC_CHARS characters that carries maths (at least
         MIN_MATH of the characters = ^ * / ( ) or a backslash, or ">>>");
  i18n   per language, every non-fuzzy msgstr of at least MIN_MSG characters, in file order, joined by newlines,
         cut into chunks of at most CHUNK_CHARS.

    PYTHONPATH=src python research/disjoint/build.py      # writes <cache>/data/disjoint/{dev,test}.jsonl
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from igprune.data import docstrings, split_pieces
from igprune.data import po_messages as data_po_messages
from igprune.files import cache_root

SEED = 0
TOKENS = 192
N = 32  # texts per domain and split
PER_SOURCE = 3
PER_LANGUAGE = 5  # i18n: chunks per language (12 languages)
CHUNK_CHARS = 1600
MIN_DOC_CHARS = 600
MIN_MATH = 12
MIN_MSG = 25
MODEL = "smollm2-135m"
LANGUAGES = ["de", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt_BR", "ru", "sv", "tr"]
WHEELS = {  # requirement -> (file, sha256, kind)
    "networkx==3.6.1": ("networkx-3.6.1-py3-none-any.whl", "wheel"),
    "rich==15.0.0": ("rich-15.0.0-py3-none-any.whl", "wheel"),
    "mpmath==1.3.0": ("mpmath-1.3.0-py3-none-any.whl", "wheel"),
    "sympy==1.14.0": ("sympy-1.14.0-py3-none-any.whl", "wheel"),
    "django==5.2.20": ("django-5.2.20-py3-none-any.whl", "wheel"),
    "sphinx==8.2.3": ("sphinx-8.2.3-py3-none-any.whl", "wheel"),
    "flask==3.1.3": ("flask-3.1.3.tar.gz", "sdist"),
    "jinja2==3.1.6": ("jinja2-3.1.6.tar.gz", "sdist"),
    "click==8.5.1": ("click-8.5.1.tar.gz", "sdist"),
    "werkzeug==3.1.9": ("werkzeug-3.1.9.tar.gz", "sdist"),
}
SPLITS = {
    "code": {"dev": ["networkx==3.6.1"], "test": ["rich==15.0.0"]},
    "docs": {"dev": ["flask==3.1.3", "jinja2==3.1.6"], "test": ["click==8.5.1", "werkzeug==3.1.9"]},
    "maths": {"dev": ["mpmath==1.3.0"], "test": ["sympy==1.14.0"]},
    "i18n": {"dev": ["django==5.2.20"], "test": ["sphinx==8.2.3"]},
}
SYMPY_MATHS = ("sympy/functions/", "sympy/integrals/", "sympy/series/", "sympy/polys/", "sympy/solvers/",
               "sympy/simplify/", "sympy/ntheory/", "sympy/matrices/", "sympy/calculus/", "sympy/geometry/",
               "sympy/concrete/", "sympy/stats/", "sympy/tensor/")


def out_dir() -> Path:
    return cache_root() / "data" / "disjoint"


def download(requirement: str) -> Path:
    filename, kind = WHEELS[requirement]
    dest = out_dir() / "downloads"
    path = dest / filename
    if not path.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        binary = "--only-binary=:all:" if kind == "wheel" else "--no-binary=:all:"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", binary, "--disable-pip-version-check",
                        "-d", str(dest), requirement], check=True)
    return path


def members(path: Path) -> list[tuple[str, str]]:
    """(name, text) of every UTF-8 file in a wheel or sdist, in sorted name order."""
    out = []
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                if name.endswith((".py", ".po")):
                    out.append((name, zf.read(name).decode("utf-8", "replace")))
    else:
        with tarfile.open(path) as tf:
            for m in sorted(tf.getmembers(), key=lambda m: m.name):
                if m.isfile() and m.name.endswith((".rst", ".md", ".py")):
                    out.append((m.name, tf.extractfile(m).read().decode("utf-8", "replace")))
    return out


def pack(parts: list[str], sep: str) -> list[str]:
    chunks, current = [], ""
    for part in parts:
        if current and len(current) + len(sep) + len(part) > CHUNK_CHARS:
            chunks.append(current)
            current = part
        else:
            current = current + sep + part if current else part
    if current:
        chunks.append(current)
    return chunks


def code_candidates(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for name, text in files:
        if not name.endswith(".py") or "/tests/" in name or "/test_" in name or name.endswith("conftest.py"):
            continue
        parts = re.split(r"\n(?=(?:def |class |@|async def ))", text)
        out += [(name, c) for c in pack([p.strip("\n") for p in parts if p.strip()], "\n\n")]
    return out


def docs_candidates(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for name, text in files:
        if "/docs/" not in name or not name.endswith((".rst", ".md")) or re.search(r"change|license", name, re.I):
            continue
        out += [(name, c) for c in split_pieces(text.replace("\r\n", "\n").strip(), CHUNK_CHARS)]
    return out


def maths_candidates(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for name, text in files:
        if not name.endswith(".py") or "/tests/" in name:
            continue
        if name.startswith("sympy/") and not name.startswith(SYMPY_MATHS):
            continue
        for node, doc in docstrings(text):
            maths = sum(doc.count(c) for c in "=^*/()\\")
            if len(doc) >= MIN_DOC_CHARS and (maths >= MIN_MATH or ">>>" in doc):
                out.append((f"{name}:{node}", doc[:4 * CHUNK_CHARS]))
    return out


def po_messages(text: str) -> list[str]:
    """Non-fuzzy msgstr values of a .po file (igprune.data.po_messages) of at least MIN_MSG characters."""
    return [m.strip() for m in data_po_messages(text) if len(m) >= MIN_MSG]


def i18n_candidates(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for lang in LANGUAGES:
        alias = {"zh_Hans": "zh_CN"}.get(lang, lang)
        messages = [m for name, text in files if name.endswith(".po") and f"/locale/{alias}/LC_MESSAGES/" in name
                    for m in po_messages(text)]
        out += [(f"locale/{lang}", c) for c in pack(messages, "\n")]
    return out


CANDIDATES = {"code": code_candidates, "docs": docs_candidates, "maths": maths_candidates, "i18n": i18n_candidates}


def select(tokenizer, domain: str, split: str) -> list[dict]:
    files = []
    for requirement in SPLITS[domain][split]:
        files += [(f"{requirement}:{name}", text) for name, text in members(download(requirement))]
    candidates = CANDIDATES[domain]([(n.split(":", 1)[1], t) for n, t in files])
    owner = {n.split(":", 1)[1]: n.split(":", 1)[0] for n, _ in files}
    kept, per = [], {}
    for name, text in candidates:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        source = name.split(":")[0]
        if len(ids) < TOKENS or per.get(source, 0) >= (PER_LANGUAGE if domain == "i18n" else PER_SOURCE):
            continue
        per[source] = per.get(source, 0) + 1
        kept.append((name, ids[:TOKENS]))
    rng = random.Random(f"{SEED}:{domain}:{split}")
    chosen = sorted(rng.sample(range(len(kept)), min(N, len(kept))))
    rows = []
    for i in chosen:
        name, ids = kept[i]
        package = owner.get(name.split(":")[0]) or ",".join(SPLITS[domain][split])
        rows.append({"id": f"{domain}-{split}-{len(rows)}", "domain": domain, "split": split, "package": package,
                     "where": name, "ids": ids, "text": tokenizer.decode(ids)})
    print(f"{domain} {split}: {len(candidates)} candidates, {len(kept)} kept, {len(rows)} chosen", flush=True)
    return rows


def main() -> None:
    from igprune.models import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    manifest = {"seed": SEED, "tokens": TOKENS, "n": N, "per_source": PER_SOURCE, "chunk_chars": CHUNK_CHARS,
                "languages": LANGUAGES, "splits": SPLITS, "tokenizer": MODEL, "files": {}}
    for requirement, (filename, _) in WHEELS.items():
        path = download(requirement)
        manifest["files"][requirement] = {"file": filename, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    for split in ("dev", "test"):
        rows = [r for domain in SPLITS for r in select(tokenizer, domain, split)]
        path = out_dir() / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        manifest[split] = {"records": len(rows), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (out_dir() / "manifest.json").write_text(json.dumps(manifest, indent=1))
    Path(__file__).with_name("manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({s: manifest[s] for s in ("dev", "test")}))


if __name__ == "__main__":
    main()
