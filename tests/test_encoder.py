"""The static encoder: distilled from a sentence encoder, deterministic, a lookup-and-mean that reads only the
first max_tokens, built once into the cache."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Normalize, Pooling, Transformer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, BertTokenizerFast

from igprune import encoder as E
from igprune.encoder import STATIC_ENCODER, SentenceEncoder, distill_static

WORDS = ["the", "cat", "sat", "on", "a", "mat", "def", "return", "import", "numpy", "sum", "of", "two", "numbers",
         "die", "katze", "auf", "der", "matte"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny random BERT sentence encoder with a word-level vocabulary, saved as sentence-transformers saves one."""
    folder = tmp_path_factory.mktemp("teacher")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = BertTokenizerFast(tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]",
                                  pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    word = Transformer(str(folder / "bert"))
    SentenceTransformer(modules=[word, Pooling(16, "mean"), Normalize()], device="cpu").save(str(folder / "st"))
    return str(folder / "st")


def test_distilled_static_encoder_is_deterministic_and_embeds_by_table_lookup(teacher, tmp_path):
    first, again = distill_static(teacher, tmp_path / "a", dim=8), distill_static(teacher, tmp_path / "b", dim=8)
    table = load_file(first / "model.safetensors")["embedding.weight"]
    assert table.shape == (5 + len(WORDS), 8)
    assert torch.equal(table, load_file(again / "model.safetensors")["embedding.weight"])  # seeded by nothing
    static = SentenceEncoder(str(first), device="cpu")
    row = {w: table[5 + i] for i, w in enumerate(WORDS)}  # after [PAD], [UNK], [CLS], [SEP], [MASK]
    assert static.dim == 8 and torch.allclose(static.encode(["cat"])[0], row["cat"] / row["cat"].norm())
    pair = static.encode(["cat mat"])[0]  # the mean of the words' rows, normalised
    mean = row["cat"] + row["mat"]
    assert torch.allclose(pair, mean / mean.norm(), atol=1e-6)


def test_static_encoder_reads_only_the_first_max_tokens(teacher, tmp_path):
    static = SentenceEncoder(str(distill_static(teacher, tmp_path / "s", dim=8)), device="cpu", max_tokens=3)
    assert static.max_tokens == 3
    same = static.encode(["the cat sat import numpy", "the cat sat die katze auf der matte"])
    assert torch.allclose(same[0], same[1]) and not torch.allclose(same[0], static.encode(["the cat"])[0])


def test_the_named_static_encoder_is_built_once_into_the_cache(teacher, tmp_path, monkeypatch):
    original = E.encoder_path
    monkeypatch.setenv("IGPRUNE_HOME", str(tmp_path))
    monkeypatch.setattr(E, "encoder_path", lambda name: teacher if name == E.DEFAULT_ENCODER else original(name))
    built = []
    monkeypatch.setattr(E, "distill_static", lambda source, out: built.append(source) or distill_static(source, out, 8))
    folder = str(tmp_path / "encoders" / STATIC_ENCODER)
    assert original(STATIC_ENCODER) == folder and original(STATIC_ENCODER) == folder and built == [teacher]
    assert SentenceEncoder(STATIC_ENCODER, device="cpu").dim == 8
