"""Static baselines: exact counts, the identity layer goes first, EvoPress is seeded and elitist, scoring is exact."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TOPICS, tiny_model, tiny_tokenizer

from igprune.blocks import patch
from igprune.bundle import Bundle
from igprune.dynamic import DynamicPrunedModel
from igprune.files import IGPruneError, read_json
from igprune.finders import METHODS, Scorer, find_mask, make_calibration
from igprune.finders.base import SearchSpace
from igprune.masks import skipped_blocks

TEXTS = [t for texts in TOPICS.values() for t in texts]
FAST = {  # per method: the smallest settings that still exercise every step
    "sleb": {},
    "shortened-ppl": {},
    "shortened-taylor": {"keep_first": 0, "keep_last": 0},
    "evopress": {"generations": 3, "offspring": 3, "population": 4, "stages": [[2, 2]]},
    "static-l0": {"shared_steps": 4, "cluster_steps": 2, "batch_size": 3},
}
SMALL = {"samples": 4, "seq_len": 24}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=6), tiny_tokenizer()


def run(method, model, tokenizer, texts=TEXTS, sparsity=0.25, granularity="block", **options):
    return find_mask(method, model, tokenizer, texts, sparsity, granularity, progress=False,
                     **{**SMALL, **FAST[method], **options})


@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_skips_exactly_the_requested_units(llama, method, granularity, tmp_path):
    model, tokenizer = llama
    bundle = run(method, model, tokenizer, sparsity=0.34, granularity=granularity, checkpoint=tmp_path / "progress")
    assert (tmp_path / "progress").is_dir() == METHODS[method].resumes  # sleb, evopress and static-l0
    mask = bundle.masks[0]
    assert bundle.masks.shape == (1, 12) and bundle.centroids.shape == (1, 0)
    # round(0.34 * 12) = 4 blocks, or round(0.34 * 6) = 2 layers = 4 blocks
    assert skipped_blocks(mask)["total"] == 4 == bundle.config["blocks_skipped"]
    if granularity == "layer":
        assert torch.equal(mask[0::2], mask[1::2])  # whole layers only
    assert len(bundle.logs["search"]["order"]) == (4 if granularity == "block" else 2)
    cfg = bundle.config
    assert cfg["method"] == method and cfg["granularity"] == granularity and cfg["seed"] == 0
    assert cfg["calibration"]["sequences"] == 4 and cfg["fingerprint"]["num_layers"] == 6
    # the bundle round-trips and runs through the IG-Pruning inference path without an encoder
    loaded = Bundle.load(bundle.save(tmp_path / "b"))
    assert loaded.static and torch.equal(loaded.masks, bundle.masks)
    dynamic = DynamicPrunedModel.from_bundle(model, loaded, tokenizer)
    assert len(dynamic.generate_text(["Bake the"], max_new_tokens=3)) == 1


def test_evopress_keeps_the_requested_split_of_attention_and_ffn(llama):
    model, tokenizer = llama
    bundle = run("evopress", model, tokenizer, sparsity=0.34, attn_off=3)
    assert (bundle.config["attn_skipped"], bundle.config["ffn_skipped"]) == (3, 1)
    kinds = {g["off"][0][:3] for g in bundle.logs["search"]["generations"]}
    assert kinds <= {"att", "ffn"}


def model_made_text(model, tokenizer, n=6, length=48, seed=0):
    """Text sampled from the model itself: the dense model is then the best predictor of it (Gibbs)."""
    torch.manual_seed(seed)
    start = torch.full((n, 1), tokenizer.bos_token_id)
    out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, max_new_tokens=length,
                         min_new_tokens=length, top_k=0, pad_token_id=0)
    return [t for t in tokenizer.batch_decode(out, skip_special_tokens=True) if t.strip()]


@pytest.fixture(scope="module")
def identity_layer():
    """A tiny model whose layer 2 adds nothing (o_proj and down_proj zero), with text it wrote itself."""
    model, tokenizer = tiny_model("llama", layers=5, seed=1), tiny_tokenizer()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    return model, tokenizer, model_made_text(model, tokenizer)


@pytest.mark.parametrize("method", ["sleb", "shortened-ppl", "shortened-taylor"])
def test_a_layer_that_does_nothing_is_removed_first(identity_layer, method):
    model, tokenizer, texts = identity_layer
    options = {"samples": 6, "seq_len": 40}
    layer = run(method, model, tokenizer, texts, sparsity=0.2, granularity="layer", **options)
    assert layer.logs["search"]["order"] == ["layer2"]
    block = run(method, model, tokenizer, texts, sparsity=0.2, granularity="block", **options)
    assert sorted(block.logs["search"]["order"]) == ["attn2", "ffn2"]


def test_sleb_extended_from_a_smaller_search_is_the_larger_search(llama):
    model, tokenizer = llama
    small = run("sleb", model, tokenizer, sparsity=0.17)  # 2 of 12 blocks
    full = run("sleb", model, tokenizer, sparsity=0.34)  # 4 of 12
    extended = run("sleb", model, tokenizer, sparsity=0.34, start=small.logs["search"]["order"])
    assert full.logs["search"]["order"][:2] == small.logs["search"]["order"]
    assert extended.logs["search"]["order"] == full.logs["search"]["order"]
    assert torch.equal(extended.masks, full.masks)
    assert extended.logs["search"]["steps"] == full.logs["search"]["steps"][2:]  # only the new steps ran
    assert extended.config["calibration"]["sha256"] == small.config["calibration"]["sha256"]
    with pytest.raises(IGPruneError, match="not a candidate"):
        run("sleb", model, tokenizer, start=["attn99"])
    with pytest.raises(IGPruneError, match="at most"):
        run("sleb", model, tokenizer, sparsity=0.17, start=["attn1", "attn1"])


def test_sleb_by_kl_removes_the_unit_whose_removal_is_closest_to_dense(llama):
    model, tokenizer = llama
    by_kl = run("sleb", model, tokenizer, sparsity=0.09, metric="kl")  # 1 of 12 blocks: one step
    scorer = Scorer(model, make_calibration(tokenizer, TEXTS, SMALL["samples"], SMALL["seq_len"]))
    space = SearchSpace(12, "block")
    kl = {space.name(u): scorer.kl(space.mask([u])) for u in space.candidates()}
    ppl = {space.name(u): scorer.perplexity(space.mask([u])) for u in space.candidates()}
    step = by_kl.logs["search"]["steps"][0]
    assert by_kl.logs["search"]["order"] == [min(kl, key=kl.get)] and step["metric"] == "kl"
    assert step["score"] == pytest.approx(min(kl.values()))
    by_ppl = run("sleb", model, tokenizer, sparsity=0.09)
    assert by_ppl.logs["search"]["order"] == [min(ppl, key=ppl.get)] and by_ppl.logs["search"]["metric"] == "ppl"
    with pytest.raises(IGPruneError, match="metric must be 'ppl' or 'kl'"):
        run("sleb", model, tokenizer, metric="nll")


def test_lazy_sleb_scores_only_the_candidates_whose_last_cost_could_still_win():
    """Costs that compound (each removal costs at least what it did a step before) make the lazy step exact."""
    from igprune.finders.sleb import _step

    now = {"a": 5.0, "b": 2.0, "c": 1.5, "d": 9.0, "e": 7.0, "f": 1.2}  # cost of removing each unit now
    last = {"a": 0.1, "b": 0.2, "c": 1.4, "d": 3.0, "e": 6.0, "f": float("-inf")}  # f was never scored
    scored = []

    def score(unit):
        scored.append(unit)
        return 10.0 + now[unit]

    scores = _step(list(now), score, 10.0, last, chunk=2)
    assert min(scores, key=scores.get) == min(now, key=now.get) == "f"  # the full step's choice
    # f, a (never / cheapest), then b, c: the best fresh cost 1.2 is below d's last cost 3.0, so d and e never run
    assert scored == ["f", "a", "b", "c"]
    assert _step(list(now), score, 10.0, None).keys() == now.keys()  # without costs every candidate is scored


def test_lazy_sleb_scores_fewer_masks_and_records_how_many_each_step(llama):
    model, tokenizer = llama
    full = run("sleb", model, tokenizer, sparsity=0.5)  # 6 of 12 blocks
    lazy = run("sleb", model, tokenizer, sparsity=0.5, lazy=True)
    steps = lazy.logs["search"]["steps"]
    assert len(lazy.logs["search"]["order"]) == 6 and skipped_blocks(lazy.masks[0])["total"] == 6
    assert steps[0]["scored"] == 12 and all(s["scored"] <= 12 - i for i, s in enumerate(steps))
    assert lazy.logs["search"]["masks_scored"] < full.logs["search"]["masks_scored"]
    assert lazy.logs["search"]["order"][0] == full.logs["search"]["order"][0]  # the first step scores every unit
    assert lazy.config["options"]["lazy"] is True
    with pytest.raises(IGPruneError, match="lazy must be true or false"):  # `--option lazy=yes` is a string
        run("sleb", model, tokenizer, lazy="yes")


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("method, options", [("sleb", {}), ("sleb", {"lazy": True}), ("evopress", {})])
def test_an_interrupted_search_continues_from_its_checkpoint_to_the_same_result(llama, method, options, tmp_path,
                                                                                monkeypatch):
    model, tokenizer = llama
    uninterrupted = run(method, model, tokenizer, sparsity=0.34, checkpoint=tmp_path / "uninterrupted", **options)
    checkpoint, scored = tmp_path / "interrupted", []
    real_score = Scorer._score

    def stop_midway(self, *args):
        scored.append(1)
        if len(scored) > 3 * uninterrupted.logs["search"]["masks_scored"] // 4:  # three quarters through
            raise Interrupted
        return real_score(self, *args)

    monkeypatch.setattr(Scorer, "_score", stop_midway)
    with pytest.raises(Interrupted):
        run(method, model, tokenizer, sparsity=0.34, checkpoint=checkpoint, **options)
    monkeypatch.undo()
    assert (checkpoint / "search.json").is_file()
    resumed = run(method, model, tokenizer, sparsity=0.34, checkpoint=checkpoint, **options)
    assert torch.equal(resumed.masks, uninterrupted.masks)
    log, full = resumed.logs["search"], uninterrupted.logs["search"]
    assert log["order"] == full["order"] and log["resumed"] and not full["resumed"]
    assert log["masks_scored"] < full["masks_scored"]  # the finished steps were not scored again
    key = "steps" if method == "sleb" else "generations"
    assert log[key] == full[key]
    # the whole saved state agrees too: evopress's fitness cache and random stream
    assert read_json(checkpoint / "search.json") == read_json(tmp_path / "uninterrupted" / "search.json")
    with pytest.raises(IGPruneError, match="another search"):  # other settings never reuse the progress
        run(method, model, tokenizer, sparsity=0.34, checkpoint=checkpoint, samples=3, **options)


def test_evopress_same_seed_same_result_and_best_fitness_never_worsens(llama):
    model, tokenizer = llama
    options = {"generations": 6, "offspring": 4, "population": 6}
    first = run("evopress", model, tokenizer, sparsity=0.34, seed=3, **options)
    again = run("evopress", model, tokenizer, sparsity=0.34, seed=3, **options)
    assert torch.equal(first.masks, again.masks)
    curve = [g["best"] for g in first.logs["search"]["generations"]]
    assert curve == [g["best"] for g in again.logs["search"]["generations"]]
    assert len(curve) == 7 and all(b <= a for a, b in zip(curve, curve[1:], strict=False))
    assert first.logs["search"]["best_fitness"] == curve[-1] >= 0


def test_calibration_packing_joined_cuts_the_joined_texts_and_texts_starts_every_row_at_a_text():
    tokenizer = tiny_tokenizer()
    eos = [tokenizer.eos_token_id]
    joined = make_calibration(tokenizer, TEXTS, 3, 12, seed=1)
    stream = [t for text in joined.texts for t in tokenizer(text, add_special_tokens=False).input_ids + eos]
    assert joined.input_ids.tolist() == [stream[i:i + 12] for i in (0, 12, 24)]
    assert joined.info["packing"] == "joined"

    rows = make_calibration(tokenizer, TEXTS, 3, 12, seed=1, packing="texts")
    assert rows.input_ids.shape == (3, 12) and rows.info["packing"] == "texts"
    starts = [tokenizer(t, add_special_tokens=True).input_ids for t in rows.texts]
    row, used = 0, 0  # each row opens with the next unused text, as an evaluated input is tokenized
    while row < 3:
        assert rows.input_ids[row, :min(12, len(starts[used]))].tolist() == starts[used][:12]
        filled = 0
        while filled < 12:  # a short text is followed by the next ones, EOS-joined
            filled += len(tokenizer(rows.texts[used], add_special_tokens=filled == 0).input_ids) + 1
            used += 1
        row += 1
    assert used == len(rows.texts)
    with pytest.raises(IGPruneError, match="packing must be one of"):
        make_calibration(tokenizer, TEXTS, 3, 12, packing="windows")


def test_ppl_and_kl_match_a_direct_computation_and_prefix_reuse_changes_nothing():
    for arch in ("llama", "gemma3_text"):
        model, tokenizer = tiny_model(arch, layers=4), tiny_tokenizer()
        calibration = make_calibration(tokenizer, TEXTS, 3, 20)
        scorer = Scorer(model, calibration, batch_size=2, top_k=97, chunk_tokens=7)
        space = SearchSpace(8, "block")
        mask = space.mask([1, 4])
        with torch.no_grad(), patch(model).masked(mask):
            logits = model(input_ids=calibration.input_ids).logits.float()
        with torch.no_grad():
            dense = model(input_ids=calibration.input_ids).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), calibration.input_ids[:, 1:].flatten())
        assert math.isclose(scorer.perplexity(mask), math.exp(nll), rel_tol=1e-4)
        kl = F.kl_div(logits.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        assert math.isclose(scorer.kl(mask), kl.mean().item(), rel_tol=1e-3)  # top_k = vocab: exact
        assert abs(scorer.kl(space.mask([]))) < 1e-6
        candidates = [space.mask([1, u]) for u in range(8) if u != 1]
        plain = [scorer.score(m, metric) for m in candidates for metric in ("ppl", "kl")]
        with scorer.prefix(space.mask([1]), metric="ppl") as base:
            reused = [scorer.score(m, metric) for m in candidates for metric in ("ppl", "kl")]
        assert base == pytest.approx(scorer.perplexity(space.mask([1])), rel=1e-6)
        assert reused == pytest.approx(plain, rel=1e-5)


def test_topk_kl_is_a_lower_bound_of_the_full_kl():
    model, tokenizer = tiny_model("llama", layers=4), tiny_tokenizer()
    calibration = make_calibration(tokenizer, TEXTS, 3, 20)
    mask = SearchSpace(8, "block").mask([2, 3])
    full, top4 = Scorer(model, calibration, top_k=97).kl(mask), Scorer(model, calibration, top_k=4).kl(mask)
    assert 0 < top4 <= full + 1e-6


def test_taylor_leaves_no_gradients_behind(llama):
    model, tokenizer = llama
    run("shortened-taylor", model, tokenizer)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_bad_input_is_a_one_line_error(llama):
    model, tokenizer = llama
    with pytest.raises(IGPruneError, match="would skip all"):
        run("sleb", model, tokenizer, sparsity=0.95, granularity="layer")
    with pytest.raises(IGPruneError, match="sparsity"):
        run("sleb", model, tokenizer, sparsity=1.0)
    with pytest.raises(IGPruneError, match="no calibration texts"):
        run("shortened-ppl", model, tokenizer, texts=[])
    with pytest.raises(IGPruneError, match="no calibration texts"), pytest.warns(UserWarning, match="empty"):
        run("shortened-ppl", model, tokenizer, texts=["", "   "])
    with pytest.raises(IGPruneError, match="unknown method"):
        find_mask("magic", model, tokenizer, TEXTS, 0.25)
    with pytest.raises(IGPruneError, match="no option generations"):
        run("sleb", model, tokenizer, generations=3)
    with pytest.raises(IGPruneError, match="candidates"):  # the "+" heuristic protects all 6 layers
        run("shortened-taylor", model, tokenizer, keep_first=4, keep_last=2)
    with pytest.raises(IGPruneError, match="attn_off"):
        run("evopress", model, tokenizer, sparsity=0.34, attn_off=5)
