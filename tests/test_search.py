"""Cluster masks by search (finders/search.py), the choice among them (choosing.py) and IGPruner's search recipe on
a tiny model."""

import math

import pytest
import torch
from tiny_models import TOPICS, tiny_model, tiny_tokenizer

from igprune.bundle import Bundle
from igprune.choosing import ChooseConfig, bonferroni_margin, choose_masks, describe_choice
from igprune.clustering import ClusterConfig
from igprune.config import FitConfig
from igprune.files import IGPruneError, sha256_tensors
from igprune.finders import find_mask, make_calibration
from igprune.finders.search import SearchConfig, candidate_blocks, find_order_mask, search_cluster_masks
from igprune.pruner import IGPruner

MARGIN = ChooseConfig().margin  # what every choice uses unless told
OPTIONS = {"samples": 2, "seq_len": 16, "shared_samples": 3, "packing": "joined"}  # packing "texts" has its own test


def search(model, tok, groups, with_global=False, checkpoint=None, **options):
    """search_cluster_masks at half the blocks with OPTIONS changed by `options`."""
    return search_cluster_masks(model, tok, groups, 0.5, config=SearchConfig(**{**OPTIONS, **options}),
                                with_global=with_global, checkpoint=checkpoint, progress=False)


def topic_embeddings(self, texts):
    """One coordinate per topic of tiny_models.TOPICS: K-means finds the topics (and no encoder is loaded)."""
    return torch.tensor([[float(any(t in x for t in topic)) for topic in TOPICS.values()] for x in texts])


def search_fit(model, tok, groups, monkeypatch, choose=2, checkpoint_dir=None, **options):
    """IGPruner's search recipe on the groups' texts, clustered by topic, at half the blocks."""
    monkeypatch.setattr(IGPruner, "_embed", topic_embeddings)
    config = FitConfig(finder="search", sparsity=0.5, clusters=ClusterConfig(n_clusters=3, min_cluster_size=1),
                       search=SearchConfig(**{**OPTIONS, **options}), choose=ChooseConfig(samples=choose))
    return IGPruner(model, tok, config, checkpoint_dir=checkpoint_dir, progress=False).fit(
        [t for g in groups for t in g])


def fit_groups(pruner, groups):
    """The pruner's clusters as lists of texts, in its cluster order."""
    texts, labels = [t for g in groups for t in g], pruner.clustering_.labels.tolist()
    return [[t for t, label in zip(texts, labels, strict=True) if label == k] for k in range(3)]


@pytest.fixture(scope="module")
def setup():
    groups = [[f"{t} ({i})" for i, t in enumerate(texts * 4)] for texts in TOPICS.values()]  # 12 distinct each
    return tiny_model("llama", layers=4), tiny_tokenizer(), groups


def test_each_cluster_mask_is_its_own_sleb_continuing_the_shared_prefix(setup):
    model, tok, groups = setup
    found = search(model, tok, groups, shared_fraction=0.5)
    masks, log = found.masks, found.log
    assert found.global_mask is None and found.candidates.shape == (0, 8)
    assert masks.shape == (3, 8) and ((~masks).sum(1) == 4).all()
    assert log["shared_units"] == 2 and len(log["shared_order"]) == 2
    # the shared search scored equal shares of the clusters' own sequences
    own = [make_calibration(tok, texts, 2, 16, 0).input_ids for texts in groups]
    assert log["shared_calibration"]["sequences"] == 3
    for i, texts in enumerate(groups):
        alone = find_mask("sleb", model, tok, texts, 0.5, "block", progress=False, samples=2, seq_len=16,
                          start=log["shared_order"])
        assert torch.equal(masks[i], alone.masks[0])
        assert log["clusters"][i]["order"][:2] == log["shared_order"]
        assert log["clusters"][i]["calibration"]["sha256"] == make_calibration(tok, texts, 2, 16, 0, "x").info["sha256"]
    expected = torch.stack([rows[0] for rows in own])  # round-robin: the first sequence of each cluster
    assert log["shared_calibration"]["sha256"] == sha256_tensors(expected)


def test_lazy_searches_are_lazy_sleb_continuing_the_same_prefix(setup, tmp_path):
    model, tok, groups = setup
    found = search(model, tok, groups, with_global=True, shared_fraction=0.25, lazy=True, checkpoint=tmp_path)
    assert found.log["lazy"] is True
    shared = found.log["shared_order"]
    for i, texts in enumerate(groups):
        alone = find_mask("sleb", model, tok, texts, 0.5, "block", progress=False, samples=2, seq_len=16,
                          start=shared, lazy=True)
        assert torch.equal(found.masks[i], alone.masks[0])
        assert alone.logs["search"]["steps"][0]["scored"] == 8 - len(shared)  # a continued search's first step is full
    saved = (tmp_path / "cluster0" / "search.json").read_text()
    assert '"lazy": true' in saved and '"costs"' in saved


def test_a_choice_margin_keeps_the_global_mask_unless_another_wins_clearly(setup):
    model, tok, groups = setup
    masks = search(model, tok, groups, samples=1).masks
    candidates = torch.cat([masks, find_order_mask(model, ["attn0", "ffn0", "attn1", "ffn1"], "block")[None]])
    exclude = [make_calibration(tok, texts, 1, 16, 0).texts for texts in groups]
    free, free_log = choose_masks(model, tok, groups, candidates, 4, 16, exclude=exclude, default=3)
    z = free_log["z_best_vs_default"]
    assert free_log["default"] == 3 and free_log["margin"] == 0.0 and len(z) == 3
    assert all((zi == 0.0) == (c == 3) for zi, c in zip(z, free_log["chosen"], strict=True))  # only 3 vs 3 is 0
    strict, strict_log = choose_masks(model, tok, groups, candidates, 4, 16, exclude=exclude, default=3, margin=1e9)
    assert strict_log["chosen"] == [3, 3, 3] and torch.equal(strict, candidates[[3, 3, 3]])
    assert strict_log["perplexity"] == free_log["perplexity"]  # the margin changes the choice, not the scores
    cut = sorted(abs(x) for x in z)[1]  # between the z of the choices: some keep their best, some fall back
    _, mid_log = choose_masks(model, tok, groups, candidates, 4, 16, exclude=exclude, default=3, margin=cut)
    assert mid_log["chosen"] == [c if zi > cut else 3 for zi, c in zip(z, free_log["chosen"], strict=True)]
    with pytest.raises(IGPruneError, match="needs the default candidate"):
        choose_masks(model, tok, groups, candidates, 4, 16, exclude=exclude, margin=1.0)
    with pytest.raises(IGPruneError, match="choose margin must be a number"):
        IGPruner(model, tok, config={"choose": {"margin": -1}})
    # "auto": each cluster's bar is the Bonferroni t for its 4 rows and the 3 distinct masks beside the default
    duplicated = torch.cat([candidates, candidates[:1]])  # a repeated mask is no further chance to win
    _, auto_log = choose_masks(model, tok, groups, duplicated, 4, 16, exclude=exclude, default=3, margin="auto")
    distinct = len({tuple(m.tolist()) for m in duplicated}) - 1
    assert auto_log["margin"] == "auto" and auto_log["margins"] == [bonferroni_margin(4, distinct)] * 3
    assert auto_log["chosen"] == [c if zi > auto_log["margins"][0] else 3
                                  for zi, c in zip(z, free_log["chosen"], strict=True)]
    with pytest.raises(IGPruneError, match="or 'auto'"):
        IGPruner(model, tok, config={"choose": {"margin": "loose"}})


def test_describe_choice_names_each_clusters_mask_and_how_sure_it_was():
    log = {"chosen": [0, 2, 2, 5], "default": 4, "margin": 3.0, "z_best_vs_default": [4.5, 3.25, 0.0, 2.999]}
    assert describe_choice(log, 4) == ["own (z 4.500, bar 3.000)", "cluster 2 (z 3.250, bar 3.000)",
                                       "own (z 0.000, bar 3.000)", "candidate 1 (z 2.999, bar 3.000)"]
    auto = {**log, "chosen": [4, 1, 4, 4], "margin": "auto", "margins": [2.851, 3.147, 2.9, 3.0]}
    assert describe_choice(auto, 4)[:2] == ["global (z 4.500, bar 2.851)", "own (z 3.250, bar 3.147)"]
    assert describe_choice({"chosen": [1, 1]}, 2) == ["cluster 1", "own"]  # no global mask to leave: no z
    assert describe_choice({"chosen": [1], "z_best_vs_default": [0.5]}, 1) == ["global (z 0.500)"]  # no bar logged


def test_the_bonferroni_margin_rises_with_candidates_and_falls_with_rows():
    from scipy.stats import t

    assert bonferroni_margin(16, 1) == pytest.approx(t.ppf(0.95, 15))  # one rival: a one-sided t-test at 5%
    assert bonferroni_margin(16, 10) == pytest.approx(t.ppf(1 - 0.005, 15))
    assert bonferroni_margin(16, 1) < bonferroni_margin(16, 10) < bonferroni_margin(16, 100)
    assert bonferroni_margin(64, 10) < bonferroni_margin(16, 10) < bonferroni_margin(4, 10)
    assert bonferroni_margin(1, 10) == math.inf  # one row has no standard error: nothing leaves the default


def test_row_nll_adds_up_to_the_perplexity(setup):
    from igprune.finders import Scorer

    model, tok, groups = setup
    scorer = Scorer(model, make_calibration(tok, groups[0], 3, 16, 0), batch_size=2)
    mask = find_order_mask(model, ["attn1", "ffn2"], "block")
    pairs = scorer.row_nll(mask)
    assert len(pairs) == 3 and all(n == 15 for _, n in pairs)
    assert math.exp(sum(x for x, _ in pairs) / 45) == pytest.approx(scorer.perplexity(mask), rel=1e-5)


def test_each_cluster_keeps_the_mask_that_wins_on_text_no_search_scored(setup, tmp_path, monkeypatch):
    model, tok, groups = setup
    pruner = search_fit(model, tok, groups, monkeypatch, checkpoint_dir=tmp_path)
    masks, log, groups = pruner.masks_, pruner.find_log_, fit_groups(pruner, groups)
    assert (tmp_path / "searches" / "global" / "search.json").is_file()  # the global mask continued the shared search
    assert log["global_order"][:2] == log["shared_order"] and len(log["global_order"]) == 4
    searched = torch.stack([find_order_mask(model, c["order"], "block") for c in log["clusters"]])
    candidates = torch.cat([searched, find_order_mask(model, log["global_order"], "block")[None]])
    exclude = [make_calibration(tok, texts, 2, 16, 0).texts for texts in groups]
    expected, table = choose_masks(model, tok, groups, candidates, 2, 16, exclude=exclude, default=3, margin=MARGIN)
    assert torch.equal(masks, expected) and log["choose"]["chosen"] == table["chosen"]
    assert torch.equal(pruner.fallback_, candidates[3])  # the global mask, every cluster's default
    assert len(log["choose"]["perplexity"][0]) == 4  # three cluster masks and the global one


def test_extra_candidates_join_the_choice(setup, monkeypatch):
    model, tok, groups = setup
    extra = [["attn0", "ffn0", "attn1", "ffn1"], ["attn3", "ffn3", "ffn2", "attn2"]]  # the first or last layers
    pruner = search_fit(model, tok, groups, monkeypatch, candidates=extra)
    masks, log, groups = pruner.masks_, pruner.find_log_, fit_groups(pruner, groups)
    searched = torch.stack([find_order_mask(model, c["order"], "block") for c in log["clusters"]])
    pool = torch.cat([searched, find_order_mask(model, log["global_order"], "block")[None],
                      torch.stack([find_order_mask(model, blocks, "block") for blocks in extra])])
    exclude = [make_calibration(tok, texts, 2, 16, 0).texts for texts in groups]
    expected, table = choose_masks(model, tok, groups, pool, 2, 16, exclude=exclude, default=3, margin=MARGIN)
    assert torch.equal(masks, expected) and log["choose"]["chosen"] == table["chosen"]
    assert len(log["choose"]["perplexity"][0]) == 6 and log["candidates"] == extra
    assert candidate_blocks(pool[4]) == ["attn0", "ffn0", "attn1", "ffn1"]  # a mask back to its skipped blocks
    with pytest.raises(IGPruneError, match="must skip 4 blocks"):
        search(model, tok, groups, candidates=[["attn0"]])
    with pytest.raises(IGPruneError, match="only used when each cluster chooses"):
        search_fit(model, tok, groups, monkeypatch, choose=0, candidates=extra)


def test_metric_kl_reaches_every_search(setup):
    model, tok, groups = setup
    found = search(model, tok, groups, metric="kl")
    masks, log = found.masks, found.log
    assert log["metric"] == "kl"
    for i, texts in enumerate(groups):
        alone = find_mask("sleb", model, tok, texts, 0.5, "block", progress=False, samples=2, seq_len=16,
                          start=log["shared_order"], metric="kl")
        assert torch.equal(masks[i], alone.masks[0])
    with pytest.raises(IGPruneError, match="metric must be 'ppl' or 'kl'"):
        IGPruner(model, tok, config={"search": {"metric": "nll"}})


def test_packing_texts_reaches_every_search_and_the_choice(setup, monkeypatch):
    model, tok, groups = setup
    pruner = search_fit(model, tok, groups, monkeypatch, packing="texts")
    masks, log, groups = pruner.masks_, pruner.find_log_, fit_groups(pruner, groups)
    for i, texts in enumerate(groups):
        rows = make_calibration(tok, texts, 2, 16, 0, packing="texts")
        assert log["clusters"][i]["calibration"]["sha256"] == rows.info["sha256"]
        assert rows.info["sha256"] != make_calibration(tok, texts, 2, 16, 0).info["sha256"]
    exclude = [make_calibration(tok, texts, 2, 16, 0, packing="texts").texts for texts in groups]
    searched = torch.stack([find_order_mask(model, c["order"], "block") for c in log["clusters"]])
    candidates = torch.cat([searched, find_order_mask(model, log["global_order"], "block")[None]])
    expected, table = choose_masks(model, tok, groups, candidates, 2, 16, exclude=exclude, packing="texts",
                                   default=3, margin=MARGIN)
    assert torch.equal(masks, expected) and log["choose"] == table and table["packing"] == "texts"
    assert SearchConfig().packing == "texts"  # the default
    with pytest.raises(IGPruneError, match="packing must be"):
        IGPruner(model, tok, config={"search": {"packing": "windows"}})


def test_pooled_rows_are_half_of_each_clusters_search_and_come_from_the_others(setup):
    model, tok, groups = setup
    found = search(model, tok, groups, samples=4, pooled=0.5)
    own = [make_calibration(tok, texts, 4, 16, 0) for texts in groups]
    for i in range(3):
        others = [own[j].input_ids for j in range(3) if j != i]
        rows = torch.stack([own[i].input_ids[0], own[i].input_ids[1], others[0][0], others[1][0]])
        info = found.log["clusters"][i]["calibration"]
        assert info["sha256"] == sha256_tensors(rows) and info["sequences"] == 4 and "0.5 pooled" in info["source"]
        alone = find_mask("sleb", model, tok, [], 0.5, "block", progress=False, start=found.log["shared_order"],
                          calibration=type(own[i])(rows, info))
        assert torch.equal(found.masks[i], alone.masks[0])
    assert found.scored == [c.texts for c in own]  # the choice still judges on texts no search scored
    unpooled = search(model, tok, groups, samples=4)
    assert all(c["calibration"]["sha256"] == own[i].info["sha256"] for i, c in enumerate(unpooled.log["clusters"]))
    with pytest.raises(IGPruneError, match="search.pooled must be in"):
        search(model, tok, groups, pooled=1.0)


def test_a_shared_source_gives_the_shared_and_global_searches_its_passages(setup, prepared_data):
    from igprune.data import load_calibration

    model, tok, groups = setup
    found = search(model, tok, groups, with_global=True, shared_source="varied")
    rows = make_calibration(tok, load_calibration("varied", limit=12), 3, 16, 0, "varied", "texts")
    assert found.log["shared_calibration"]["sha256"] == rows.info["sha256"]
    shared = find_mask("sleb", model, tok, [], 0.5, "block", progress=False, calibration=rows)
    assert found.log["global_order"] == shared.logs["search"]["order"]  # both searches scored those rows only
    assert found.log["shared_order"] == shared.logs["search"]["order"][:len(found.log["shared_order"])]
    own = [make_calibration(tok, texts, 2, 16, 0, packing="joined") for texts in groups]
    assert [c["calibration"]["sha256"] for c in found.log["clusters"]] == [c.info["sha256"] for c in own]
    with pytest.raises(IGPruneError, match="search.shared_source 'nowhere' is not a calibration source"):
        search(model, tok, groups, shared_source="nowhere")


def test_shared_fraction_one_or_a_given_global_order_leaves_the_global_mask(setup, tmp_path):
    model, tok, groups = setup
    found = search(model, tok, groups, with_global=True, shared_fraction=1.0)
    assert torch.equal(found.global_mask, find_order_mask(model, found.log["global_order"], "block"))
    assert all(torch.equal(m, found.global_mask) for m in found.masks)
    order = ["attn3", "ffn3", "attn2", "ffn2"]
    log = search(model, tok, groups, with_global=True, checkpoint=tmp_path, prefix=order[:1], global_order=order).log
    assert log["global_order"] == order and not (tmp_path / "global").exists()  # given, not searched
    given = tmp_path / "given"  # the whole mask shared and given: every cluster starts there, nothing is searched
    found = search(model, tok, groups, with_global=True, checkpoint=given, shared_fraction=1.0, global_order=order)
    assert all(c["order"] == order for c in found.log["clusters"]) and found.log["shared_calibration"] is None
    assert all(torch.equal(m, find_order_mask(model, order, "block")) for m in found.masks) and not given.exists()
    with pytest.raises(IGPruneError, match="global mask skips 2 units but 4"):
        search(model, tok, groups, global_order=order[:2])


def test_searches_resume_from_their_checkpoint(setup, tmp_path):
    model, tok, groups = setup
    first = search(model, tok, groups, checkpoint=tmp_path).masks
    assert (tmp_path / "shared" / "search.json").is_file() and (tmp_path / "cluster2" / "search.json").is_file()
    assert torch.equal(first, search(model, tok, groups, checkpoint=tmp_path).masks)


def test_igpruner_with_the_search_finder_writes_a_routable_bundle(setup, monkeypatch, tmp_path):
    model, tok, groups = setup
    bundle = search_fit(model, tok, groups, monkeypatch, choose=0).to_bundle()
    assert bundle.config["finder"] == "search" and bundle.log_alpha is None and bundle.n_clusters == 3
    assert ((~bundle.masks).sum(1) == 4).all() and bundle.config["blocks_skipped"] == 4
    assert len(bundle.logs["search"]["clusters"]) == 3
    assert bundle.config["fit"]["search"]["shared_fraction"] == 0.5
    loaded = Bundle.load(bundle.save(tmp_path / "bundle"))  # passes every load check
    assert torch.equal(loaded.masks, bundle.masks) and loaded.config["finder"] == "search"


def test_bad_finder_settings_are_one_line_errors(setup):
    model, tok, groups = setup
    with pytest.raises(IGPruneError, match="finder must be 'l0' or 'search'"):
        IGPruner(model, tok, config={"finder": "magic"})
    with pytest.raises(IGPruneError, match="config.search has no option steps"):
        IGPruner(model, tok, config={"search": {"steps": 3}})
    with pytest.raises(IGPruneError, match="shared_fraction"):
        search(model, tok, groups, shared_fraction=1.5)
    with pytest.raises(IGPruneError, match="choose.samples must be a whole number"):
        IGPruner(model, tok, config={"choose": {"samples": -1}})
    with pytest.raises(IGPruneError, match="at least one calibration text"):
        search(model, tok, [groups[0], []])


@pytest.mark.parametrize("given", [{"global_order": ["attn0", "ffn1"]}, {"candidates": [["attn0", "ffn1"]]}])
def test_a_given_mask_at_another_sparsity_fails_before_anything_is_embedded(setup, tmp_path, given):
    model, tok, groups = setup

    def never(self, texts):
        raise AssertionError("embedded before the given masks were checked")

    config = FitConfig(finder="search", sparsity=0.5, clusters=ClusterConfig(n_clusters=3, min_cluster_size=1),
                       search=SearchConfig(**given), choose=ChooseConfig(samples=2))
    pruner = IGPruner(model, tok, config, checkpoint_dir=tmp_path / "fit.checkpoint", progress=False)
    pruner._embed = never.__get__(pruner)
    with pytest.raises(IGPruneError, match="skips? 2 .*4|must skip 4 blocks"):
        pruner.fit([t for g in groups for t in g])
    assert not (tmp_path / "fit.checkpoint").exists()


def test_a_given_prefix_replaces_the_shared_search(setup, tmp_path):
    model, tok, groups = setup
    found = search(model, tok, groups, checkpoint=tmp_path, prefix=["attn3"])
    masks, log = found.masks, found.log
    assert log["shared_order"] == ["attn3"] and not (tmp_path / "shared").exists()
    assert log["shared_calibration"] is None  # no shared search ran
    assert all(c["order"][0] == "attn3" and len(c["order"]) == 4 for c in log["clusters"])
    assert not masks[:, 6].any()  # attn3 is block 6
    with pytest.raises(IGPruneError, match="prefix names 5 units"):
        search(model, tok, groups, prefix=["attn0", "attn1", "attn2", "attn3", "ffn0"])


def test_choose_masks_judges_every_candidate_on_text_the_searches_did_not_score(setup):
    model, tok, groups = setup
    masks = search(model, tok, groups).masks
    exclude = [make_calibration(tok, texts, 2, 16, 0).texts for texts in groups]
    chosen, log = choose_masks(model, tok, groups, masks, samples=2, seq_len=16, exclude=exclude)
    assert chosen.shape == masks.shape and len(log["chosen"]) == 3
    for i, texts in enumerate(groups):
        fresh = make_calibration(tok, [t for t in texts if t not in exclude[i]], 2, 16, 0)
        best = min(range(3), key=lambda j: (log["perplexity"][i][j], j != i))
        assert log["chosen"][i] == best and torch.equal(chosen[i], masks[best])
        assert not set(exclude[i]) & set(fresh.texts)  # judged on other texts than its search scored
    same, log = choose_masks(model, tok, groups, masks[[0, 0, 0]], samples=2, seq_len=16, exclude=exclude)
    assert log["chosen"] == [0, 1, 2]  # a tie keeps each cluster's own mask
    with pytest.raises(IGPruneError, match="no text beyond what its search scored"):
        choose_masks(model, tok, [groups[0][:1]], masks[:1], samples=2, seq_len=16, exclude=[groups[0][:1]])
