"""static L0: IG-Pruning's mask trainer with a single cluster, the ablation that isolates what routing adds.

It is exactly `IGPruner(n_clusters=1)` minus the sentence encoder, which has nothing to decide with one
cluster: one hard-concrete mask trained with the same TrainConfig (shared phase, then the cluster phase
continuing the same mask) on the calibration sequences, binarised to exactly k units off.
"""

from __future__ import annotations

import dataclasses

import torch

from igprune.files import IGPruneError
from igprune.finders.base import Problem, SearchResult
from igprune.finders.l0 import MaskTrainer, TrainConfig

# TrainConfig fields a user may set; the problem fixes the others (batch_size comes from the scorer)
TRAIN_OPTIONS = {k: v for k, v in dataclasses.asdict(TrainConfig()).items()
                 if k not in ("sparsity", "granularity", "seed", "seq_len", "batch_size")}


def search(problem: Problem, **train_options) -> SearchResult:
    """train_options: TrainConfig fields; sparsity, granularity, seed, seq_len and batch_size come from the problem."""
    space, calibration = problem.space, problem.scorer.calibration
    if space.protected_layers:
        raise IGPruneError("static-l0 trains a gate for every unit; keep_first/keep_last do not apply to it")
    sparsity = problem.k / space.n_units  # units_off gives back exactly k
    config = dataclasses.replace(TrainConfig(), **train_options, sparsity=sparsity, granularity=space.granularity,
                                 seed=problem.seed, seq_len=calibration.seq_len,
                                 batch_size=problem.scorer.batch_size)
    ids = calibration.input_ids
    trainer = MaskTrainer(problem.model, 1, config, progress=problem.progress,
                          checkpoint_dir=problem.checkpoint and problem.checkpoint / "trainer")
    trainer.fit(ids, torch.ones_like(ids), torch.zeros(len(ids), dtype=torch.long))
    log_alpha = trainer.gates.log_alpha.detach().cpu()
    mask = trainer.masks()[0]
    off = [u for u in torch.argsort(log_alpha[0], stable=True).tolist() if not mask[space.blocks(u)[0]]]
    log = {"train": dataclasses.asdict(config), "curve": dataclasses.asdict(trainer.log),
           "log_alpha": {space.name(u): float(a) for u, a in enumerate(log_alpha[0])}}
    return SearchResult(off, log, log_alpha)
