"""Mask training (paper eq. 8): hard-concrete gates per cluster, model weights frozen.

All clusters are trained in one batched pass: every sample in a batch carries its own cluster's
sampled gates, so one forward/backward updates every cluster that appears in it. Only activation
gradients are computed (the weights' requires_grad is off during fit and restored after it, so neither the
flags nor any .grad of the user's model change), and the language-modelling loss is
taken on a random subset of positions so the large output layer does not dominate the step.

Training runs in two phases. A shared phase fits one mask on all samples (this is also the
"static L0" baseline when there is one cluster); its log_alpha then warm-starts every cluster's mask
for the cluster phase, where each cluster specialises on its own texts. The target sparsity ramps up
linearly during the first phase's warm-up, and the Lagrange multipliers are learnt by gradient ascent.
Data parallel (igprune.distributed, under torchrun): every rank draws the same random numbers, so the same
global batch, gates and loss positions, runs the forwards of its strided share of each batch's samples, and the
gate gradients (and the logged loss) are summed over the ranks before the Lagrangian term, the same on every rank,
is added once; only rank 0 writes checkpoints.
The shared phase trains one mask, held on its own (not as row 0 of the cluster masks), and draws the same
random numbers whatever the number of clusters, so it computes the same thing bit for bit for any N: its end
state, kept in `shared_dir`, starts the cluster phase of a fit with any number of clusters.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.blocks import control_of, final_hidden, output_logits
from igprune.bundle import fingerprint
from igprune.files import IGPruneError, atomic_path, read_json, sha256_tensors, write_json
from igprune.finders.base import Found
from igprune.finders.gates import HardConcreteGates, Lagrangian
from igprune.masks import Granularity, expand, n_units, units_off
from igprune.models import model_device
from igprune.nll import token_nll
from igprune.texts import Text, tokens

CLUSTER_PHASE = ("cluster_steps", "cluster_batch", "cluster_lr")  # TrainConfig fields the shared phase ignores


@dataclass
class TrainConfig:
    """Mask-training settings (learning rates: paper Table 5; budget: research/fit-budget/fit_budget.py)."""

    sparsity: float = 0.25
    # Phase 1 fits one mask on all data and must converge before phase 2 (one mask per cluster, all clusters
    # batched) starts from it; defaults: the headline fit (benchmarks/configs/headline.yaml).
    shared_steps: int = 200
    cluster_steps: int = 64
    batch_size: int = 16  # samples per forward/backward (and per shared-phase update)
    # Samples of every cluster in one cluster-phase update (gradients accumulated over forwards of batch_size);
    # None: batch_size // clusters, at least 1. Recipes compared in research/cluster-phase/cluster_phase.py.
    cluster_batch: int | None = None
    seq_len: int = 64
    loss_positions: int | None = 32  # positions per sample scored by the loss; None = all
    loss: str = "lm"  # "lm": next-token cross-entropy (eq. 8); "kl": KL to the dense model's logits
    granularity: Granularity = "block"  # "layer": one gate per layer covers its attention and FFN
    lr: float = 0.1  # log_alpha (paper Table 5)
    lagrangian_lr: float = 0.1  # lambda1, lambda2 (paper Table 5)
    cluster_lr: float | None = None  # log_alpha in the cluster phase; None = lr
    warmup_fraction: float = 0.5  # share of the first phase over which the target sparsity ramps up
    # P(z = 0) at the start. Not much higher than 1 - sparsity: far out in the sigmoid's tail the expected
    # sparsity barely moves with log_alpha, and the Lagrangian cannot pull it against the LM loss.
    init_keep: float = 0.9
    seed: int = 0
    # recompute each layer's activations in the backward pass: activation memory of one layer instead of all of
    # them, for about one more forward of compute; same gradients (tests/test_scale.py)
    gradient_checkpointing: bool = False

    def validate(self, n_blocks: int) -> None:
        units_off(self.sparsity, n_blocks, self.granularity)
        self.validate_settings()

    def validate_settings(self) -> None:
        """The checks that need no model."""
        if self.loss not in ("lm", "kl"):
            raise IGPruneError(f"loss must be 'lm' or 'kl', not {self.loss!r}")
        if (self.batch_size < 1 or self.seq_len < 2 or self.shared_steps < 0 or self.cluster_steps < 0
                or (self.cluster_batch is not None and self.cluster_batch < 1)):
            raise IGPruneError("batch_size >= 1, cluster_batch >= 1, seq_len >= 2 and non-negative step counts "
                               "are required")


@dataclass
class TrainLog:
    """The learning curve: one entry per step of each phase."""

    phase: list[str] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    expected_sparsity: list[float] = field(default_factory=list)
    target: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def append(self, phase: str, loss: float, expected: float, target: float, seconds: float) -> None:
        for name, value in zip(("phase", "loss", "expected_sparsity", "target", "seconds"),
                               (phase, loss, expected, target, seconds), strict=True):
            getattr(self, name).append(value)


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No weight gradients for the duration of a with-block; every requires_grad flag restored after it."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


class MaskTrainer:
    """Trains `n_masks` hard-concrete masks over the blocks (or layers) of a frozen model.

    `fit(input_ids, attention_mask, labels)` takes tokenised samples (M, T) and each sample's
    cluster id in [0, n_masks); afterwards `masks()` gives the binary block masks. `checkpoint_dir` keeps
    the latest state (a rerun resumes from it); `shared_dir` keeps the state at the end of the shared
    phase, and a trainer with any n_masks on the same model, samples and config starts from it.
    """

    def __init__(self, model: PreTrainedModel, n_masks: int, config: TrainConfig,
                 checkpoint_dir: Path | None = None, shared_dir: Path | None = None, progress: bool = True):
        self.model, self.config, self.n_masks = model, config, n_masks
        self.control = control_of(model)
        self.n_blocks = self.control.n_blocks
        config.validate(self.n_blocks)
        self.device = model_device(model)  # the first layer's, under a device_map; the gates live there
        self.n_units = n_units(self.n_blocks, config.granularity)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.shared_dir = Path(shared_dir) if shared_dir else None
        self.progress = progress
        self.log = TrainLog()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0  # global step over both phases
        self._new_masks(1 if config.shared_steps > 0 else n_masks, config.lr)

    def _new_masks(self, rows: int, lr: float | None) -> None:
        """Fresh gates, multipliers and optimisers for `rows` masks (one in the shared phase, one per cluster
        after it): the shared phase's tensors have the same shape for any N, so its rounding is the same too."""
        self.gates = HardConcreteGates(rows, self.n_units, init_keep=self.config.init_keep).to(self.device)
        self.lagrangian = Lagrangian(rows, self.n_units).to(self.device)
        self._optimizers(lr)

    def _optimizers(self, lr: float | None = None) -> None:
        self.opt_gates = torch.optim.Adam([self.gates.log_alpha], lr=self.config.lr if lr is None else lr)
        # Gradient ascent on the multipliers: maximize=True, not a negative learning rate.
        self.opt_lambda = torch.optim.Adam(self.lagrangian.parameters(), lr=self.config.lagrangian_lr, maximize=True)

    # ---- the loop ----------------------------------------------------------------------------------

    def fit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
            until: int | None = None, scored: torch.Tensor | None = None) -> MaskTrainer:
        """Train (resuming from the checkpoint if there is one); `until` stops early after that global step.
        scored: (M, T) bool, the tokens the loss scores (a request's response); by default every attended one."""
        cfg = self.config
        if input_ids.shape[0] == 0:
            raise IGPruneError("no calibration samples to train on")
        if int(labels.max()) >= self.n_masks or int(labels.min()) < 0:
            raise IGPruneError(f"cluster labels must lie in [0, {self.n_masks})")
        # what a checkpoint must match: the shared phase depends on `identity`, the cluster phase on `clusters` too
        config = asdict(cfg)
        attended = attention_mask.bool()
        scored = attended if scored is None else scored & attended
        # the samples' identity names `scored` only where it leaves attended tokens out, so plain-text checkpoints hold
        samples = sha256_tensors(input_ids, attention_mask, *([] if torch.equal(scored, attended) else [scored]))
        self.identity = {"model": fingerprint(self.model), "samples": samples,
                         "config": {k: v for k, v in config.items() if k not in CLUSTER_PHASE}}
        self.clusters = {"n_masks": self.n_masks, "labels": sha256_tensors(labels),
                         **{k: config[k] for k in CLUSTER_PHASE}}
        self._resume()
        checkpoint, self.control.checkpoint = self.control.checkpoint, cfg.gradient_checkpointing
        try:
            with frozen(self.model), self.control.active():
                self._loop(input_ids, attention_mask, scored, labels, until)
        finally:
            self.control.checkpoint = checkpoint
        return self

    def _loop(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor,
              labels: torch.Tensor, until: int | None) -> None:
        cfg = self.config
        total = cfg.shared_steps + cfg.cluster_steps
        bar = tqdm(total=total, initial=self.step, desc="mask training", unit="step",
                   disable=not distributed.shows_progress(self.progress))
        while self.step < min(total, until if until is not None else total):
            shared = self.step < cfg.shared_steps
            if not shared and self.step == cfg.shared_steps:
                self._warm_start_clusters()
            target = self._target()
            rows = self._batch_rows(labels, shared)
            loss, expected, seconds = self._train_step(input_ids[rows], attention_mask[rows], scored[rows],
                                                       None if shared else labels[rows], target)
            self.log.append("shared" if shared else "cluster", loss, expected, target, seconds)
            self.step += 1
            bar.update(1)
            bar.set_postfix(phase="shared" if shared else "cluster", loss=f"{loss:.3f}",
                            sparsity=f"{expected:.3f}", target=f"{target:.3f}")
            if self.step % 25 == 0:
                self.save_checkpoint(self.checkpoint_dir)
            if self.step == cfg.shared_steps:
                self.save_checkpoint(self.shared_dir)
        bar.close()
        self.save_checkpoint(self.checkpoint_dir)
        if cfg.cluster_steps == 0 and self.step == total:
            self._warm_start_clusters()  # every cluster gets the shared mask

    def _target(self) -> float:
        """Target sparsity now: ramps linearly from the initial expected sparsity (1 - init_keep) to the
        target over the warm-up of the first phase, then stays; starting where the gates start avoids an
        early push the wrong way."""
        cfg = self.config
        first = cfg.shared_steps if cfg.shared_steps > 0 else cfg.cluster_steps
        step = self.step if cfg.shared_steps > 0 else self.step - cfg.shared_steps
        start = min(1.0 - cfg.init_keep, cfg.sparsity)
        return start + (cfg.sparsity - start) * min(1.0, (step + 1) / max(1.0, cfg.warmup_fraction * first))

    def masks(self) -> torch.Tensor:
        """Binary block masks (n_masks, B), True = run, with exactly round(s * units) units off each."""
        k = units_off(self.config.sparsity, self.n_blocks, self.config.granularity)
        return expand(self.gates.binarize(k), self.config.granularity)

    def _batch_rows(self, labels: torch.Tensor, shared: bool) -> torch.Tensor:
        """Sample indices for one update: batch_size random samples in the shared phase, cluster_batch samples
        of every cluster in the cluster phase."""
        if shared:
            return torch.randint(0, labels.numel(), (self.config.batch_size,), generator=self.generator)
        per_cluster = self.config.cluster_batch or max(1, self.config.batch_size // self.n_masks)
        rows = []
        for k in range(self.n_masks):
            members = (labels == k).nonzero().flatten()
            rows.append(members[torch.randint(0, members.numel(), (per_cluster,), generator=self.generator)])
        return torch.cat(rows)

    def _train_step(self, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor, rows: torch.Tensor | None,
                    target: float) -> tuple[float, float, float]:
        """One update; rows = each sample's mask row, or None in the shared phase (row 0 for all).

        The update's samples go through the model in forwards of at most batch_size, their gradients summed.
        """
        start = time.perf_counter()
        active = slice(0, 1) if rows is None else slice(None)  # which masks this phase trains
        rows = torch.zeros(len(ids), dtype=torch.long) if rows is None else rows
        # eq. 8 per cluster: the mean LM loss of its samples plus its Lagrangian term
        counts = torch.bincount(rows, minlength=self.n_masks).float()
        weights = 1.0 / counts[rows]
        self.opt_gates.zero_grad()
        self.opt_lambda.zero_grad()
        lm = 0.0
        for chunk in torch.arange(len(ids)).split(self.config.batch_size):
            lm += self._accumulate(ids[chunk], mask[chunk], scored[chunk], rows[chunk], weights[chunk])
        lm = self._sum_over_ranks(lm)
        expected = self.gates.expected_sparsity()
        self.lagrangian(expected, target)[active].sum().backward()
        self.opt_gates.step()
        self.opt_lambda.step()
        return lm / int((counts > 0).sum()), expected[active].mean().item(), time.perf_counter() - start

    def _accumulate(self, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor, rows: torch.Tensor,
                    weights: torch.Tensor) -> float:
        """Forward and backward of one batch under freshly sampled gates; returns its weighted loss.

        The whole batch's random numbers are drawn on every rank; this rank runs only its share of the samples."""
        ids, mask, scored, rows, weights = (t.to(self.device) for t in (ids, mask, scored, rows, weights))
        positions = self._loss_positions(scored)
        z = self.gates.sample(rows, generator=self.generator)
        mine = torch.tensor(distributed.shard(range(len(ids))), dtype=torch.long, device=self.device)
        if mine.numel() == 0:
            return 0.0
        ids, mask, scored, weights, positions, z = (t[mine] for t in (ids, mask, scored, weights, positions, z))
        with self.control.gated(expand(z, self.config.granularity)):  # backward inside: checkpointing recomputes
            hidden = final_hidden(self.model, ids, mask)
            loss = (self._loss(hidden, ids, mask, scored, positions) * weights).sum()
            loss.backward()
        return loss.item()

    def _sum_over_ranks(self, lm: float) -> float:
        """Sum the gate gradients and the loss over the ranks (in float64): the single-process step's values."""
        if distributed.world_size() == 1:
            return lm
        log_alpha = self.gates.log_alpha
        grad = log_alpha.grad if log_alpha.grad is not None else torch.zeros_like(log_alpha)
        flat = torch.cat([grad.flatten().double(), torch.tensor([lm], dtype=torch.float64, device=grad.device)])
        distributed.all_reduce_sum_(flat)
        log_alpha.grad = flat[:-1].view_as(log_alpha).to(log_alpha.dtype)
        return flat[-1].item()

    def _loss_positions(self, scored: torch.Tensor) -> torch.Tensor:
        """(batch, P) positions whose next token is predicted; sampled among those whose next token is scored."""
        valid = scored[:, 1:]  # position t predicts token t+1
        k = self.config.loss_positions
        if k is None or k >= valid.shape[1]:
            return torch.arange(valid.shape[1], device=scored.device).expand(valid.shape[0], -1)
        scores = torch.rand(valid.shape, generator=self.generator).to(scored.device) + valid.float()
        return scores.topk(k, dim=1).indices  # valid positions first, random among them

    def _loss(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        """Per-sample loss at `positions`: next-token cross-entropy, or KL to the dense model."""
        picked = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = output_logits(self.model, picked)
        weight = torch.gather(scored[:, 1:], 1, positions).float()
        if self.config.loss == "lm":
            targets = torch.gather(ids[:, 1:], 1, positions)
            token_loss = token_nll(logits, targets).flatten()
        else:
            with torch.no_grad(), self.control.masked(None):
                dense_hidden = final_hidden(self.model, ids, mask)
                dense_picked = torch.gather(dense_hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
                dense_logp = F.log_softmax(output_logits(self.model, dense_picked), dim=-1)
            token_loss = F.kl_div(F.log_softmax(logits, dim=-1), dense_logp, log_target=True,
                                  reduction="none").sum(-1).flatten()
        token_loss = token_loss.view(weight.shape) * weight
        return token_loss.sum(1) / weight.sum(1).clamp(min=1)

    def _warm_start_clusters(self) -> None:
        """Phase 2: every cluster's mask and multipliers start from the shared ones, with fresh optimisers."""
        shared = [t.detach()[:1].clone() for t in (self.gates.log_alpha, self.lagrangian.lambda1,
                                                   self.lagrangian.lambda2)]
        self._new_masks(self.n_masks, self.config.cluster_lr)
        with torch.no_grad():
            for param, value in zip((self.gates.log_alpha, self.lagrangian.lambda1, self.lagrangian.lambda2), shared,
                                    strict=True):
                param.copy_(value.expand_as(param))

    # ---- checkpoint and resume ---------------------------------------------------------------------

    def save_checkpoint(self, folder: Path | None) -> None:
        """Gates, multipliers, optimiser moments, RNG and learning curve; written atomically, by rank 0 only."""
        with distributed.main_writes() as write:
            if folder and write:
                self._write_checkpoint(folder)

    def _write_checkpoint(self, folder: Path) -> None:
        tensors = {"log_alpha": self.gates.log_alpha.detach().cpu(),
                   "lambda1": self.lagrangian.lambda1.detach().cpu(),
                   "lambda2": self.lagrangian.lambda2.detach().cpu(),
                   "rng": self.generator.get_state()}
        for prefix, param, states in self._optimised():
            for key, value in states.get(param, {}).items():
                tensors[f"{prefix}.{key}"] = torch.as_tensor(value).detach().cpu()
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
            write_json(tmp / "trainer.json", {"step": self.step, "identity": self.identity, "clusters": self.clusters,
                                              "log": asdict(self.log)})

    def _optimised(self):
        """(key prefix, parameter, its optimiser's state map) for every trained parameter."""
        for name, opt in (("opt_gates", self.opt_gates), ("opt_lambda", self.opt_lambda)):
            for i, param in enumerate(p for group in opt.param_groups for p in group["params"]):
                yield f"{name}.{i}", param, opt.state

    def _resume(self) -> None:
        """Continue from the checkpoint; failing that, start the cluster phase from a saved shared phase."""
        for folder in (self.checkpoint_dir, self.shared_dir):
            if folder and (folder / "trainer.json").is_file():
                self._load(folder)
                return

    def _load(self, folder: Path) -> None:
        meta = read_json(folder / "trainer.json")
        # the shared phase trains one mask on samples drawn without regard to the clusters
        shared = meta["step"] <= self.config.shared_steps
        if meta.get("identity") != self.identity or not (shared or meta.get("clusters") == self.clusters):
            raise IGPruneError(f"checkpoint in {folder} was made with another model, other samples, clusters or "
                               "settings; remove it or rerun with the same ones")
        tensors = load_file(folder / "state.safetensors")
        self.step = meta["step"]
        self.log = TrainLog(**meta["log"])
        if not shared:
            self._new_masks(self.n_masks, self.config.cluster_lr)  # phase 2 masks and optimisers
        with torch.no_grad():
            for name, param in (("log_alpha", self.gates.log_alpha), ("lambda1", self.lagrangian.lambda1),
                                ("lambda2", self.lagrangian.lambda2)):
                param.copy_(tensors[name])
        self.generator.set_state(tensors["rng"])
        for prefix, param, states in self._optimised():
            state = {k.rsplit(".", 1)[1]: v.to(self.device) for k, v in tensors.items() if k.startswith(prefix + ".")}
            if state:
                states[param] = state


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[Text],
             seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (M, T) ids, attention mask and scored mask (the tokens the loss scores: a passage's, a
    request's response), each text cut to its first seq_len tokens."""
    rows = [[part[:seq_len] for part in tokens(tokenizer, t)] for t in texts]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([row + [pad] * (width - len(row)) for row, _ in rows], dtype=torch.long)
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row, _ in rows], dtype=torch.long)
    scored = torch.tensor([flags + [False] * (width - len(flags)) for _, flags in rows], dtype=torch.bool)
    return ids, attention, scored


def train_cluster_masks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[Text],
                        labels: torch.Tensor, n_clusters: int, config: TrainConfig,
                        checkpoint_dir: Path | None = None, shared_dir: Path | None = None,
                        progress: bool = True) -> Found:
    """The paper's finder: one hard-concrete mask per cluster (`labels`: each text's), all trained in one batched
    pass; no global mask, so nothing to choose against."""
    ids, mask, scored = tokenize(tokenizer, texts, config.seq_len)
    unscored = int((~scored[:, 1:].any(dim=1)).sum())
    if unscored:
        warnings.warn(f"{unscored} request(s) have no response token within their first {config.seq_len} tokens "
                      "and teach the masks nothing; raise l0.seq_len", stacklevel=3)
    trainer = MaskTrainer(model, n_clusters, config, checkpoint_dir=checkpoint_dir, shared_dir=shared_dir,
                          progress=progress).fit(ids, mask, labels, scored=scored)
    masks = trainer.masks()
    return Found(masks, None, masks[:0], [], {"train": asdict(trainer.log)},
                 trainer.gates.log_alpha.detach().cpu())
