"""Evaluation: the lm-eval model class, grouped dynamic scoring, perplexity, results files, cache and table."""

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tiny_models import TOPICS, tiny_model, tiny_tokenizer

from igprune.bundle import Bundle, fingerprint
from igprune.dynamic import DynamicPrunedModel
from igprune.evaluation import benchmark
from igprune.evaluation.harness import IGPruneLM, shared_text
from igprune.evaluation.perplexity import rows_per_batch, score_texts, token_nll
from igprune.evaluation.results import (
    ResultCache,
    gain_by_cluster,
    gain_by_cluster_cell,
    gains_table,
    load_results,
    paired_gain,
    percentage,
    picked_per_task_gain,
    results_table,
    save_results,
)
from igprune.evaluation.tasks import DOMAINS6
from igprune.files import IGPruneError
from igprune.routing import Router

QUESTIONS = [
    ("Question: What do you stir in butter?\nAnswer:", [" onions", " bricks", " the sea"]),
    ("Question: Which loop prints squares?\nAnswer:", [" for i in range(10)", " while False"]),
    ("Question: Who scored twice?\nAnswer:", [" the striker", " the referee", " nobody", " a goalkeeper"]),
    ("Question: How long is a marathon race?\nAnswer:", [" 42 km", " 5 km"]),
    ("Question: Why bake bread?\nAnswer:", [" to eat it", " to wear it"]),
]


class FakeEncoder:
    """Embeds a text by its length modulo 3 (one-hot), so routing is known and cheap; counts its calls."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return torch.eye(3)[[len(t) % 3 for t in texts]]


def requests(task="tiny"):
    return [Instance("loglikelihood", {}, (context, choice), i, (task, doc, 1))
            for doc, (context, choices) in enumerate(QUESTIONS) for i, choice in enumerate(choices)]


def dynamic_model(model, tokenizer):
    """Three clusters with different masks over the tiny model's 8 blocks, routed by FakeEncoder."""
    masks = torch.ones(3, 8, dtype=torch.bool)
    masks[0, [2, 5]] = False
    masks[1, [1, 6]] = False
    masks[2, [3]] = False
    return DynamicPrunedModel(model, tokenizer, Router(torch.eye(3), FakeEncoder()), masks)


def make_bundle(model, masks, method="sleb"):
    config = {"method": method, "model": "tiny", "fingerprint": fingerprint(model), "granularity": "block",
              "sparsity": float((~masks[0]).sum()) / masks.shape[1]}
    return Bundle(masks, torch.zeros(masks.shape[0], 0), config)


def routed_bundle(model):
    """Two clusters with different masks over the tiny model's 8 blocks, routed by the real encoder to random
    centroids."""
    masks = torch.ones(2, 8, dtype=torch.bool)
    masks[0, 3], masks[1, 5] = False, False
    bundle = make_bundle(model, masks, "ig-pruning")
    bundle.centroids = torch.nn.functional.normalize(torch.randn(2, 384, generator=torch.Generator().manual_seed(0)))
    bundle.config["encoder"] = "all-MiniLM-L6-v2"
    return bundle


def test_dense_and_static_all_on_give_lm_evals_own_loglikelihoods():
    tokenizer = tiny_tokenizer()
    reference = HFLM(pretrained=tiny_model(), tokenizer=tokenizer, batch_size=1).loglikelihood(requests())
    ours = IGPruneLM(tiny_model(), tokenizer, batch_size=4).loglikelihood(requests())
    model = tiny_model()
    static = DynamicPrunedModel.from_bundle(model, make_bundle(model, torch.ones(1, 8, dtype=torch.bool)), tokenizer)
    all_on = IGPruneLM(model, tokenizer, static, batch_size=3).loglikelihood(requests())
    assert [g for _, g in ours] == [g for _, g in reference] == [g for _, g in all_on]
    for (a, _), (b, _), (c, _) in zip(ours, reference, all_on, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and c == pytest.approx(b, abs=1e-4)


def test_grouped_batching_equals_one_request_at_a_time_under_its_routed_mask():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    pruned = dynamic_model(model, tokenizer)
    reqs = requests()
    grouped = IGPruneLM(model, tokenizer, pruned, batch_size=4).loglikelihood(reqs)
    single = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    clusters = [len(context) % 3 for context, _ in (r.args for r in reqs)]
    assert len(set(clusters)) == 3  # every mask is used, so a mix-up between groups would show
    for request, cluster, (value, greedy) in zip(reqs, clusters, grouped, strict=True):
        with pruned.control.masked(pruned.masks[cluster]):
            expected, expected_greedy = single.loglikelihood([request], disable_tqdm=True)[0]
        assert value == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    dense = IGPruneLM(tiny_model(), tokenizer, batch_size=4).loglikelihood(reqs)
    assert max(abs(a - b) for (a, _), (b, _) in zip(grouped, dense, strict=True)) > 1e-2  # the masks matter


def test_documents_are_routed_once_in_one_batch_and_counted_per_task():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    pruned = dynamic_model(model, tokenizer)
    lm = IGPruneLM(model, tokenizer, pruned, batch_size=4)
    lm.loglikelihood(requests("a"))
    lm.loglikelihood(requests("b"))
    encoder = pruned.router.encoder
    assert len(encoder.calls) == 1 and sorted(encoder.calls[0]) == sorted(q for q, _ in QUESTIONS)
    expected = {doc: len(context) % 3 for doc, (context, _) in enumerate(QUESTIONS)}
    assert lm.document_clusters("a") == expected and lm.document_clusters("b") == expected
    lm.reset_routing()
    assert lm.document_clusters("a") == {}


def test_choices_of_one_document_share_a_mask_even_when_contexts_differ():
    # winogrande: each choice fills the blank, so the contexts differ; the doc is routed by their common prefix
    assert shared_text(["The trophy fits the suitcase because the trophy", "The trophy fits the suitcase because "
                        "the suitcase"]) == "The trophy fits the suitcase because the "
    assert shared_text(["same", "same"]) == "same"
    assert shared_text(["Anna left", "Bob left"]) == "Anna left"  # nothing shared: the first text
    model, tokenizer = tiny_model(), tiny_tokenizer()
    lm = IGPruneLM(model, tokenizer, dynamic_model(model, tokenizer), batch_size=2)
    docs = [Instance("loglikelihood", {}, (ctx, " rest"), i, ("wg", 0, 1)) for i, ctx in enumerate(["ab x", "ab yy"])]
    assert len(set(lm.clusters(docs))) == 1


def test_perplexity_matches_hf_loss_and_does_not_depend_on_batching():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    texts = [t for ts in TOPICS.values() for t in ts]
    scores, _ = score_texts(model, tokenizer, texts, seq_len=30, batch_size=4)
    for text, (nll, n) in zip(texts, scores, strict=True):
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :30]
        assert n == ids.shape[1] - 1
        assert nll / n == pytest.approx(float(model(input_ids=ids, labels=ids).loss), rel=1e-4)
    one_by_one = token_nll(model, [tokenizer(t).input_ids[:30] for t in texts], batch_size=1)
    assert [n for _, n in one_by_one] == [n for _, n in scores]
    assert all(a == pytest.approx(b, rel=1e-4) for (a, _), (b, _) in zip(one_by_one, scores, strict=True))


def test_token_nll_with_a_context_scores_only_the_continuation():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    question = tokenizer("Q: what is added?").input_ids
    answer = tokenizer(" two and three", add_special_tokens=False).input_ids
    ids = question + answer
    (nll, n), = token_nll(model, [ids], 1, context=[len(question)])
    labels = torch.tensor([[-100] * len(question) + answer])
    assert n == len(answer)
    assert nll / n == pytest.approx(float(model(input_ids=torch.tensor([ids]), labels=labels).loss), rel=1e-4)
    (whole, _), = token_nll(model, [ids], 1)
    assert whole > nll  # the question's tokens count only without the context
    with pytest.raises(IGPruneError, match="at least one scored token"):
        token_nll(model, [ids], 1, context=[len(ids)])


def test_dynamic_perplexity_scores_each_text_under_its_routed_mask():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    pruned = dynamic_model(model, tokenizer)
    texts = [t for ts in TOPICS.values() for t in ts]
    scores, clusters = score_texts(model, tokenizer, texts, seq_len=20, batch_size=4, pruned=pruned)
    assert len(set(clusters)) > 1
    for text, cluster, (nll, _) in zip(texts, clusters, scores, strict=True):
        truncated = tokenizer.decode(tokenizer(text).input_ids[:20], skip_special_tokens=True)
        assert cluster == len(truncated) % 3  # routed by what is scored, not the whole text
        with pruned.control.masked(pruned.masks[cluster]):
            expected = token_nll(model, [tokenizer(text).input_ids[:20]], 1)[0][0]
        assert nll == pytest.approx(expected, rel=1e-4)


def test_logits_budget_caps_rows_per_batch():
    assert rows_per_batch(8, 16, 97) == 8
    assert rows_per_batch(8, 512, 152_000) == 1


# ------------------------------------------------------------------------------------ results files


def result(method="ig-pruning", average=50.0, model="m", limit=10, skipped=15, n_clusters=4):
    tasks = {t: {"metric": "acc_norm", "value": average, "stderr": 1.0, "n": limit}
             for t in ("openbookqa", "winogrande", "hellaswag", "piqa", "arc_easy", "arc_challenge")}
    return {"kind": "accuracy", "model": model, "method": method, "limit": limit, "n_clusters": n_clusters,
            "sparsity": {"blocks_skipped": skipped, "blocks_total": 60, "granularity": "block"},
            "tasks": tasks, "average": average, "percentage": None}


def test_results_file_round_trips(tmp_path):
    original = result()
    original["routing"] = {"piqa": {"0": 3, "2": 7}}
    path = save_results(tmp_path / "r.json", original)
    assert load_results(path) == {"format": "igprune-results/1", **original}
    (tmp_path / "bad.json").write_text('{"kind": "accuracy"}')
    with pytest.raises(IGPruneError, match="not an igprune results file"):
        load_results(tmp_path / "bad.json")


def test_percentage_is_relative_to_dense_on_the_same_settings():
    dense = result("dense", 60.0, skipped=0, n_clusters=None)
    assert percentage(result(average=45.0), dense) == pytest.approx(75.0)
    with pytest.raises(IGPruneError, match="limit"):
        percentage(result(limit=20), dense)
    with pytest.raises(IGPruneError, match="not a dense"):
        percentage(result(), result())


def test_paired_gain_counts_only_the_documents_that_differ():
    def scored(**tasks):
        return {"tasks": {t: {"value": 100 * sum(v) / len(v), "items": v} for t, v in tasks.items()}}

    reference = scored(piqa=[1.0, 0.0, 1.0, 0.0], arc_easy=[1.0, 1.0, 0.0, 0.0])
    assert paired_gain(reference, reference) == (0.0, 0.0)  # the same answers: no difference, no doubt about it
    better = scored(piqa=[1.0, 1.0, 1.0, 0.0], arc_easy=[1.0, 1.0, 0.0, 0.0])  # one more right, on piqa
    gain, stderr = paired_gain(better, reference)
    assert gain == pytest.approx((25.0 + 0.0) / 2)
    assert stderr == pytest.approx((100 ** 2 * 0.25 / 4) ** 0.5 / 2)  # piqa's differences 0,1,0,0: variance 1/4
    with pytest.raises(IGPruneError, match="same limit"):
        paired_gain(scored(piqa=[1.0, 0.0], arc_easy=[1.0, 0.0]), reference)
    with pytest.raises(IGPruneError, match="evaluate it again"):
        paired_gain(better, {"tasks": {t: {"value": 50.0} for t in reference["tasks"]}})
    with pytest.raises(IGPruneError, match="same tasks"):
        paired_gain(scored(piqa=[1.0, 0.0, 1.0, 0.0]), reference)


def test_picked_per_task_gain_credits_a_real_gain_but_not_luck():
    def scored(**tasks):
        return {"tasks": {t: {"value": 100 * sum(v) / len(v), "items": v} for t, v in tasks.items()}}

    reference = scored(piqa=[1.0, 0.0] * 10, arc_easy=[1.0, 0.0] * 10)
    lucky = scored(piqa=[1.0, 1.0] + [1.0, 0.0] * 9, arc_easy=[1.0, 0.0] * 10)  # right on one more document
    better = scored(piqa=[1.0] * 20, arc_easy=[1.0, 0.0] * 10)  # right on every piqa document
    assert paired_gain(lucky, reference)[0] == pytest.approx(2.5)  # picked on the scored documents, it gains
    assert picked_per_task_gain([lucky], reference) == (0.0, 0.0)  # picked on the other half, never
    gain, stderr = picked_per_task_gain([lucky, better], reference, repeats=20, seed=1)
    assert (gain, stderr) == pytest.approx(paired_gain(better, reference))  # piqa takes `better` from either half
    with pytest.raises(IGPruneError, match="same limit"):
        picked_per_task_gain([scored(piqa=[1.0, 0.0], arc_easy=[1.0, 0.0])], reference)


def test_gain_by_cluster_traces_a_difference_to_the_clusters_it_comes_from():
    reference = {"tasks": {"piqa": {"items": [1.0, 0.0, 1.0, 0.0]}, "arc_easy": {"items": [1.0, 1.0, 0.0, 0.0]}}}
    routed = {"tasks": {"piqa": {"items": [0.0, 1.0, 1.0, 1.0], "clusters": [2, 0, 0, 0]},
                        "arc_easy": {"items": [1.0, 0.0, 0.0, 0.0], "clusters": [0, 2, 2, 2]}}}
    assert gain_by_cluster(routed, reference) == {0: (4, 2.0), 2: (4, -2.0)}
    assert gain_by_cluster_cell(routed, reference) == "0: +2 of 4, 2: -2 of 4"  # as a table shows it
    assert gain_by_cluster_cell(reference, reference) == "–"  # a static mask's results: no clusters
    del routed["tasks"]["arc_easy"]["clusters"]
    with pytest.raises(IGPruneError, match="no per-document clusters"):
        gain_by_cluster(routed, reference)


def test_gains_table_puts_each_result_against_the_reference_and_dense():
    dense = result("dense", 60.0, skipped=0, n_clusters=None)
    sleb, ours, old = result("sleb", 40.0, n_clusters=1), result("ig-pruning", 45.0), result("ig-pruning", 45.0)
    for r, answers in ((dense, [1.0, 1.0, 1.0, 0.0]), (sleb, [1.0, 0.0, 0.0, 0.0]), (ours, [1.0, 1.0, 0.0, 0.0])):
        for entry in r["tasks"].values():
            entry["items"] = answers
    old["method_label"] = "from before items"
    lines = gains_table([dense, sleb, ours, old], sleb).splitlines()
    assert lines[0] == "| Configuration | Gain in average (points) | Gain in percentage of dense |"
    assert lines[2] == "| IG-Pruning (N=4) | +25.00 ± 10.21 | +41.67 ± 17.01 |"  # a fourth more right on each task
    assert lines[3] == "| from before items | – | – |" and len(lines) == 4  # dense and the reference: no rows
    for entry in ours["tasks"].values():  # routed: two documents to cluster 0, two to cluster 1
        entry["clusters"] = [0, 0, 1, 1]
    lines = gains_table([dense, sleb, ours], sleb, by_cluster=True).splitlines()
    assert lines[0].endswith("| Gain in percentage of dense | Net documents by cluster |")
    assert lines[2].endswith("| 0: +6 of 12 |")  # each task's one more right is its second document, in cluster 0


def test_table_has_the_papers_layout():
    dense = dict(result("dense", 60.0, skipped=0, n_clusters=None), percentage=100.0)
    sleb = dict(result("sleb", 40.0, n_clusters=1), percentage=40 / 60 * 100)
    ours = dict(result("ig-pruning", 45.0), percentage=75.0)
    lines = results_table([sleb, ours, dense]).splitlines()
    assert lines[0] == ("| Sparsity | Method | OBQA | WG | HS | PIQA | ARC-E | ARC-C | Average | Percentage |")
    assert lines[2].startswith("| 0.0% | Dense | 60.00 |") and lines[2].endswith("| 60.00 | 100.00% |")
    assert lines[3].startswith("| 25.0% | SLEB |") and lines[3].endswith("| 66.67% |")
    assert lines[4].startswith("|  | IG-Pruning (N=4) | 45.00 |")
    relabelled = results_table([dict(ours, method_label="IG-Pruning (N=4), first fit")]).splitlines()
    assert relabelled[2].startswith("| 25.0% | IG-Pruning (N=4), first fit | 45.00 |")
    # no stored percentage: taken from the dense row of the same model and limit; layer granularity is named
    layered = result("sleb", 30.0, n_clusters=1)
    layered["sparsity"]["granularity"] = "layer"
    rows = results_table([dense, layered, result(average=30.0, limit=20)]).splitlines()
    assert rows[3].startswith("| 25.0% | SLEB (layer) | 30.00 |") and rows[3].endswith("| 50.00% |")
    assert rows[4].startswith("|  | IG-Pruning (N=4) |") and rows[4].endswith("| – |")  # no dense at limit 20


# ---------------------------------------------------------------------------------- evaluate + cache


def test_evaluate_caches_each_task_and_compares_with_cached_dense(prepared_data, tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer()
    dense = benchmark.evaluate(tiny_model(), tokenizer, tasks=["arc_easy"], limit=4, cache_dir=tmp_path,
                               progress=False)
    assert dense["method"] == "dense" and dense["tasks"]["arc_easy"]["n"] == 4
    assert dense["tasks"]["arc_easy"]["cached"] is False and dense["percentage"] == 100.0
    assert 0 <= dense["tasks"]["arc_easy"]["value"] <= 100 and dense["tasks"]["arc_easy"]["stderr"] > 0
    items = dense["tasks"]["arc_easy"]["items"]  # each document's score, in document order: their mean is the value
    assert len(items) == 4 and set(items) <= {0.0, 1.0}
    assert 100 * sum(items) / 4 == pytest.approx(dense["tasks"]["arc_easy"]["value"])

    def no_lm_eval(*args, **kwargs):
        raise AssertionError("lm-eval ran although the result was cached")

    monkeypatch.setattr(benchmark, "_Runner", no_lm_eval)
    again = benchmark.evaluate(tiny_model(), tokenizer, tasks=["arc_easy"], limit=4, cache_dir=tmp_path,
                               kv_policy="drop", progress=False)
    assert again["tasks"]["arc_easy"]["cached"] is True
    assert again["tasks"]["arc_easy"]["value"] == dense["tasks"]["arc_easy"]["value"]
    with pytest.raises(AssertionError, match="lm-eval ran"):  # a different limit is another configuration
        benchmark.evaluate(tiny_model(), tokenizer, tasks=["arc_easy"], limit=3, cache_dir=tmp_path, progress=False)
    monkeypatch.undo()

    model = tiny_model()
    masks = torch.ones(1, 8, dtype=torch.bool)
    masks[0, 3] = False
    static = benchmark.evaluate(model, tokenizer, make_bundle(model, masks), tasks=["arc_easy"], limit=4,
                                cache_dir=tmp_path, progress=False)
    assert static["method"] == "sleb" and static["sparsity"]["blocks_skipped"] == 1 and static["routing"] is None
    assert static["dense_average"] == dense["average"]
    if dense["average"]:
        assert static["percentage"] == pytest.approx(100 * static["average"] / dense["average"])


def test_cloze_task_runs_routed_on_a_tiny_model(prepared_data, tmp_path):
    """A domain cloze task through lm-eval, every document routed by its context to one of two masks."""
    tokenizer, model = tiny_tokenizer(), tiny_model()
    bundle = routed_bundle(model)
    out = benchmark.evaluate(model, tokenizer, bundle, tasks=["cloze_math"], limit=6, cache_dir=tmp_path,
                             progress=False)
    assert out["tasks"]["cloze_math"]["metric"] == "acc_bytes" and out["tasks"]["cloze_math"]["n"] == 6
    assert 100 * sum(out["tasks"]["cloze_math"]["items"]) / 6 == pytest.approx(out["tasks"]["cloze_math"]["value"])
    clusters = out["tasks"]["cloze_math"]["clusters"]  # each document's cluster, in the order of its items
    assert len(clusters) == 6 and {str(c): clusters.count(c) for c in set(clusters)} == out["routing"]["cloze_math"]


def test_unknown_task_is_a_clear_error():
    with pytest.raises(IGPruneError, match="unknown task 'mmlu'"):
        benchmark.resolve_tasks(["mmlu"])
    assert benchmark.resolve_tasks(["arc_challenge,igprune_openbookqa"]) == ["igprune_openbookqa",
                                                                            "igprune_arc_challenge"]
    assert benchmark.resolve_tasks(["domains6"]) == DOMAINS6 and DOMAINS6[0] == "igprune_cloze_code"
    assert benchmark.resolve_tasks(["cloze_qa,piqa"]) == ["igprune_piqa", "igprune_cloze_qa"]  # column order


def test_table_shows_the_columns_of_the_tasks_it_has():
    dense = dict(result("dense", 60.0, skipped=0, n_clusters=None), percentage=100.0)
    dense["tasks"] = {"cloze_code": dense["tasks"]["piqa"], "cloze_qa": dense["tasks"]["piqa"]}
    assert results_table([dense]).splitlines()[0] == ("| Sparsity | Method | code | QA (SciQ) | Average | "
                                                      "Percentage |")


def test_cache_treats_another_stored_key_as_a_miss(tmp_path):
    cache = ResultCache(tmp_path)
    cache.put({"a": 1}, {"value": 1})
    assert cache.get({"a": 1}) == {"value": 1} and cache.get({"a": 2}) is None
    stored = cache.path({"a": 1})
    stored.write_text(stored.read_text().replace('"a": 1', '"a": 3'))
    assert cache.get({"a": 1}) is None


@pytest.mark.integration
def test_smollm2_dense_and_dynamic_on_one_task(prepared_data, tmp_path):
    from igprune.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    dense = benchmark.evaluate(model, tokenizer, tasks=["arc_easy"], limit=20, cache_dir=tmp_path, progress=False)
    assert 40 <= dense["tasks"]["arc_easy"]["value"] <= 80  # chance is 25
    masks = torch.ones(2, 60, dtype=torch.bool)
    masks[0, [41, 43]] = False
    masks[1, [45, 47]] = False
    bundle = make_bundle(model, masks, "ig-pruning")
    bundle.centroids = torch.nn.functional.normalize(torch.randn(2, 384, generator=torch.Generator().manual_seed(0)))
    bundle.config["encoder"] = "all-MiniLM-L6-v2"
    dynamic = benchmark.evaluate(model, tokenizer, bundle, tasks=["arc_easy"], limit=20, cache_dir=tmp_path,
                                 progress=False)
    assert sum(dynamic["routing"]["arc_easy"].values()) == 20
    assert dynamic["n_clusters"] == 2 and dynamic["percentage"] is not None


def test_table_shows_standard_errors_when_asked():
    result = {"kind": "accuracy", "model": "m", "method": "dense", "n_clusters": None, "percentage": 100.0,
              "sparsity": {"blocks_skipped": 0, "blocks_total": 8, "granularity": "block"},
              "tasks": {"piqa": {"value": 60.0, "stderr": 1.5}}, "average": 60.0, "average_stderr": 1.5}
    assert "60.00 ± 1.50" in results_table([result], stderr=True)
    assert "±" not in results_table([result])
