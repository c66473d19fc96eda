"""Stage 2 and the bundle: clustering, routing, bundle round trips, dynamic inference under row masks."""

import warnings

import pytest
import torch
from tiny_models import TOPICS, three_mask_model, tiny_model, tiny_tokenizer
from transformers.generation.streamers import BaseStreamer

from igprune.blocks import patch
from igprune.bundle import Bundle
from igprune.clustering import cluster
from igprune.dynamic import DynamicPrunedModel, encode_prompts
from igprune.encoder import SentenceEncoder
from igprune.evaluation.results import Configuration
from igprune.files import IGPruneError
from igprune.pruner import IGPruner
from igprune.routing import Router, gate_radii

TEXTS = [t for texts in TOPICS.values() for t in texts]


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny 3-cluster IG-Pruning bundle, fitted once for the module."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    config = {"clusters": {"min_cluster_size": 1},
              "l0": {"shared_steps": 4, "cluster_steps": 6, "batch_size": 3, "seq_len": 24, "loss_positions": 8}}
    pruner = IGPruner(model, tokenizer, "paper", config=config, n_clusters=3, sparsity=0.25, progress=False).fit(TEXTS)
    path = pruner.save(tmp_path_factory.mktemp("bundle") / "b")
    return model, tokenizer, pruner, path


def test_kmeans_finds_the_topics_and_is_seeded(encoder):
    embeddings = encoder.encode(TEXTS)
    first = cluster(embeddings, 3, seed=0, min_size=1)
    again = cluster(embeddings, 3, seed=0, min_size=1)
    assert torch.equal(first.labels, again.labels)
    groups = first.labels.view(3, 3)  # texts come in topic order, three per topic
    assert all(len(set(row.tolist())) == 1 for row in groups) and len(set(groups[:, 0].tolist())) == 3


def test_small_clusters_merge_into_their_nearest_with_a_warning(encoder):
    embeddings = encoder.encode(TEXTS)
    with pytest.warns(UserWarning, match="merged"):
        result = cluster(embeddings, 5, seed=0, min_size=3)
    assert min(result.sizes) >= 3 and len(result.centroids) < 5
    assert sum(result.sizes) == len(TEXTS)
    assert torch.allclose(result.centroids[0], embeddings[result.labels == 0].mean(0), atol=1e-5)


def test_more_clusters_than_texts_is_a_clear_error(encoder):
    with pytest.raises(IGPruneError, match="only 9 calibration texts"):
        cluster(encoder.encode(TEXTS), 10)


def test_each_centroid_routes_to_itself():
    centroids = torch.randn(5, 16)
    clusters, distances = Router(centroids).route_embeddings(centroids)
    assert clusters.tolist() == [0, 1, 2, 3, 4] and torch.all(distances < 1e-5)


def test_a_gated_router_sends_inputs_beyond_a_clusters_radius_to_the_fallback():
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    members = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0], [10.0, 0.5], [10.0, 1.0]])
    radii = gate_radii(centroids, members, 0.6)
    assert radii.tolist() == [3.0, 1.0]  # a member's distance at or above the quantile: of 1..4 the 3rd, of 0.5, 1 1
    assert gate_radii(centroids, members, 1.0).tolist() == [4.0, 1.0]  # 1.0: only beyond every member
    router = Router(centroids, radii=radii)
    routes, distances = router.route_embeddings(torch.tensor([[0.0, 2.5], [0.0, 3.5], [10.0, 1.5], [9.0, 0.0]]))
    assert routes.tolist() == [0, 2, 2, 1] and router.n_routes == 3  # route 2: the fallback
    assert distances.tolist() == [2.5, 3.5, 1.5, 1.0]  # still the distance to the nearest centroid
    with pytest.raises(IGPruneError, match=r"quantile must be in \(0, 1\]"):
        gate_radii(centroids, members, 0.0)


def test_a_bundle_whose_routes_all_carry_one_mask_routes_without_embedding(fitted, tmp_path):
    model, tokenizer, _, path = fitted
    bundle = Bundle.load(path)
    one = bundle.masks[:1].clone()
    same = Bundle(one.repeat(3, 1), bundle.centroids, bundle.config, radii=None).with_gate(
        torch.ones(3), one[0], 1.0)  # every cluster and the fallback: one mask, as when every cluster kept it
    assert same.one_mask and not bundle.with_gate(torch.ones(3), one[0].roll(1), 1.0).one_mask
    dynamic = DynamicPrunedModel.from_bundle(model, same, tokenizer)
    assert dynamic.router.encoder is None and dynamic.clusters(TEXTS) == [0] * len(TEXTS)
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    with patch(model).masked(one[0]):
        expected = model(**batch).logits
    assert torch.allclose(dynamic(**batch).logits, expected, atol=1e-5)
    shown = Router.from_bundle(same, always_embed=True)  # `igprune route` still shows where inputs fall
    assert shown.encoder is not None and len({r.cluster for r in shown.route(TEXTS)}) > 1


def test_a_gated_bundle_round_trips_and_runs_the_fallback_beyond_the_radii(fitted, tmp_path):
    model, tokenizer, _, path = fitted
    bundle = Bundle.load(path)
    fallback = torch.ones(bundle.masks.shape[1], dtype=torch.bool)
    fallback[[1, 3]] = False  # as many blocks as the clusters skip: the FFNs of layers 0 and 1
    gated = bundle.with_gate(torch.zeros(3), fallback, 0.95)  # radius 0: every input is beyond it
    again = Bundle.load(gated.save(tmp_path / "gated"))
    assert torch.equal(again.radii, torch.zeros(3)) and torch.equal(again.route_masks[3], fallback)
    assert again.config["gate"] == {"quantile": 0.95}
    key = Configuration(model, bundle).content_sha256  # cached task results: a gate is another configuration
    assert Configuration(model, again).content_sha256 != key == Configuration(model, Bundle.load(path)).content_sha256
    dynamic = DynamicPrunedModel.from_bundle(model, again, tokenizer)
    assert dynamic.clusters(TEXTS[:3]) == [3, 3, 3] and torch.equal(dynamic.mask_for(3), fallback)
    with patch(model).masked(fallback):
        expected = model(**tokenizer([TEXTS[0]], return_tensors="pt")).logits
    assert torch.allclose(dynamic(**tokenizer([TEXTS[0]], return_tensors="pt")).logits, expected, atol=1e-5)
    alone = Bundle.load(again.global_bundle().save(tmp_path / "global"))  # the fallback as a static bundle
    assert alone.static and torch.equal(alone.masks[0], fallback) and alone.config["method"] == "global"
    assert DynamicPrunedModel.from_bundle(model, alone, tokenizer).clusters(TEXTS[:2]) == [0, 0]
    with pytest.raises(IGPruneError, match="no global mask"):
        bundle.global_bundle()
    with pytest.raises(IGPruneError, match="fallback mask skips 3 blocks"):
        bundle.with_gate(torch.zeros(3), fallback.logical_and(torch.arange(len(fallback)) != 5), 0.95)
    with pytest.raises(IGPruneError, match="not 3 finite distances"):
        bundle.with_gate(torch.zeros(2), fallback, 0.95)


def test_bundle_round_trips_bit_exactly(fitted, tmp_path):
    _, _, pruner, path = fitted
    bundle = Bundle.load(path)
    assert torch.equal(bundle.masks, pruner.masks_)
    assert torch.equal(bundle.centroids, pruner.clustering_.centroids)
    assert torch.equal(bundle.log_alpha, pruner.log_alpha_)
    assert bundle.config["n_clusters"] == 3 and bundle.config["blocks_skipped"] == 2
    again = Bundle.load(bundle.save(tmp_path / "copy"))
    assert again.config == bundle.config and torch.equal(again.masks, bundle.masks)
    assert (tmp_path / "copy" / "tensors.safetensors").read_bytes() == (path / "tensors.safetensors").read_bytes()


def test_bundle_refuses_another_model(fitted):
    _, tokenizer, _, path = fitted
    with pytest.raises(IGPruneError, match="another model"):
        DynamicPrunedModel.from_bundle(tiny_model("qwen2"), path, tokenizer)
    with pytest.raises(IGPruneError, match="other weights"):
        DynamicPrunedModel.from_bundle(tiny_model("llama", seed=7), path, tokenizer)


def test_not_a_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(IGPruneError, match="not an igprune bundle"):
        Bundle.load(tmp_path)


def test_a_mixed_batch_runs_each_row_under_its_mask_in_one_forward(fitted):
    dynamic = three_mask_model(fitted[0], fitted[1], fitted[3])
    model, tokenizer = dynamic.model, dynamic.tokenizer
    texts = [TEXTS[0], TEXTS[3], TEXTS[6], TEXTS[1]]
    routes = dynamic.clusters(texts)
    assert len(set(routes)) == 3
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    together = dynamic(batch.input_ids, batch.attention_mask).logits
    hook.remove()
    assert len(calls) == 1
    control = patch(model)
    for i, text in enumerate(texts):
        one = tokenizer([text], return_tensors="pt")
        with control.masked(dynamic.masks[routes[i]]):
            alone = model(**one).logits[0]
        n = one.input_ids.shape[1]
        assert torch.allclose(together[i, :n], alone, atol=1e-4)
    with pytest.raises(IGPruneError, match="one text per row"):
        dynamic(batch.input_ids, batch.attention_mask, texts=texts[:2])


def test_generate_routes_each_prompt_and_keeps_order(fitted):
    model, tokenizer, _, path = fitted
    dynamic = DynamicPrunedModel.from_bundle(model, path, tokenizer, kv_policy="drop")
    prompts = [TEXTS[6], TEXTS[0], TEXTS[3]]
    together = dynamic.generate_text(prompts, max_new_tokens=6)
    alone = [dynamic.generate_text([p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    with pytest.raises(IGPruneError, match="empty prompt"):
        dynamic.generate_text([""])


class Collect(BaseStreamer):
    def __init__(self):
        self.steps = []

    def put(self, value):
        self.steps.append(value.clone())

    def end(self):
        pass


@pytest.mark.parametrize("kv_policy", ["keep", "drop"])
def test_a_mixed_batch_is_one_generate_with_everything_it_returns(fitted, kv_policy):
    """Prompts of three clusters: one HF generate returns what it returns for one mask (dicts with scores,
    streamers, repeated sequences), and each row equals its prompt generated alone under its mask."""
    dynamic = three_mask_model(fitted[0], fitted[1], fitted[3])
    dynamic.kv_policy = kv_policy
    prompts = [TEXTS[6], TEXTS[0], TEXTS[3]]
    assert sorted(dynamic.clusters(prompts)) == [0, 1, 2]
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)

    def run(texts, **extra):
        batch = encode_prompts(dynamic.tokenizer, dynamic.config, texts, 6)
        return batch.input_ids.shape[1], dynamic.generate(batch.input_ids, batch.attention_mask, texts=texts,
                                                          **settings, **extra)

    streamer = Collect()
    width, out = run(prompts, return_dict_in_generate=True, output_scores=True, streamer=streamer)
    assert len(out.scores) == 6 and out.scores[0].shape[0] == 3
    assert torch.equal(torch.cat(streamer.steps[1:], dim=-1).view(6, 3).T, out.sequences[:, width:])
    _, beams = run(prompts, num_beams=2, num_return_sequences=2)
    for i, prompt in enumerate(prompts):
        n, alone = run([prompt], return_dict_in_generate=True)
        assert out.sequences[i, width:].tolist() == alone.sequences[0, n:].tolist()
        _, alone_beams = run([prompt], num_beams=2, num_return_sequences=2)
        assert beams[2 * i:2 * i + 2, width:].tolist() == alone_beams[:, n:].tolist()


def test_prompt_longer_than_the_context_keeps_its_end_with_a_warning(fitted):
    model, tokenizer, _, path = fitted
    dynamic = DynamicPrunedModel.from_bundle(model, path, tokenizer)
    room = model.config.max_position_embeddings - 4
    tail = TEXTS[0]
    long = " ".join(TEXTS * 40) + " " + tail
    assert len(tokenizer(long).input_ids) > room
    sides = tokenizer.padding_side, tokenizer.truncation_side
    with pytest.warns(UserWarning, match="only their last"):
        out = dynamic.generate_text([long], max_new_tokens=4)
    assert (tokenizer.padding_side, tokenizer.truncation_side) == sides  # the shared tokenizer is left as it was
    # the kept end, routed as the full prompt is, continues exactly as that end alone would
    ids = torch.tensor([tokenizer(long).input_ids[-room:]])
    with dynamic.control.masked(dynamic.mask_for(dynamic.route([long])[0].cluster)):
        ref = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out[0] == tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    with pytest.raises(IGPruneError, match="fewer new tokens"):
        dynamic.generate_text([tail], max_new_tokens=model.config.max_position_embeddings)


def test_unpruned_prompts_are_encoded_by_the_same_rule():
    """`igprune generate --model` (no bundle) goes through encode_prompts too: end kept, left padding."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    room = model.config.max_position_embeddings - 4
    long = " ".join(TOPICS["code"] * 200)
    with pytest.warns(UserWarning, match="only their last"):
        batch = encode_prompts(tokenizer, model.config, [long, "short"], max_new_tokens=4)
    assert batch.input_ids.shape == (2, room)
    assert batch.input_ids[0].tolist() == tokenizer(long).input_ids[-room:]
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[1, -1] == 1  # padded on the left


def test_fit_rejects_bad_input():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    with pytest.raises(IGPruneError, match="no calibration texts"):
        IGPruner(model, tokenizer, n_clusters=2, progress=False).fit(["", "  "])
    with pytest.raises(IGPruneError, match="sparsity"):
        IGPruner(model, tokenizer, n_clusters=2, sparsity=1.0, progress=False).fit(TEXTS)
    with warnings.catch_warnings(), pytest.raises(IGPruneError, match="clusters but only"):
        warnings.simplefilter("ignore")
        IGPruner(model, tokenizer, n_clusters=20, progress=False).fit(TEXTS + [""])


def test_resumed_fit_reuses_embeddings_and_finished_masks(tmp_path, monkeypatch):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    config = {"clusters": {"min_cluster_size": 1},
              "l0": {"shared_steps": 2, "cluster_steps": 2, "batch_size": 3, "seq_len": 24, "loss_positions": 8}}

    def fit():
        return IGPruner(model, tokenizer, "paper", config=config, n_clusters=3, checkpoint_dir=tmp_path,
                        progress=False).fit(TEXTS)

    first = fit()
    assert (tmp_path / "embeddings.safetensors").is_file() and (tmp_path / "masks" / "trainer.json").is_file()

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder should not run again")

    monkeypatch.setattr("igprune.pruner.SentenceEncoder", no_encoder)
    again = fit()
    assert torch.equal(again.masks_, first.masks_)
