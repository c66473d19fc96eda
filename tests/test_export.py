"""Export: a plain HF checkpoint, smaller where whole layers are skipped, with the masked model's logits."""

import json

import pytest
import torch
from tiny_models import TOPICS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from igprune.blocks import is_gated, patch
from igprune.cli import app
from igprune.export import export_bundle, export_model, prune_model
from igprune.files import IGPruneError
from igprune.finders import find_mask
from igprune.models import load_model

# per layer (attention, FFN): layers 1 and 4 go, layer 2 loses its FFN, layer 3 its attention
MASK = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1], dtype=torch.bool)


def masked_logits(model, ids, mask):
    with torch.no_grad(), patch(model).masked(mask):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_exported_model_loads_plainly_and_gives_the_masked_logits(arch, tmp_path):
    model, tokenizer = tiny_model(arch, layers=6), tiny_tokenizer()
    ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = masked_logits(model, ids, MASK)
    record = export_model(model, tokenizer, MASK, tmp_path / "out")

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.num_hidden_layers == 4 and len(plain.model.layers) == 4
    assert not any(is_gated(layer) for layer in plain.model.layers)
    torch.testing.assert_close(plain(input_ids=ids).logits.detach(), expected, rtol=1e-4, atol=1e-4)
    # with a KV cache too: each kept layer must have been renumbered to its own cache slot
    with patch(model).masked(MASK, "keep"):
        want = model.generate(ids[:1, :4], max_new_tokens=10, do_sample=False, pad_token_id=0)
    got = plain.generate(ids[:1, :4], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)

    assert record["layers_kept"] == [0, 2, 3, 5] and record["layers_removed"] == [1, 4]
    assert record["zeroed_attention"] == [3] and record["zeroed_ffn"] == [2]
    assert record["parameters"]["after"] < record["parameters"]["before"]
    assert plain.model.layers[1].mlp.down_proj.weight.abs().sum() == 0  # source layer 2
    assert plain.model.layers[2].self_attn.o_proj.weight.abs().sum() == 0  # source layer 3
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config
    if arch == "gemma3_text":  # sliding/full alternate in the source: layers 0, 2, 3, 5 keep their own types
        assert config["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
    saved = json.loads((tmp_path / "out" / "igprune-export.json").read_text())
    assert "zero" in saved["note"] and "zero" in (tmp_path / "out" / "README.md").read_text()
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("ab").input_ids == tokenizer("ab").input_ids


def test_export_leaves_the_source_model_untouched_unless_inplace():
    model = tiny_model("llama", layers=6)
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    before = masked_logits(model, ids, MASK)
    pruned, plan = prune_model(model, MASK)
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    torch.testing.assert_close(masked_logits(model, ids, MASK), before, rtol=0, atol=0)
    assert len(pruned.model.layers) == 4 and plan.layers_removed == [1, 4]
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_a_mask_without_half_skipped_layers_needs_no_zeroing(tmp_path):
    model = tiny_model("qwen2", layers=4)
    mask = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    record = export_model(model, None, mask, tmp_path / "out")
    assert record["zeroed_attention"] == record["zeroed_ffn"] == [] and "runs in full" in record["note"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.layer_types == ["full_attention"] * 2


def test_bad_export_requests_are_one_line_errors(tmp_path):
    model, tokenizer = tiny_model("llama", layers=6), tiny_tokenizer()
    with pytest.raises(IGPruneError, match="skips every block"):
        prune_model(model, torch.zeros(12, dtype=torch.bool))
    with pytest.raises(IGPruneError, match="12 blocks"):
        prune_model(model, torch.ones(8, dtype=torch.bool))
    bundle = find_mask("shortened-ppl", model, tokenizer, TOPICS["code"], 0.25, progress=False, samples=2,
                       seq_len=16)
    with pytest.raises(IGPruneError, match="cluster"):
        export_bundle(bundle, model, tokenizer, tmp_path / "x", cluster=1)
    with pytest.raises(IGPruneError, match="another model"):
        export_bundle(bundle, tiny_model("llama", layers=4), tokenizer, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_baseline_inspect_and_export(tmp_path, prepared_data):
    """The commands end to end on a tiny model saved as an HF folder (the CLI loads models by name or folder)."""
    folder = tmp_path / "tiny"
    tiny_model("llama", layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    runner = CliRunner()
    bundle = tmp_path / "bundle"
    result = runner.invoke(app, ["baseline", "sleb", "--model", str(folder), "--blocks", "2", "--granularity",
                                 "block", "--samples", "2", "--seq-len", "16", "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "2/8 blocks off" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "bundle.checkpoint").exists()  # the search's progress goes once the bundle is written
    result = runner.invoke(app, ["inspect", str(bundle)])
    assert result.exit_code == 0 and "sleb" in result.output
    result = runner.invoke(app, ["export", "--bundle", str(bundle), "--out", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    assert "matches the masked model" in " ".join(result.output.split()), result.output
    assert json.loads((tmp_path / "plain" / "igprune-export.json").read_text())["bundle"] == str(bundle)
    model, _ = load_model(str(tmp_path / "plain"))
    assert model.config.num_hidden_layers <= 4
