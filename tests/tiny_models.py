"""Tiny randomly initialised decoder models of each supported architecture, built in the tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

# every family README.md names; igprune.blocks.KEEP_FAMILIES must list each (tests/test_blocks.py)
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "smollm3"]
VOCAB = 97


def tiny_config(arch: str, layers: int = 4, vocab: int = VOCAB):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=8)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "gemma2":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return Gemma2Config(**common, head_dim=8, sliding_window=6, layer_types=types)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**common)
    if arch == "smollm3":  # every second layer has no RoPE
        return SmolLM3Config(**common, no_rope_layer_interval=2)
    if arch == "gemma3_text":
        # alternate sliding (window 6) and full attention so the sliding cache layer is exercised
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=6, layer_types=types)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", layers: int = 4, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, vocab), attn_implementation="eager")
    # random init leaves near-uniform logits; scale up so greedy choices are decisive
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model.eval().requires_grad_(False)


def tiny_tokenizer():
    """A character-level tokenizer whose 97 ids match the tiny models' vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 126)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_bpe_tokenizer(size: int = 300):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer and decoder) trained on TOPICS, with <pad> <s> </s> as
    ids 0-2: the kind of tokenizer GGUF export writes (tokenizer.ggml.model gpt2). Pair it with
    tiny_model(vocab=len(tokenizer))."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for texts in TOPICS.values() for t in texts] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


TOPICS = {
    "cooking": ["Stir the onions in butter until golden, then add garlic.",
                "Bake the bread at 220 degrees for thirty minutes.",
                "Season the soup with salt, pepper and fresh thyme."],
    "code": ["def add(a, b):\n    return a + b",
             "for i in range(10):\n    print(i * i)",
             "import numpy as np\nx = np.zeros((3, 3))"],
    "sport": ["The striker scored twice in the second half of the match.",
              "She won the marathon in under two hours and thirty minutes.",
              "The team lost the final on penalties after extra time."],
}


def bundle_config(masks: torch.Tensor, lm=None, **extra) -> dict:
    """A complete bundle.json config for hand-made masks (every row skipping as many blocks), as loading checks.

    Without a model `lm` the fingerprint is a placeholder of the right shape (enough for code that runs no model).
    """
    from igprune.bundle import fingerprint

    n, blocks = masks.shape
    print_ = fingerprint(lm) if lm is not None else {
        "architecture": "LlamaForCausalLM", "num_layers": blocks // 2, "hidden_size": 32, "config_sha256": "0" * 64,
        "weight_signature": [0.0, 0.0]}
    config = {"method": "ig-pruning" if n > 1 else "sleb", "model": "tiny", "fingerprint": print_, "n_clusters": n,
              "sparsity": int((~masks[0]).sum()) / blocks, "granularity": "block", "blocks_total": blocks,
              "blocks_skipped": int((~masks[0]).sum()), "seed": 0}
    if n > 1:
        config["encoder"] = "all-MiniLM-L6-v2"
    return {**config, **extra}


def saved_bundle(folder, model, tokenizer, mask: torch.Tensor, **config):
    """Save `model` and `tokenizer` to folder/"model" and a static bundle of `mask` (1, B) naming that folder to
    folder/"bundle", as the CLI reads them; returns (model folder, bundle folder)."""
    from igprune.bundle import Bundle

    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    Bundle(mask, torch.zeros(1, 0), bundle_config(mask, model, model=str(folder / "model"), **config)).save(
        folder / "bundle")
    return folder / "model", folder / "bundle"


def three_mask_model(model, tokenizer, path):
    """A fitted 3-cluster bundle's router over a visibly different mask per cluster (cluster k skips layer k's
    FFN): a tiny fit's clusters often find one mask, and then routing would decide nothing."""
    from igprune.blocks import FFN
    from igprune.bundle import Bundle
    from igprune.dynamic import DynamicPrunedModel
    from igprune.routing import Router

    bundle = Bundle.load(path)
    masks = torch.ones_like(bundle.masks)
    for k in range(3):
        masks[k, 2 * k + FFN] = False
    return DynamicPrunedModel(model, tokenizer, Router.from_bundle(bundle, always_embed=True), masks, bundle=bundle)
