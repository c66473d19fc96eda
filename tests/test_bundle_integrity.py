"""Bundles check themselves: any damage to either file is refused with a one-line IGPruneError, never loaded."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import bundle_config, tiny_model

from igprune.bundle import FORMAT, Bundle, rehash
from igprune.files import IGPruneError


def ig_bundle(lm=None) -> Bundle:
    masks = torch.ones(3, 8, dtype=torch.bool)
    for k, off in enumerate(([1, 5], [2, 6], [3, 7])):
        masks[k, off] = False
    config = bundle_config(masks, lm, cluster_sizes=[5, 4, 4], encoder_tokens=64, train={"lr": 0.1, "seq_len": 16})
    gen = torch.Generator().manual_seed(0)
    return Bundle(masks, torch.randn(3, 384, generator=gen), config, torch.randn(3, 8, generator=gen),
                  {"train": {"loss": [1.25, 0.5], "phase": ["shared", "cluster"]}})


def same(a: Bundle, b: Bundle) -> bool:
    """Equal in every tensor bit and every recorded value."""
    tensors = all(torch.equal(x, y) for x, y in ((a.masks, b.masks), (a.centroids, b.centroids),
                                                 (a.log_alpha, b.log_alpha)))
    return tensors and a.config == b.config and a.logs == b.logs


def test_a_saved_bundle_loads_as_it_was_with_digests_of_both_files(tmp_path):
    bundle = ig_bundle()
    bundle.save(tmp_path / "b")
    record = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert record["format"] == FORMAT and set(record["sha256"]) == {"bundle.json", "tensors.safetensors"}
    loaded = Bundle.load(tmp_path / "b")
    assert same(loaded, bundle) and loaded.source == tmp_path / "b"
    assert str(tmp_path / "b") in repr(loaded) and len(repr(loaded)) < 200  # never the tensors


def test_random_byte_flips_anywhere_are_refused_or_harmless(tmp_path):
    """Fuzz: a random byte of either file replaced by another; the load must fail with IGPruneError or give
    exactly the original bundle (a flip in JSON whitespace changes nothing). Counts printed for the README."""
    original = ig_bundle()
    original.save(tmp_path / "good")
    files = {name: (tmp_path / "good" / name).read_bytes() for name in ("bundle.json", "tensors.safetensors")}
    rng, tally = random.Random(16), {"rejected": 0, "harmless": 0}
    trials = 400
    for _ in range(trials):
        name = rng.choice(sorted(files))
        data = bytearray(files[name])
        at = rng.randrange(len(data))
        data[at] = rng.choice([b for b in range(256) if b != data[at]])
        shutil.rmtree(tmp_path / "bad", ignore_errors=True)
        shutil.copytree(tmp_path / "good", tmp_path / "bad")
        (tmp_path / "bad" / name).write_bytes(bytes(data))
        try:
            loaded = Bundle.load(tmp_path / "bad")
        except IGPruneError as err:
            assert "\n" not in str(err) and str(tmp_path / "bad") in str(err)
            tally["rejected"] += 1
            continue
        assert same(loaded, original), f"a flip at byte {at} of {name} was accepted and changed the bundle"
        tally["harmless"] += 1
    print(f"\nreliability: fuzz: {trials} random byte flips, {tally['rejected']} refused, {tally['harmless']} "
          f"harmless (content unchanged), 0 damaged bundles accepted")
    assert tally["rejected"] > 0.9 * trials


def test_format_1_loads_with_a_warning_and_rehash_adds_the_digests(tmp_path):
    ig_bundle().save(tmp_path / "b")
    path = tmp_path / "b" / "bundle.json"
    record = json.loads(path.read_text())
    del record["sha256"]
    path.write_text(json.dumps({**record, "format": "igprune-bundle/1"}, indent=2) + "\n")
    with pytest.warns(UserWarning, match=r"no checksums.*igprune bundle rehash"):
        Bundle.load(tmp_path / "b")
    assert "digests written" in rehash(tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same(Bundle.load(tmp_path / "b"), ig_bundle())


def test_in_memory_bundles_are_checked_too_and_named_without_their_contents():
    bundle = ig_bundle()
    bundle.config["blocks_skipped"] = 3
    with pytest.raises(IGPruneError, match=r"\(unsaved bundle\): .*blocks_skipped is 3"):
        bundle.validate()


def test_the_wrong_model_is_refused_in_one_short_line(tmp_path):
    from igprune.dynamic import DynamicPrunedModel

    made_for, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    masks = torch.ones(1, 8, dtype=torch.bool)
    masks[0, 2] = False
    Bundle(masks, torch.zeros(1, 0), bundle_config(masks, made_for)).save(tmp_path / "b")
    with pytest.raises(IGPruneError) as err:
        DynamicPrunedModel.from_bundle(other, Bundle.load(tmp_path / "b"), tokenizer=object())
    assert str(tmp_path / "b") in str(err.value) and len(str(err.value)) < 300
    deeper = tiny_model("llama", layers=6)
    with pytest.raises(IGPruneError, match="another model"):
        Bundle.load(tmp_path / "b").check_model(deeper)


def test_the_python_api_raises_igprune_error_for_a_damaged_path(tmp_path):
    from igprune.dynamic import DynamicPrunedModel

    ig_bundle().save(tmp_path / "b")
    Path(tmp_path / "b" / "tensors.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(IGPruneError, match="tensors.safetensors"):
        DynamicPrunedModel.from_bundle(tiny_model("llama"), tmp_path / "b")
