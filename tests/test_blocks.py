"""Gated decoder layers: exactness when dense, real skipping, and KV-cache consistency under masks."""

import functools

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from igprune.blocks import ATTN, FFN, KEEP_FAMILIES, control_of, masked, masked_rows, patch, unpatch
from igprune.files import IGPruneError

L = 4
B = 2 * L


def ids(batch=2, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (batch, length), generator=g)


def some_mask(first_attn_off: bool = True) -> torch.Tensor:
    mask = torch.ones(B, dtype=torch.bool)
    mask[2 * 0 + ATTN] = not first_attn_off  # layer 0 attention: the cache's length is read from layer 0
    mask[2 * 2 + FFN] = False
    mask[2 * 1 + ATTN] = False
    return mask


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_patched_model_equals_original(arch):
    model = tiny_model(arch)
    x = ids()
    expected = model(x).logits
    control = patch(model)
    assert torch.equal(model(x).logits, expected)  # no mask set
    with control.masked(torch.ones(B)):
        assert torch.allclose(model(x).logits, expected, atol=1e-6)
    with control.gated(torch.ones(2, B)):
        assert torch.allclose(model(x).logits, expected, atol=1e-6)
    unpatch(model)
    assert torch.equal(model(x).logits, expected)


def greedy_token(model, logits):
    """The most likely next token other than EOS, which generate's min_new_tokens rules out too."""
    logits = logits.clone()
    logits[:, model.generation_config.eos_token_id] = -torch.inf
    return logits.argmax(-1, keepdim=True)


def greedy_without_cache(model, prompt, steps):
    seq = prompt
    for _ in range(steps):
        logits = model(seq, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, greedy_token(model, logits)], dim=1)
    return seq


def greedy_with_cache(model, prompt, steps):
    """Plain incremental decoding: positions come from the cache's own length (layer 0)."""
    out = model(prompt, use_cache=True)
    seq, cache = prompt, out.past_key_values
    for _ in range(steps):
        seq = torch.cat([seq, greedy_token(model, out.logits[:, -1])], dim=1)
        out = model(seq[:, -1:], past_key_values=cache, use_cache=True)
    return seq


@pytest.mark.parametrize("kv_policy", ["keep", "drop"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_full_recomputation_under_mask(arch, kv_policy):
    model = tiny_model(arch)
    control = patch(model)
    prompt = ids(batch=2, length=5)
    steps = 10  # past gemma3's sliding window of 6
    with control.masked(some_mask(), kv_policy):
        reference = greedy_without_cache(model, prompt, steps)
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                   min_new_tokens=steps, do_sample=False, pad_token_id=0)
        incremental = greedy_with_cache(model, prompt, steps)
    assert torch.equal(generated, reference)
    assert torch.equal(incremental, reference)
    dense = greedy_without_cache(model, prompt, steps)
    assert not torch.equal(dense, reference), "the mask should change what this tiny model generates"


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_policy_writes_the_same_keys_and_values_as_a_running_attention(arch):
    model = tiny_model(arch)
    control = patch(model)
    x = ids()
    dense = model(x, use_cache=True).past_key_values
    mask = torch.ones(B, dtype=torch.bool)
    mask[2 * 2 + ATTN] = False  # layers 0-1 identical, so layer 2's input is identical
    with control.masked(mask, "keep"):
        skipped = model(x, use_cache=True).past_key_values
    assert torch.allclose(skipped.layers[2].keys, dense.layers[2].keys, atol=1e-6)
    assert torch.allclose(skipped.layers[2].values, dense.layers[2].values, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_skipped_blocks_are_not_executed(arch):
    model = tiny_model(arch)
    control = patch(model)
    calls = {"attn": [0] * L, "ffn": [0] * L}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls["attn"].__setitem__(i, calls["attn"][i] + 1))
        layer.mlp.register_forward_hook(lambda *_, i=i: calls["ffn"].__setitem__(i, calls["ffn"][i] + 1))
    mask = some_mask()
    with control.masked(mask, "keep"):
        model(ids(), use_cache=True)
    assert calls["attn"] == [int(mask[2 * i + ATTN]) for i in range(L)]
    assert calls["ffn"] == [int(mask[2 * i + FFN]) for i in range(L)]


def test_gradient_reaches_gates_and_no_weight():
    model = tiny_model("llama")
    control = patch(model)
    gates = torch.full((2, B), 0.7, requires_grad=True)
    with control.gated(gates):
        loss = model(ids(), labels=ids()).loss
    loss.backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_soft_gates_scale_each_sample_independently():
    model = tiny_model("qwen2")
    control = patch(model)
    x = ids(batch=2)
    gates = torch.ones(2, B)
    gates[1, 3] = 0.0
    with control.gated(gates):
        both = model(x).logits
    with control.masked(None):
        dense_first = model(x[:1]).logits
    mask = torch.ones(B, dtype=torch.bool)
    mask[3] = False
    with control.masked(mask):
        masked_second = model(x[1:]).logits
    assert torch.allclose(both[0], dense_first[0], atol=1e-5)
    assert torch.allclose(both[1], masked_second[0], atol=1e-5)


def test_wrong_mask_size_is_a_clear_error():
    control = patch(tiny_model("llama"))
    with pytest.raises(IGPruneError, match="blocks"):
        control.set_mask(torch.ones(B + 1))
    with pytest.raises(IGPruneError, match="kv_policy"):
        control.set_mask(torch.ones(B), kv_policy="sometimes")


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_policy_matches_the_running_attention_at_every_layer(arch):
    """Each layer in turn (SmolLM3's no-RoPE layers, Gemma's sliding ones) writes what its attention writes."""
    model = tiny_model(arch)
    x = ids()
    dense = model(x, use_cache=True).past_key_values
    for layer in range(L):
        mask = torch.ones(B, dtype=torch.bool)
        mask[2 * layer + ATTN] = False  # the layers before are unchanged, so this layer's input is too
        with masked(model, mask, "keep"):
            skipped = model(x, use_cache=True).past_key_values
        assert torch.allclose(skipped.layers[layer].keys, dense.layers[layer].keys, atol=1e-6), layer
        assert torch.allclose(skipped.layers[layer].values, dense.layers[layer].values, atol=1e-6), layer


def test_every_family_the_tests_cover_is_in_the_keep_list():
    assert {tiny_model(arch).config.model_type for arch in ARCHS} <= set(KEEP_FAMILIES)


def test_keep_policy_refuses_an_untested_family_in_one_line():
    model = tiny_model("llama")
    model.config.model_type = "somethingelse"
    control_of(model).family = "somethingelse"
    mask = torch.ones(B, dtype=torch.bool)
    mask[ATTN] = False
    with pytest.raises(IGPruneError, match="kv_policy='drop'"), masked(model, mask, "keep"):
        model(ids(), use_cache=True)
    with masked(model, mask, "drop"):
        model(ids(), use_cache=True)


# ---- one mask per row ------------------------------------------------------------------------------------

ROW_ARCHS = ["llama", "qwen2", "gemma2", "gemma3_text"]  # the pre-norm and the sandwich layouts


def row_masks() -> torch.Tensor:
    """Three rows, three masks: blocks every row keeps, one none keeps (layer 1's attention), mixed attentions
    (layer 0's, whose cache length positions read) and mixed FFNs."""
    masks = torch.ones(3, B, dtype=torch.bool)
    masks[:, 2 * 1 + ATTN] = False
    masks[0, 2 * 0 + ATTN] = False
    masks[1, 2 * 2 + FFN] = False
    masks[2, 2 * 2 + FFN] = False
    masks[2, 2 * 3 + ATTN] = False
    masks[0, 2 * 3 + FFN] = False
    return masks


@pytest.mark.parametrize("arch", ROW_ARCHS)
def test_row_masks_give_each_row_what_it_gives_alone_under_its_mask(arch):
    model = tiny_model(arch)
    x, masks = ids(batch=3), row_masks()
    with masked_rows(model, masks):
        together = model(x).logits
    for i in range(3):
        with masked(model, masks[i]):
            alone = model(x[i:i + 1]).logits[0]
        assert torch.allclose(together[i], alone, atol=1e-5, rtol=1e-5), i
    with masked(model, masks[0]):
        assert not torch.allclose(together[1], model(x[1:2]).logits[0], atol=1e-3)  # the masks matter


@pytest.mark.parametrize("kv_policy", ["keep", "drop"])
@pytest.mark.parametrize("arch", ROW_ARCHS)
def test_row_masks_in_cached_greedy_generation_equal_each_row_alone(arch, kv_policy):
    model = tiny_model(arch)
    prompt, masks, steps = ids(batch=3, length=5), row_masks(), 10  # past gemma's sliding window of 6
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    with masked_rows(model, masks, kv_policy):
        together = model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
    for i in range(3):
        with masked(model, masks[i], kv_policy):
            alone = model.generate(prompt[i:i + 1], attention_mask=torch.ones_like(prompt[i:i + 1]), **settings)
        assert torch.equal(together[i], alone[0]), i


def test_row_masks_expand_for_generates_repeated_rows_and_refuse_other_batches():
    model = tiny_model("llama")
    x, masks = ids(batch=3), row_masks()
    with masked_rows(model, masks):
        repeated = model(x.repeat_interleave(2, dim=0)).logits  # what num_return_sequences / beams feed
        beams = model.generate(x, attention_mask=torch.ones_like(x), num_beams=2, num_return_sequences=2,
                               max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        with pytest.raises(IGPruneError, match="a batch of 4 rows cannot run under 3 row masks"):
            model(x[:2].repeat(2, 1))
    for i in range(3):
        with masked(model, masks[i]):
            alone = model(x[i:i + 1]).logits[0]
            alone_beams = model.generate(x[i:i + 1], attention_mask=torch.ones_like(x[i:i + 1]), num_beams=2,
                                         num_return_sequences=2, max_new_tokens=4, min_new_tokens=4,
                                         do_sample=False, pad_token_id=0)
        assert torch.allclose(repeated[2 * i], alone, atol=1e-5) and torch.allclose(repeated[2 * i + 1], alone,
                                                                                   atol=1e-5)
        assert torch.equal(beams[2 * i:2 * i + 2], alone_beams)
    control = control_of(model)
    for bad in (torch.ones(B, dtype=torch.bool), torch.ones(3, B + 1, dtype=torch.bool), torch.ones(0, B)):
        with pytest.raises(IGPruneError, match="row masks must have shape"):
            control.set_rows(bad)


def test_row_masks_compute_each_block_only_where_needed():
    """Blocks kept by every row or none take the one-mask path; a mixed FFN sees only the rows that keep it; a
    row that skips a mixed attention keeps its hidden state exactly, even where the attention's output is not
    finite (selected, not multiplied by 0)."""
    model = tiny_model("llama")
    control = patch(model)
    masks = row_masks()
    control.set_rows(masks)
    assert [control.gate(b) if isinstance(control.gate(b), bool) else "mixed" for b in range(B)] == [
        "mixed", True, False, True, True, "mixed", "mixed", "mixed"]
    control.set_rows(masks[[0, 0]])
    assert all(isinstance(control.gate(b), bool) for b in range(B))
    control.set_mask(None)
    rows_seen = {"attn": [], "ffn": []}

    def attention(module, args, kwargs, out, i):
        rows_seen["attn"].append((i, kwargs["hidden_states"].shape[0]))
        if i == 0:  # row 0 skips this attention: what it would have added must not reach it
            out = (out[0].index_fill(0, torch.tensor([0]), torch.nan), *out[1:])
        return out

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(functools.partial(attention, i=i), with_kwargs=True)
        layer.mlp.register_forward_hook(lambda m, args, out, i=i: rows_seen["ffn"].append((i, args[0].shape[0])))
    x = ids(batch=3)
    with control.masked_rows(masks):
        together = model(x).logits
    assert rows_seen == {"attn": [(0, 3), (2, 3), (3, 3)], "ffn": [(0, 3), (1, 3), (2, 1), (3, 2)]}
    unpatch(model)
    assert torch.isfinite(together).all()
