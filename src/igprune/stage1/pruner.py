"""IGPruner: stage 1 end to end, in the scikit-learn style (parameters in the constructor, fit, then use).

    pruner = IGPruner(model, tokenizer, n_clusters=16, sparsity=0.25).fit(texts)
    pruner.save("bundle/")            # then: DynamicPrunedModel.from_bundle(model, "bundle/")

fit() embeds the calibration texts with the sentence encoder, clusters them with K-means, tokenises
them (each text truncated to `seq_len` tokens) and trains one hard-concrete mask per cluster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune.blocks import num_blocks
from igprune.bundle import Bundle, fingerprint
from igprune.encoder import DEFAULT_ENCODER, SentenceEncoder
from igprune.files import IGPruneError, atomic_path
from igprune.masks import skipped_blocks
from igprune.models import tokenizer_sides
from igprune.stage1.clustering import Clustering, check_n_clusters, cluster
from igprune.stage1.train import MaskTrainer, TrainConfig


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (M, T) ids and attention mask, each text truncated to its first seq_len tokens."""
    with tokenizer_sides(tokenizer, padding="right"):
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
    return batch.input_ids, batch.attention_mask


def clean_texts(texts: list[str]) -> list[str]:
    """Drop empty calibration texts with a warning; none left is an error."""
    kept = [t for t in texts if isinstance(t, str) and t.strip()]
    if len(kept) < len(texts):
        warnings.warn(f"dropped {len(texts) - len(kept)} empty calibration text(s)", stacklevel=3)
    if not kept:
        raise IGPruneError("no calibration texts: give at least one non-empty text")
    return kept


class IGPruner:
    """Finds one binary block mask per semantic cluster of the calibration data."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n_clusters: int = 16,
                 sparsity: float = 0.25, encoder: str = DEFAULT_ENCODER, seed: int = 0, min_cluster_size: int = 4,
                 train: TrainConfig | None = None, encoder_tokens: int = 64,
                 checkpoint_dir: str | Path | None = None, shared_dir: str | Path | None = None,
                 progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
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

    def fit(self, texts: list[str]) -> IGPruner:
        started = time.perf_counter()
        self.train_config.validate(num_blocks(self.model))  # fail before the slow steps
        texts = clean_texts(texts)
        check_n_clusters(self.n_clusters, len(texts))
        embeddings = self._embed(texts)
        self.clustering_: Clustering = cluster(embeddings, self.n_clusters, self.seed, self.min_cluster_size)
        ids, mask = tokenize(self.tokenizer, texts, self.train_config.seq_len)
        self.trainer_ = MaskTrainer(self.model, len(self.clustering_.centroids), self.train_config,
                                    checkpoint_dir=self.checkpoint_dir and Path(self.checkpoint_dir) / "masks",
                                    shared_dir=self.shared_dir and Path(self.shared_dir),
                                    progress=self.progress)
        self.trainer_.fit(ids, mask, self.clustering_.labels)
        self.masks_ = self.trainer_.masks()
        self.log_alpha_ = self.trainer_.gates.log_alpha.detach().cpu()
        self.seconds_ = time.perf_counter() - started
        return self

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Sentence embeddings of the texts; kept in the checkpoint folder so a resumed fit skips encoding."""
        key = hashlib.sha256("\x00".join([self.encoder_name, str(self.encoder_tokens), *texts]).encode()).hexdigest()
        cached = Path(self.checkpoint_dir) / "embeddings.safetensors" if self.checkpoint_dir else None
        if cached and cached.is_file():
            with safe_open(cached, "pt") as f:
                if f.metadata().get("key") == key:
                    return f.get_tensor("embeddings")
        encoder = SentenceEncoder(self.encoder_name, max_tokens=self.encoder_tokens)
        embeddings = encoder.encode(texts, progress=self.progress)
        if cached:
            with atomic_path(cached) as tmp:
                save_file({"embeddings": embeddings.contiguous()}, tmp, metadata={"key": key})
        return embeddings

    def to_bundle(self) -> Bundle:
        if not hasattr(self, "masks_"):
            raise IGPruneError("call fit(texts) before saving")
        log = self.trainer_.log
        n_blocks = self.masks_.shape[1]
        config = {
            "method": "ig-pruning" if len(self.clustering_.centroids) > 1 else "static-l0",
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
            "train": dataclasses.asdict(self.train_config),
            "final_loss": sum(log.loss[-10:]) / max(1, len(log.loss[-10:])),
            "final_expected_sparsity": log.expected_sparsity[-1] if log.expected_sparsity else None,
            "fit_seconds": round(self.seconds_, 1),
        }
        return Bundle(self.masks_, self.clustering_.centroids, config, self.log_alpha_,
                      logs={"train": dataclasses.asdict(log)})

    def save(self, path: str | Path) -> Path:
        return self.to_bundle().save(path)
