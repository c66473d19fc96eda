"""IGPruner: stage 1 end to end, in the scikit-learn style (parameters in the constructor, fit, then use).

    pruner = IGPruner(model, tokenizer, n_clusters=16, sparsity=0.25).fit(texts)
    pruner.save("bundle/")            # then: DynamicPrunedModel.from_bundle(model, "bundle/")

fit() embeds the calibration texts with the sentence encoder, clusters them with K-means and finds one mask
per cluster. finder="l0" (the paper's) tokenises the texts (each truncated to `seq_len` tokens) and trains
one hard-concrete mask per cluster; finder="sleb" runs SLEB on each cluster's own text from a shared global
prefix (stage1/search.py), scoring every candidate exactly instead of estimating a gradient.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.blocks import num_blocks
from igprune.bundle import Bundle, fingerprint
from igprune.encoder import DEFAULT_ENCODER, SentenceEncoder
from igprune.files import IGPruneError, atomic_path
from igprune.masks import skipped_blocks
from igprune.models import model_device
from igprune.stage1.clustering import Clustering, check_n_clusters, cluster
from igprune.stage1.train import MaskTrainer, TrainConfig
from igprune.stage2.router import gate_radii
from igprune.texts import Request, Text, clean_texts, digest, routed, tokens

Finder = Literal["l0", "sleb"]
Margin = float | Literal["auto"]
FINDERS: tuple[str, ...] = ("l0", "sleb")
# stage1/search.py's defaults, here so the constructor can record them without importing the baselines
SEARCH_DEFAULTS: dict[str, Any] = {"samples": 8, "seq_len": 64, "packing": "texts", "shared_samples": 16,
                                   "shared_fraction": 0.5, "prefix": None, "global_order": None, "choose_samples": 8,
                                   "choose_margin": "auto", "candidates": None, "metric": "ppl"}


def check_search(options: dict[str, Any]) -> dict[str, Any]:
    """Search-finder options completed with SEARCH_DEFAULTS; unknown names, a shared_fraction outside [0, 1],
    an unknown packing or metric, a negative choose_samples and candidates or a global order with nothing to choose
    them are one-line errors."""
    unknown = sorted(set(options) - set(SEARCH_DEFAULTS))
    if unknown:
        raise IGPruneError(f"unknown search option {', '.join(unknown)}; known: {', '.join(SEARCH_DEFAULTS)}")
    options = {**SEARCH_DEFAULTS, **options}
    if not 0.0 <= options["shared_fraction"] <= 1.0:
        raise IGPruneError(f"shared_fraction must be in [0, 1], got {options['shared_fraction']}")
    if options["packing"] not in ("joined", "texts"):
        raise IGPruneError(f"packing must be 'joined' or 'texts', got {options['packing']!r}")
    if options["metric"] not in ("ppl", "kl"):
        raise IGPruneError(f"metric must be 'ppl' or 'kl', got {options['metric']!r}")
    if not isinstance(options["choose_samples"], int) or options["choose_samples"] < 0:
        raise IGPruneError(f"choose_samples must be a whole number >= 0 (0: no choosing), "
                           f"got {options['choose_samples']!r}")
    check_margin(options["choose_margin"])
    if (options["candidates"] or options["global_order"]) and not options["choose_samples"]:
        raise IGPruneError("extra candidate and global masks are only used when each cluster chooses its mask: give "
                           "choose_samples > 0 (--choose-samples)")
    return options


def check_margin(margin: Margin) -> None:
    """A choice margin is a number of standard errors >= 0 or "auto" (stage1.search.bonferroni_margin)."""
    if margin != "auto" and not (isinstance(margin, int | float) and not isinstance(margin, bool) and margin >= 0):
        raise IGPruneError(f"choose_margin must be a number of standard errors >= 0 or 'auto', got {margin!r}")


def check_gate(gate: float | None, finder: Finder, search: dict[str, Any]) -> float | None:
    """A gate quantile is in (0, 1], and needs the global mask the search finder's choice starts from."""
    if gate is None:
        return None
    if isinstance(gate, bool) or not isinstance(gate, int | float) or not 0.0 < gate <= 1.0:
        raise IGPruneError(f"the gate quantile must be in (0, 1], e.g. 0.95, got {gate!r}")
    if finder != "sleb" or not search["choose_samples"]:
        raise IGPruneError("a gate falls back to the global mask each cluster chooses against: use the search finder "
                           "with choose_samples > 0 (--finder sleb)")
    return float(gate)


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


class IGPruner:
    """Finds one binary block mask per semantic cluster of the calibration data."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n_clusters: int = 16,
                 sparsity: float = 0.25, encoder: str = DEFAULT_ENCODER, seed: int = 0, min_cluster_size: int = 4,
                 train: TrainConfig | None = None, encoder_tokens: int = 64,
                 checkpoint_dir: str | Path | None = None, shared_dir: str | Path | None = None,
                 progress: bool = True, finder: Finder = "l0", search: dict[str, Any] | None = None,
                 gate: float | None = None):
        if finder not in FINDERS:
            raise IGPruneError(f"finder must be one of {', '.join(FINDERS)}, not {finder!r}")
        self.model, self.tokenizer = model, tokenizer
        self.finder, self.search_options = finder, check_search(search or {})  # before any slow step
        # an input farther from its cluster than this quantile of the cluster's texts runs under the global mask
        self.gate = check_gate(gate, finder, self.search_options)
        self.n_clusters, self.sparsity, self.seed = n_clusters, sparsity, seed
        # Texts are embedded from their first `encoder_tokens` tokens, here and when routing: a prefix
        # places a text well enough (64 tokens route 93% of evaluation prompts as 256 do) and keeps routing
        # at about 2% of a 512-token prefill of smollm2 (benchmarks/routing_overhead.py).
        self.encoder_name, self.encoder_tokens = encoder, encoder_tokens
        self.min_cluster_size = min_cluster_size
        self.train_config = dataclasses.replace(train or TrainConfig(), sparsity=sparsity, seed=seed)
        # the end of the shared phase, which any n_clusters on the same model, texts and settings starts from
        self.checkpoint_dir, self.shared_dir = checkpoint_dir, shared_dir
        self.progress = progress

    def fit(self, texts: Sequence[Text]) -> IGPruner:
        started = time.perf_counter()
        self.train_config.validate(num_blocks(self.model))  # fail before the slow steps
        texts = clean_texts(texts)
        check_n_clusters(self.n_clusters, len(texts))
        if self.finder == "sleb":
            from igprune.stage1.search import check_given_masks

            check_given_masks(self.model, self.sparsity, self.train_config.granularity,
                              self.search_options["global_order"], self.search_options["candidates"])
        # on rank 0 only, the result sent to all: every rank must train on exactly the same clusters; a request is
        # placed by its prompt, which is all the router will see of it
        self.clustering_, self.radii_ = distributed.on_main(lambda: self._cluster([routed(t) for t in texts]))
        if self.finder == "sleb":
            self._search(texts)
        else:
            self._train(texts)
        self.seconds_ = time.perf_counter() - started
        return self

    def _search(self, texts: list[Text]) -> None:
        # imports the baselines, which import this module
        from igprune.stage1.search import find_order_mask, search_cluster_masks

        labels = self.clustering_.labels.tolist()
        groups = [[t for t, label in zip(texts, labels, strict=True) if label == k]
                  for k in range(len(self.clustering_.centroids))]
        self.masks_, self.search_log_ = search_cluster_masks(
            self.model, self.tokenizer, groups, self.sparsity, self.train_config.granularity, self.seed,
            checkpoint=self.checkpoint_dir and Path(self.checkpoint_dir) / "searches", progress=self.progress,
            **self.search_options)
        self.log_alpha_ = None
        if self.gate is not None:  # the mask every cluster's choice started from
            self.fallback_ = find_order_mask(self.model, self.search_log_["global_order"],
                                             self.train_config.granularity)

    def _train(self, texts: list[str]) -> None:
        ids, mask, scored = tokenize(self.tokenizer, texts, self.train_config.seq_len)
        unscored = int((~scored[:, 1:].any(dim=1)).sum())
        if unscored:
            warnings.warn(f"{unscored} request(s) have no response token within their first {self.train_config.seq_len}"
                          " tokens and teach the masks nothing; raise seq_len (--seq-len)", stacklevel=3)
        self.trainer_ = MaskTrainer(self.model, len(self.clustering_.centroids), self.train_config,
                                    checkpoint_dir=self.checkpoint_dir and Path(self.checkpoint_dir) / "masks",
                                    shared_dir=self.shared_dir and Path(self.shared_dir),
                                    progress=self.progress)
        self.trainer_.fit(ids, mask, self.clustering_.labels, scored=scored)
        self.masks_ = self.trainer_.masks()
        self.log_alpha_ = self.trainer_.gates.log_alpha.detach().cpu()

    def _cluster(self, texts: list[str]) -> tuple[Clustering, torch.Tensor | None]:
        """K-means on the texts' embeddings and, with a gate, each cluster's radius over the same embeddings."""
        embeddings = self._embed(texts)
        clustering = cluster(embeddings, self.n_clusters, self.seed, self.min_cluster_size)
        if self.gate is None:
            return clustering, None
        return clustering, gate_radii(clustering.centroids, embeddings, self.gate)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Sentence embeddings of the texts; kept in the checkpoint folder so a resumed fit skips encoding."""
        key = hashlib.sha256("\x00".join([self.encoder_name, str(self.encoder_tokens), *texts]).encode()).hexdigest()
        cached = Path(self.checkpoint_dir) / "embeddings.safetensors" if self.checkpoint_dir else None
        if cached and cached.is_file():
            with safe_open(cached, "pt") as f:
                if f.metadata().get("key") == key:
                    return f.get_tensor("embeddings")
        encoder = SentenceEncoder(self.encoder_name, device=model_device(self.model), max_tokens=self.encoder_tokens)
        embeddings = encoder.encode(texts, progress=self.progress)
        if cached and distributed.is_main():
            with atomic_path(cached) as tmp:
                save_file({"embeddings": embeddings.contiguous()}, tmp, metadata={"key": key})
        return embeddings

    def to_bundle(self) -> Bundle:
        if not hasattr(self, "masks_"):
            raise IGPruneError("call fit(texts) before saving")
        n_blocks = self.masks_.shape[1]
        config = {
            "method": "ig-pruning" if len(self.clustering_.centroids) > 1 else {"l0": "static-l0"}.get(self.finder,
                                                                                                     self.finder),
            "model": self.model.name_or_path,
            "fingerprint": fingerprint(self.model),
            "encoder": self.encoder_name,
            "encoder_tokens": self.encoder_tokens,
            "n_clusters": len(self.clustering_.centroids),
            "n_clusters_requested": self.clustering_.requested,
            "cluster_sizes": self.clustering_.sizes,
            "sparsity": self.sparsity,
            "granularity": self.train_config.granularity,
            "blocks_total": n_blocks,
            "blocks_skipped": skipped_blocks(self.masks_[0])["total"],
            "seed": self.seed,
            "finder": self.finder,
            "fit_seconds": round(self.seconds_, 1),
        }
        if self.finder == "sleb":
            config["search"] = self.search_options
            bundle = Bundle(self.masks_, self.clustering_.centroids, config, logs={"search": self.search_log_})
            return bundle if self.gate is None else bundle.with_gate(self.radii_, self.fallback_, self.gate)
        log = self.trainer_.log
        config.update({"train": dataclasses.asdict(self.train_config),
                       "final_loss": sum(log.loss[-10:]) / max(1, len(log.loss[-10:])),
                       "final_expected_sparsity": log.expected_sparsity[-1] if log.expected_sparsity else None})
        return Bundle(self.masks_, self.clustering_.centroids, config, self.log_alpha_,
                      logs={"train": dataclasses.asdict(log)})

    def save(self, path: str | Path) -> Path:
        return self.to_bundle().save(path)


def fit_texts(data: str, samples: int | None, seq_len: int, seed: int = 0, max_chars: int | None = None) -> list[str]:
    """fit_bundle's calibration passages: `samples` training passages of `data`, about as long as a training
    sample (4 x seq_len characters) unless `max_chars` says otherwise."""
    from igprune.data import MIN_CHARS, load_calibration

    return load_calibration(data, split="train", max_chars=max_chars or max(MIN_CHARS, 4 * seq_len), limit=samples,
                            seed=seed)


def fit_bundle(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n_clusters: int, sparsity: float,
               train: TrainConfig, data: str = "mixed", samples: int | None = 4096, max_chars: int | None = None,
               seed: int = 0, checkpoint_dir: str | Path | None = None, shared_dir: str | Path | None = None,
               progress: bool = True, finder: Finder = "l0", search: dict[str, Any] | None = None,
               encoder: str = DEFAULT_ENCODER, extra: Sequence[Text] = (), gate: float | None = None) -> Bundle:
    """The `igprune fit` recipe, which the benchmarks use too: `samples` training passages of `data` about as
    long as a training sample (4 x seq_len characters), so the text that is clustered is the text that is
    trained on; then IGPruner.fit. `extra` texts join them whole (inputs a deployment expects that no source
    holds; a Request is clustered by its prompt and scored on its response). The bundle records where its
    calibration text came from."""
    texts = [*fit_texts(data, samples, train.seq_len, seed, max_chars), *extra]
    pruner = IGPruner(model, tokenizer, n_clusters=n_clusters, sparsity=sparsity, encoder=encoder, seed=seed,
                      train=train, checkpoint_dir=checkpoint_dir, shared_dir=shared_dir, progress=progress,
                      finder=finder, search=search, gate=gate).fit(texts)
    bundle = pruner.to_bundle()
    bundle.config["calibration"] = {"source": data, "passages": len(texts), "samples": samples,
                                    "seq_len": train.seq_len}
    if extra:  # the user's own texts: how many, and a digest to tell whether a refit had the same ones
        bundle.config["calibration"].update(extra=len(extra), extra_sha256=digest(extra))
        answered = sum(isinstance(t, Request) for t in extra)
        if answered:  # scored on their responses only
            bundle.config["calibration"]["extra_requests"] = answered
    return bundle
