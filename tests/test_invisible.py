"""After any igprune call the user's model is exactly as it was; inside `masked` it is the user's own HF model."""

import pytest
import torch
from tiny_models import TOPICS, three_mask_model, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, pipeline

import igprune
from igprune.blocks import ATTN, FFN, masked, patch, unpatch
from igprune.dynamic import DynamicPrunedModel, encode_prompts
from igprune.evaluation.perplexity import score_texts
from igprune.export import prune_model
from igprune.finders import find_mask
from igprune.pruner import IGPruner

TEXTS = [t for texts in TOPICS.values() for t in texts]
FIT = {"clusters": {"min_cluster_size": 1},
       "l0": {"shared_steps": 3, "cluster_steps": 3, "batch_size": 3, "seq_len": 16, "loss_positions": 8}}


def user_model(arch="llama"):
    """A model as from_pretrained gives it: weights trainable, in eval mode."""
    return tiny_model(arch).requires_grad_(True)


def snapshot(model):
    """Everything about a model an igprune call must leave alone."""
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "params": [(n, p.requires_grad, None if p.grad is None else p.grad.clone())
                       for n, p in model.named_parameters()],
            "classes": [type(m) for m in model.modules()],
            "attributes": [sorted(vars(m)) for m in model.modules()],
            "training": model.training}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert list(after["state"]) == list(before["state"])
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert [(n, r) for n, r, _ in after["params"]] == [(n, r) for n, r, _ in before["params"]]
    assert all((a is None) == (b is None) and (a is None or torch.equal(a, b))
               for (_, _, a), (_, _, b) in zip(after["params"], before["params"], strict=True))
    assert after["classes"] == before["classes"]
    assert after["attributes"] == before["attributes"]
    assert after["training"] == before["training"]


def some_mask(n_blocks=8):
    mask = torch.ones(n_blocks, dtype=torch.bool)
    mask[2 * 1 + ATTN] = False
    mask[2 * 2 + FFN] = False
    mask[2 * 3 + ATTN] = mask[2 * 3 + FFN] = False  # a whole layer: export removes it
    return mask


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    model, tokenizer = user_model(), tiny_tokenizer()
    before = snapshot(model)
    pruner = IGPruner(model, tokenizer, "paper", config=FIT, n_clusters=3, progress=False).fit(TEXTS)
    return model, tokenizer, before, pruner.save(tmp_path_factory.mktemp("b") / "bundle")


def test_fit_leaves_the_model_as_it_was(fitted):
    model, _, before, _ = fitted
    assert_unchanged(model, before)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_dynamic_model_leaves_the_model_as_it_was(fitted):
    model, tokenizer, _, path = fitted
    before = snapshot(model)
    pruned = igprune.DynamicPrunedModel.from_bundle(model, path, tokenizer)
    pruned.generate_text(TEXTS[:3], max_new_tokens=3)
    pruned(tokenizer(TEXTS[:2], return_tensors="pt", padding=True).input_ids)
    score_texts(model, tokenizer, TEXTS, 16, pruned=pruned)
    assert_unchanged(model, before)


def test_fit_with_the_search_finder_leaves_the_model_as_it_was():
    model, tokenizer = user_model(), tiny_tokenizer()
    before = snapshot(model)
    config = {"finder": "search", "clusters": {"min_cluster_size": 1},
              "search": {"samples": 2, "seq_len": 16, "shared_samples": 2}}
    IGPruner(model, tokenizer, config=config, n_clusters=2, progress=False).fit(TEXTS)
    assert_unchanged(model, before)


def test_find_mask_leaves_the_model_as_it_was():
    model = user_model()
    before = snapshot(model)
    for method, options in (("sleb", {}), ("shortened-taylor", {"keep_first": 0, "keep_last": 0})):
        find_mask(method, model, tiny_tokenizer(), TEXTS, 0.25, "block", progress=False, samples=4, seq_len=16,
                  **options)
    assert_unchanged(model, before)


def test_patch_and_unpatch_restore_the_model_exactly():
    model = user_model("gemma3_text")
    before = snapshot(model)
    keys = list(model.state_dict())
    patch(model)
    assert list(model.state_dict()) == keys  # patched, still the user's keys
    unpatch(model)
    assert_unchanged(model, before)


def test_save_pretrained_round_trips_after_fit(fitted, tmp_path):
    model, _, _, _ = fitted
    x = torch.randint(3, 97, (2, 9))
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert torch.equal(again(x).logits, model(x).logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_generate_with_any_arguments_inside_masked_equals_the_exported_model(arch):
    model, mask = tiny_model(arch), some_mask()
    plain, _ = prune_model(model, mask)  # a plain HF model computing what the masked one computes
    prompt = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=True, top_k=20,
                    num_return_sequences=2, pad_token_id=0)
    torch.manual_seed(0)
    with masked(model, mask) as inside:
        sampled = inside.generate(prompt, **settings)
    torch.manual_seed(0)
    assert torch.equal(sampled, plain.generate(prompt, **settings))
    assert sampled.shape[0] == 4
    torch.manual_seed(0)
    assert not torch.equal(model.generate(prompt, **settings), sampled), "outside masked the model is dense"


def test_pipeline_inside_masked_equals_the_exported_model():
    model, tokenizer, mask = tiny_model("qwen2"), tiny_tokenizer(), some_mask()
    plain, _ = prune_model(model, mask)
    settings = dict(max_new_tokens=6, do_sample=False)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    with masked(model, mask):
        inside = generator(TEXTS[0], **settings)[0]["generated_text"]
    expected = pipeline("text-generation", model=plain, tokenizer=tokenizer)(TEXTS[0], **settings)
    assert inside == expected[0]["generated_text"]
    assert generator(TEXTS[0], **settings)[0]["generated_text"] != inside


def test_dynamic_model_looks_like_an_hf_model(fitted):
    model, tokenizer, _, path = fitted
    pruned = DynamicPrunedModel.from_bundle(model, path, tokenizer)
    assert pruned.config is model.config and pruned.generation_config is model.generation_config
    assert pruned.device == model.device and pruned.dtype == model.dtype
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    with pruned.use_cluster(pruned.route(TEXTS[:1])[0].cluster) as inside:
        torch.manual_seed(0)
        expected = inside.generate(**batch, max_new_tokens=4, do_sample=True, num_return_sequences=2, pad_token_id=0)
    torch.manual_seed(0)
    out = pruned.generate(**batch, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert torch.equal(out, expected)


def test_mixed_batch_generate_keeps_num_return_sequences_rows_per_prompt_in_order(fitted):
    model, tokenizer, _, path = fitted
    pruned = three_mask_model(model, tokenizer, path)
    prompts = [TEXTS[6], TEXTS[0], TEXTS[3]]
    assert len({r.cluster for r in pruned.route(prompts)}) > 1
    beams = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2)
    together = pruned.generate_text(prompts, **beams)
    alone = [pruned.generate_text([p], **beams) for p in prompts]
    assert together == [text for pair in alone for text in pair]
    batch = encode_prompts(tokenizer, model.config, prompts, 4)  # a mixed batch returns what generate returns
    out = pruned.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (3, batch["input_ids"].shape[1] + 4)


def test_a_streamer_inside_masked_sees_the_masked_tokens():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            pass

    model, mask = tiny_model("llama"), some_mask()
    prompt = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(4))
    streamer = Collect()
    with masked(model, mask):
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, streamer=streamer)
    assert streamer.tokens == out[0].tolist()
    assert not torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0), out)
