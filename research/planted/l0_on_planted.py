"""Does the paper's L0 trainer find the planted masks of tests/test_planted.py? (The search finder does; the test
asserts it.) Prints each configuration's masks and learning curve; seed 0, a few seconds each on a CPU.

    python research/planted/l0_on_planted.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_planted import KINDS, SPARSITY, planted_model, texts  # noqa: E402
from tiny_models import tiny_tokenizer  # noqa: E402

from igprune.pruner import IGPruner  # noqa: E402

CONFIGS = {
    "paper phases, lr 0.3": {"shared_steps": 60, "cluster_steps": 120, "batch_size": 8, "seq_len": 32, "lr": 0.3},
    "no shared phase": {"shared_steps": 0, "cluster_steps": 150, "batch_size": 8, "cluster_batch": 4, "seq_len": 32},
    "no shared phase, lr 0.3": {"shared_steps": 0, "cluster_steps": 150, "batch_size": 8, "cluster_batch": 4,
                                "seq_len": 32, "lr": 0.3},
}

if __name__ == "__main__":
    tokenizer = tiny_tokenizer()
    model = planted_model(tokenizer)
    calibration = [t for kind in KINDS for t in texts(kind, 24)]
    for name, l0 in CONFIGS.items():
        pruner = IGPruner(model, tokenizer, "paper", config={"data": {"samples": 48}, "l0": l0}, n_clusters=2,
                          sparsity=SPARSITY, progress=False).fit(calibration)
        print(f"{name}: masks {pruner.masks_.int().tolist()} (the planted ones keep block 3 or block 5), "
              f"final loss {pruner.trainer_.log.loss[-1]:.2f}")
