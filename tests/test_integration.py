"""Integration tests on the real smallest model, smollm2-135m (needs `igprune prepare`, which setup.sh runs)."""

import subprocess
import sys

import pytest
import torch

from igprune.blocks import patch
from igprune.models import ZOO, is_converted, load_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not is_converted(ZOO["smollm2-135m"]), reason="run `igprune prepare` first"),
]


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_dense_generation_knows_the_capital_of_france(smollm):
    model, tokenizer = smollm
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, inputs.input_ids.shape[1]:])


def test_all_ones_mask_equals_the_unmodified_model(smollm):
    model, tokenizer = smollm
    inputs = tokenizer(["Water boils at 100 degrees Celsius.", "def f(x):"], return_tensors="pt", padding=True)
    expected = model(**inputs).logits
    control = patch(model)
    with control.masked(torch.ones(control.n_blocks)):
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)


@pytest.mark.parametrize("kv_policy", ["keep", "drop"])
def test_masked_cached_generation_equals_recomputation(smollm, kv_policy):
    model, tokenizer = smollm
    control = patch(model)
    mask = torch.ones(control.n_blocks, dtype=torch.bool)
    mask[[0, 10, 11, 21, 30, 44]] = False  # includes layer 0's attention: the cache length is read there
    prompt = tokenizer("The three primary colours are", return_tensors="pt").input_ids
    with control.masked(mask, kv_policy):
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        seq = prompt
        for _ in range(8):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)


def test_unknown_model_is_one_line_listing_the_zoo():
    result = subprocess.run([sys.executable, "-m", "igprune", "generate", "-m", "nope", "-p", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "smollm2-135m" in result.stderr
