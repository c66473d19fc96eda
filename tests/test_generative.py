"""Generative tasks: the code-execution sandbox, batched generation under mixed masks, and the tasks end to end."""

from __future__ import annotations

import os
import tempfile

import pytest
from lm_eval.api.instance import Instance
from test_evaluation import dynamic_model, routed_bundle
from tiny_models import tiny_model, tiny_tokenizer

from igprune.evaluation import benchmark
from igprune.evaluation.execution import (
    humaneval_program,
    isolation,
    mbpp_code,
    pass_at_1,
    run_program,
)
from igprune.evaluation.harness import IGPruneLM
from igprune.evaluation.results import results_table
from igprune.evaluation.tasks import GENERATIVE


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """The sandbox's temporary directories go here, so the test sees whether they are removed."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_generated_code_is_contained(tmp_path, own_tempdir):
    """An infinite loop is killed at the time limit, a huge allocation fails, a write or delete outside the program's
    directory is refused, and the directory is gone afterwards; the evaluating process is untouched."""
    outside, keep = tmp_path / "escaped.txt", tmp_path / "keep.txt"
    keep.write_text("mine")
    loop = run_program("while True:\n    pass\n", timeout=2)
    assert loop.status == "timeout"
    huge = run_program("x = bytearray(64 * 1024 ** 3)\n", timeout=5)
    assert huge.status == "failed" and "MemoryError" in huge.detail
    write = run_program(f"open({str(outside)!r}, 'w').write('pwned')\n", timeout=5)
    assert write.status == "failed" and "PermissionError" in write.detail and not outside.exists()
    delete = run_program(f"import os\nos.remove({str(keep)!r})\n", timeout=5)
    assert delete.status == "failed" and keep.read_text() == "mine"
    for code in ("import socket\nsocket.socket()", "import subprocess\nsubprocess.run(['true'])"):
        assert run_program(code, timeout=5).status == "failed"
    inside = run_program("open('notes.txt', 'w').write('ok')\nassert open('notes.txt').read() == 'ok'\n", timeout=5)
    assert inside.passed
    assert list(own_tempdir.iterdir()) == []  # every program's directory removed
    assert isolation()["timeout_s"] > 0 and os.getpid()  # still here


def test_pass_at_1_runs_each_prediction_with_its_tests():
    tests = "assert double(2) == 4\nassert double(-1) == -2"
    assert pass_at_1([tests], [["def double(x):\n    return 2 * x"]]) == 1.0
    assert pass_at_1([tests, tests], [["def double(x):\n    return x + 2"], ["def double(x): return 2 * x"]]) == 0.5


def test_code_filters_follow_lm_evals():
    assert mbpp_code([["def f():\n    return 1\n```\nThat is all."]], [{}]) == [["def f():\n    return 1\n"]]
    doc = {"prompt": "def f(x):\n    \"\"\"Double.\"\"\"\n"}
    assert humaneval_program([["    return 2 * x\n```\nDone."]], [doc]) == [[doc["prompt"] + "    return 2 * x\n"]]


def test_generative_tasks_load_through_lm_eval_with_its_prompts(prepared_data):
    """lm-eval builds each task from igprune's YAML and the offline data: its prompts, few-shot examples, targets."""
    from lm_eval.tasks import get_task_dict

    from igprune.evaluation.tasks import task_manager

    tasks = get_task_dict(GENERATIVE, task_manager())
    mbpp, gsm8k, humaneval = (tasks[name] for name in GENERATIVE)
    assert [len(t.eval_docs) for t in (mbpp, gsm8k, humaneval)] == [500, 1319, 164]
    doc = mbpp.eval_docs[0]
    assert doc["task_id"] == 11 and mbpp.doc_to_text(doc).startswith("You are an expert Python programmer")
    assert mbpp.doc_to_target(doc) == "\n".join(doc["test_list"]) and mbpp.config.num_fewshot == 3
    assert "similar_elements" in mbpp.fewshot_context(doc, 3) and mbpp.config.unsafe_code
    doc = gsm8k.eval_docs[0]
    assert gsm8k.doc_to_text(doc).startswith("Q: Janet") and gsm8k.doc_to_target(doc) == "18"
    assert gsm8k.config.num_fewshot == 8 and "15 trees" in gsm8k.fewshot_context(doc, 8)
    assert gsm8k.config.generation_kwargs["max_gen_toks"] == 256
    doc = humaneval.eval_docs[0]
    assert humaneval.doc_to_target(doc).endswith("check(has_close_elements)")


def generation_requests(texts, max_gen_toks=6):
    kwargs = {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {"q": text}, (text, dict(kwargs)), 0, ("gen", doc, 1))
            for doc, text in enumerate(texts)]


def test_a_generation_batch_runs_rows_of_different_masks_as_each_alone():
    """One generate per batch, each row under its own prompt's mask: the same text as each prompt run alone."""
    tokenizer, model = tiny_tokenizer(), tiny_model()
    texts = ["def add(a, b):", "Stir the onions", "The striker scored", "for i in range(10):", "Bake the bread"]
    pruned = dynamic_model(model, tokenizer)
    lm = IGPruneLM(model, tokenizer, pruned, batch_size=8)
    lm.route_text = lambda doc: doc["q"]  # as a generative task routes: by the document's own text
    together = lm.generate_until(generation_requests(texts), disable_tqdm=True)
    clusters = pruned.clusters(texts)
    assert len(set(clusters)) > 1 and lm.batch_clusters == [len(set(clusters))]  # one batch, several masks
    alone = []
    for text, cluster in zip(texts, clusters, strict=True):
        with pruned.use_cluster(cluster):
            alone += IGPruneLM(model, tokenizer, batch_size=1).generate_until(generation_requests([text]),
                                                                              disable_tqdm=True)
    assert together == alone
    dense = IGPruneLM(model, tokenizer, batch_size=8).generate_until(generation_requests(texts), disable_tqdm=True)
    assert dense != together  # the masks changed what was written


def test_generative_tasks_run_routed_on_a_tiny_model(prepared_data, tmp_path):
    tokenizer, model = tiny_tokenizer(), tiny_model()
    bundle = routed_bundle(model)
    assert benchmark.resolve_tasks(["generative"]) == GENERATIVE
    run = dict(tasks=["generative"], limit=2, cache_dir=tmp_path, progress=False, max_new_tokens=4)
    out = benchmark.evaluate(model, tokenizer, bundle, **run)
    assert out["generation"]["chat_template"] is False and out["generation"]["max_new_tokens"] == 4
    for name, metric in (("mbpp", "pass_at_1"), ("gsm8k", "exact_match"), ("humaneval", "pass_at_1")):
        entry = out["tasks"][name]
        assert entry["metric"] == metric and entry["n"] == 2 and len(entry["items"]) == 2
        assert entry["value"] == 0.0  # a random model writes no working code and no right number
        assert len(entry["responses"]) == 2 and len(entry["clusters"]) == 2 and entry["batches"]
    again = benchmark.evaluate(model, tokenizer, bundle, **run)
    assert all(entry["cached"] for entry in again["tasks"].values())
    other = benchmark.evaluate(model, tokenizer, bundle, **{**run, "tasks": ["gsm8k"]}, batch_size=1)
    assert other["tasks"]["gsm8k"]["cached"] is False  # padded batches may generate otherwise: another result
    assert "| MBPP | GSM8K | HumanEval |" in results_table([out])
