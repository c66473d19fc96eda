"""The analytic FLOPs model against torch's FlopCounterMode, the Table-2 generator, and the speed benchmark.

Tolerance: exact. FlopCounterMode counts matrix multiplications only (mm, addmm, bmm; 2 FLOPs per
multiply-add) and the model counts exactly those: projections, Q K^T, A V and lm_head. Neither counts
softmax, norms, RoPE, activations or bias adds, and eager attention materialises the full masked score
matrix, as the model assumes. Any missing or extra matmul (a forgotten K/V projection of a skipped
attention, a wrong GQA width, a sliding window read wrongly) changes the count, so this test can fail.
"""

import json

import pytest
import torch
from tiny_models import ARCHS, bundle_config, tiny_model, tiny_tokenizer
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache, LlamaConfig

from igprune.blocks import patch
from igprune.evaluation.flops import (
    Shape,
    bundle_table,
    canonical_mask,
    canonical_order,
    canonical_table,
    decode_flops,
    flops,
    markdown,
    params_skipped,
    table_row,
)
from igprune.evaluation.speed import SpeedSettings, bench_speed, build_prompt, order_candidates, table_rows
from igprune.files import IGPruneError
from igprune.routing import Router

N_BLOCKS = 8  # tiny models have 4 layers
MASKS = {  # "mixed" has every layer case: attention off, FFN off, both off, both on
    "dense": None,
    "mixed": torch.tensor([0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool),
}
BATCH, PROMPT = 2, 10  # gemma3's tiny sliding window is 6, so decode after 10 tokens reads a capped cache


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch) for arch in ARCHS}


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("kv_policy", ["keep", "drop"])
def test_flops_match_the_flop_counter_for_prefill_and_decode(models, arch, mask_name, kv_policy):
    model, mask = models[arch], MASKS[mask_name]
    control = patch(model)
    ids = torch.randint(3, 97, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), control.masked(mask, kv_policy):
        prefill = counted(lambda: model(ids, use_cache=True))
        cache = model(ids, use_cache=True).past_key_values
        decode = counted(lambda: model(ids[:, :1], past_key_values=cache, use_cache=True))
    assert prefill == flops(model.config, mask, PROMPT, kv_policy, batch=BATCH)["total"]
    assert decode == flops(model.config, mask, PROMPT, kv_policy, phase="decode", batch=BATCH)["total"]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_chunked_prefill_and_last_position_logits_match(models, arch):
    """A second prefill chunk on a cache, with logits only for its last position (generate's first step)."""
    model, mask = models[arch], MASKS["mixed"]
    control = patch(model)
    ids = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), control.masked(mask, "keep"):
        cache = DynamicCache(config=model.config)
        model(ids[:, :9], past_key_values=cache, use_cache=True)
        got = counted(lambda: model(ids[:, 9:], past_key_values=cache, use_cache=True, logits_to_keep=1))
    assert got == flops(model.config, mask, 7, "keep", context=9, logits="last")["total"]


def test_decode_flops_sums_the_steps(models):
    config = models["llama"].config
    steps = [flops(config, None, kv_policy="drop", phase="decode", context=5 + i)["total"] for i in range(4)]
    assert decode_flops(config, None, 5, 4, "drop") == sum(steps)


def test_components_and_policies():
    config = tiny_model("qwen3").config  # head_dim 8, 4 query and 2 key-value heads: GQA widths
    dense = flops(config, None, 10)
    assert dense["k_proj"] == dense["v_proj"] == 2 * 10 * 32 * (2 * 8) * 4
    assert dense["q_proj"] == dense["o_proj"] == 2 * 10 * 32 * (4 * 8) * 4
    assert dense["total"] == sum(v for k, v in dense.items() if k != "total")
    attn_off = canonical_mask(N_BLOCKS, 1)
    keep, drop = flops(config, attn_off, 10, "keep"), flops(config, attn_off, 10, "drop")
    assert keep["k_proj"] == dense["k_proj"] and drop["k_proj"] == dense["k_proj"] * 3 // 4
    assert keep["q_proj"] == drop["q_proj"] == dense["q_proj"] * 3 // 4
    assert flops(config, None, 10, norms=True)["norms"] > 0 == dense["norms"]


def test_dense_llama3_8b_matches_the_paper_table2():
    """Paper Table 2: dense Llama-3-8B at 32.94T, reproduced by 2048 tokens with logits at every position."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    dense = flops(config, None, 2048)
    assert round(dense["total"] / 1e12, 2) == 32.94
    # Its other rows follow if a skipped attention saves only W_Q and W_O (module docstring), e.g. 2, 12 and
    # 14 attention blocks plus 2 FFN blocks off: 32.66T, 31.29T, 29.57T. This model saves Q K^T and A V too.
    q_o = (dense["q_proj"] + dense["o_proj"]) / 32
    ffn = (dense["gate_proj"] + dense["up_proj"] + dense["down_proj"]) / 32
    paper = [round((dense["total"] - a * q_o - f * ffn) / 1e12, 2) for a, f in [(2, 0), (12, 0), (14, 2)]]
    assert paper == [32.66, 31.29, 29.57]
    two_attention = flops(config, canonical_mask(64, 2), 2048)["total"]
    assert dense["total"] - two_attention > 2 * q_o


def test_canonical_order_and_masks():
    order = canonical_order(8)
    assert order == [6, 4, 2, 0, 7, 5, 3, 1]
    assert canonical_order(8, "ffn-first")[:4] == [7, 5, 3, 1]
    mask = canonical_mask(8, 5)
    assert int((~mask).sum()) == 5 and not mask[[0, 2, 4, 6]].any() and not mask[7]
    with pytest.raises(IGPruneError):
        canonical_mask(8, 8)
    with pytest.raises(IGPruneError):
        canonical_order(8, "random")


def test_parameter_shares_count_the_real_weights():
    model = tiny_model("llama")
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    shape = Shape.from_config(model.config)
    assert shape.model_params() == weights
    layer0 = model.model.layers[0]
    attn = sum(p.numel() for p in layer0.self_attn.parameters())
    ffn = sum(p.numel() for p in layer0.mlp.parameters())
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)  # layer 0: attention and FFN off
    kv = layer0.self_attn.k_proj.weight.numel() + layer0.self_attn.v_proj.weight.numel()
    assert params_skipped(model.config, mask, "drop")["skipped"] == attn + ffn
    assert params_skipped(model.config, mask, "keep")["skipped"] == attn - kv + ffn
    assert params_skipped(model.config, mask, "drop")["share_of_model"] == pytest.approx((attn + ffn) / weights)


def test_bad_input_is_a_clear_error():
    config = tiny_model("llama").config
    with pytest.raises(IGPruneError, match="mask has 3 entries"):
        flops(config, [True, False, True], 10)
    with pytest.raises(IGPruneError, match="phase"):
        flops(config, None, 10, phase="train")
    with pytest.raises(IGPruneError, match="kv_policy"):
        flops(config, None, 10, kv_policy="maybe")
    with pytest.raises(IGPruneError, match="decoder size"):
        flops(object(), None, 10)


def test_table_rows_have_the_shape_of_table2(tmp_path):
    from igprune.bundle import Bundle

    config = tiny_model("llama").config
    rows = canonical_table(config, max_sparsity=0.5, step=1)
    assert [r["blocks_skipped"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["keep"]["percent_of_dense"] == 100.0
    assert all(a["keep"]["flops"] > b["keep"]["flops"] for a, b in zip(rows, rows[1:], strict=False))
    assert all(r["drop"]["flops"] <= r["keep"]["flops"] for r in rows)
    masks = torch.stack([canonical_mask(8, 2), canonical_mask(8, 2, "ffn-first")])
    Bundle(masks, torch.zeros(2, 4), bundle_config(masks)).save(tmp_path / "b")
    bundle_rows = bundle_table(config, [tmp_path / "b"])
    low, high = bundle_rows[1]["keep"]["percent_range"]
    assert low < bundle_rows[1]["keep"]["percent_of_dense"] < high
    assert bundle_rows[1]["keep"]["flops"] == table_row(config, "x", list(masks))["keep"]["flops"]
    text = markdown(rows + bundle_rows)
    assert "% of dense (keep)" in text and "| dense |" in text and len(text.splitlines()) == 2 + 5 + 2


def test_speed_benchmark_runs_and_pairs_flops(tmp_path):
    """A smoke run on a tiny model: every configuration timed, speedups paired with FLOPs-ideal ratios."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    ids, text = build_prompt(tokenizer, ["The quick brown fox jumps over the lazy dog. " * 2], 24)
    assert ids.shape == (1, 24)
    candidates = [*order_candidates(8, [2], ["keep", "drop"]), *order_candidates(8, [2], ["keep"], router="r")]
    settings = SpeedSettings(prompt_tokens=24, new_tokens=3, batch_size=2, repeats=2, warmup=1, threads=1)

    class Encoder:  # a router's cost without loading a sentence encoder
        name, max_tokens = "stand-in", 8

        def encode(self, texts):
            return torch.ones(len(texts), 4)

    routers = {"r": Router(torch.eye(4)[:3], Encoder())}
    report = bench_speed(model, ids, text, candidates, routers, settings=settings, progress=False)
    labels = [(r["label"], r["kv_policy"]) for r in report["results"]]
    assert labels == [("dense", "keep"), *[("2/8 attention-first", kv) for kv in ("keep", "drop", "keep")]]
    routed = report["results"][3]  # its routing time is a share of the prefill and of the whole request
    assert 0 < routed["routing_percent_of_request"] < routed["routing_percent_of_prefill"]
    assert report["results"][1]["routing_percent_of_request"] == 0
    keep = report["results"][1]
    ideal = flops(model.config, None, 24, batch=2, logits="last")["total"] / flops(
        model.config, candidates[0].mask, 24, "keep", batch=2, logits="last")["total"]
    assert keep["prefill"]["flops_speedup"] == pytest.approx(ideal)
    assert len(keep["decode"]["seconds"]["all"]) == 2 and keep["decode"]["speedup"] > 0
    assert report["results"][2]["decode"]["flops_speedup"] > keep["decode"]["flops_speedup"] > 1
    json.dumps(report)
    header, rows = table_rows(report)
    assert len(rows) == 4 and all(len(r) == len(header) for r in rows)
    with pytest.raises(IGPruneError, match="tokens"):
        build_prompt(tokenizer, ["short"], 24)
