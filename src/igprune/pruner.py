"""IGPruner: stage 1 of the paper end to end, in the scikit-learn style (a recipe in the constructor, fit, use).

    pruner = IGPruner(model, tokenizer, "paper", sparsity=0.25).fit(texts)
    pruner.save("bundle/")            # then: DynamicPrunedModel.from_bundle(model, "bundle/")

fit() follows the paper: (1) embed the calibration texts with the sentence encoder and cluster them with
K-means; (2) find masks for each cluster, by the paper's hard-concrete (L0) training or by SLEB searches from a
shared prefix (finders.search); (3) with a search, choose each cluster's mask among every cluster's, the global one
and any extra candidates on text no search scored (choosing); (4) keep what the router needs: the centroids and,
with a gate, each cluster's radius. Learned attributes end in an underscore.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.blocks import num_blocks
from igprune.bundle import Bundle, fingerprint
from igprune.choosing import choose_masks
from igprune.clustering import Clustering, check_n_clusters, cluster
from igprune.config import FitConfig
from igprune.encoder import SentenceEncoder
from igprune.files import IGPruneError, atomic_path
from igprune.finders.base import Found
from igprune.finders.l0 import train_cluster_masks
from igprune.finders.search import check_given_masks, search_cluster_masks
from igprune.masks import skipped_blocks
from igprune.models import model_device
from igprune.recipes import DEFAULT_RECIPE, recipe
from igprune.routing import gate_radii
from igprune.texts import Request, Text, clean_texts, digest, routed


def fit_config(recipe_or_config: str | FitConfig = DEFAULT_RECIPE, changes: dict[str, Any] | None = None,
               **top: Any) -> FitConfig:
    """A recipe (or config) with nested `changes` and then top-level fields (sparsity, seed, n_clusters: the
    clusters' N) applied, validated: what IGPruner and `igprune fit` run."""
    config = recipe(recipe_or_config) if isinstance(recipe_or_config, str) else recipe_or_config
    config = config.updated(changes or {})
    if top.get("n_clusters") is not None:
        config = config.updated({"clusters": {"n_clusters": top.pop("n_clusters")}})
    return config.updated({k: v for k, v in top.items() if v is not None}).validate()


class IGPruner:
    """Finds one binary block mask per semantic cluster of the calibration data.

    recipe: a recipe name (igprune.recipes) or a FitConfig; `config` changes some of its fields (nested as in
    FitConfig.to_dict), and n_clusters, sparsity and seed, when given, override the rest.
    checkpoint_dir: progress kept there, so a rerun of an interrupted fit continues it. shared_dir: the L0 shared
    phase's end kept there, which fits with another n_clusters on the same model, texts and settings start from.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 recipe: str | FitConfig = DEFAULT_RECIPE, *, config: dict[str, Any] | None = None,
                 n_clusters: int | None = None, sparsity: float | None = None, seed: int | None = None,
                 checkpoint_dir: str | Path | None = None, shared_dir: str | Path | None = None,
                 progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.config = fit_config(recipe, config, n_clusters=n_clusters, sparsity=sparsity, seed=seed)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.shared_dir = Path(shared_dir) if shared_dir else None
        self.progress = progress

    def fit(self, texts: Sequence[Text]) -> IGPruner:
        started = time.perf_counter()
        cfg = self.config
        cfg.train_config().validate(num_blocks(self.model))  # fail before the slow steps
        texts = clean_texts(texts)
        check_n_clusters(cfg.clusters.n_clusters, len(texts))
        if cfg.finder == "search":
            check_given_masks(self.model, cfg.sparsity, cfg.granularity, cfg.search.global_order,
                              cfg.search.candidates)
        # (1) cluster, on rank 0 only with the result sent to all: every rank must find masks for exactly the same
        # clusters. A request is placed by its prompt, which is all the router will see of it.
        self.clustering_, embeddings = distributed.on_main(lambda: self._cluster([routed(t) for t in texts]))
        labels = self.clustering_.labels.tolist()
        groups = [[t for t, label in zip(texts, labels, strict=True) if label == k]
                  for k in range(len(self.clustering_.centroids))]
        # (2) find candidate masks for each cluster, and (3) choose each cluster's among them
        found = self._find(texts, groups)
        self.log_alpha_, self.fallback_, self.find_log_ = found.log_alpha, found.global_mask, found.log
        chooses = found.global_mask is not None and cfg.choose.samples > 0
        self.masks_ = self._choose(groups, found) if chooses else found.masks
        # (4) what the router needs beyond the centroids: with a gate, each cluster's radius
        self.radii_ = None if cfg.route.gate is None else gate_radii(self.clustering_.centroids, embeddings,
                                                                     cfg.route.gate)
        self.seconds_ = time.perf_counter() - started
        return self

    def _cluster(self, texts: list[str]) -> tuple[Clustering, torch.Tensor]:
        embeddings = self._embed(texts)
        cfg = self.config
        return cluster(embeddings, cfg.clusters.n_clusters, cfg.seed, cfg.clusters.min_cluster_size), embeddings

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Sentence embeddings of the texts; kept in the checkpoint folder so a resumed fit skips encoding."""
        name, max_tokens = self.config.clusters.encoder, self.config.clusters.encoder_tokens
        key = hashlib.sha256("\x00".join([name, str(max_tokens), *texts]).encode()).hexdigest()
        cached = self.checkpoint_dir / "embeddings.safetensors" if self.checkpoint_dir else None
        if cached and cached.is_file():
            with safe_open(cached, "pt") as f:
                if f.metadata().get("key") == key:
                    return f.get_tensor("embeddings")
        encoder = SentenceEncoder(name, device=model_device(self.model), max_tokens=max_tokens)
        embeddings = encoder.encode(texts, progress=self.progress)
        if cached and distributed.is_main():
            with atomic_path(cached) as tmp:
                save_file({"embeddings": embeddings.contiguous()}, tmp, metadata={"key": key})
        return embeddings

    def _find(self, texts: list[Text], groups: list[list[Text]]) -> Found:
        """The config's finder: the paper's L0 training, or SLEB per cluster from a shared prefix (with the global
        mask each cluster then chooses against, when it chooses)."""
        cfg, folder = self.config, self.checkpoint_dir
        if cfg.finder == "l0":
            return train_cluster_masks(self.model, self.tokenizer, texts, self.clustering_.labels, len(groups),
                                       cfg.train_config(), folder and folder / "masks", self.shared_dir, self.progress)
        return search_cluster_masks(self.model, self.tokenizer, groups, cfg.sparsity, cfg.granularity, cfg.seed,
                                    cfg.search, with_global=cfg.choose.samples > 0,
                                    checkpoint=folder and folder / "searches", progress=self.progress)

    def _choose(self, groups: list[list[Text]], found: Found) -> torch.Tensor:
        """Each cluster's mask among every cluster's, the global one and the extra candidates, on rows its finder did
        not score, leaving the global mask only for a mask clearly better there."""
        cfg = self.config
        pool = torch.cat([found.masks, found.global_mask[None], found.candidates])
        masks, self.find_log_["choose"] = choose_masks(
            self.model, self.tokenizer, groups, pool, cfg.choose.samples, cfg.search.seq_len, exclude=found.scored,
            seed=cfg.seed, packing=cfg.search.packing, default=len(groups), margin=cfg.choose.margin)
        return masks

    def to_bundle(self) -> Bundle:
        if not hasattr(self, "masks_"):
            raise IGPruneError("call fit(texts) before saving")
        cfg = self.config
        n_clusters = len(self.clustering_.centroids)
        config = {
            "method": "ig-pruning" if n_clusters > 1 else {"l0": "static-l0"}.get(cfg.finder, cfg.finder),
            "recipe": cfg.recipe,
            "model": self.model.name_or_path,
            "fingerprint": fingerprint(self.model),
            "encoder": cfg.clusters.encoder,
            "encoder_tokens": cfg.clusters.encoder_tokens,
            "n_clusters": n_clusters,
            "n_clusters_requested": self.clustering_.requested,
            "cluster_sizes": self.clustering_.sizes,
            "sparsity": cfg.sparsity,
            "granularity": cfg.granularity,
            "blocks_total": self.masks_.shape[1],
            "blocks_skipped": skipped_blocks(self.masks_[0])["total"],
            "seed": cfg.seed,
            "finder": cfg.finder,
            "fit_seconds": round(self.seconds_, 1),
            "fit": cfg.to_dict(),
        }
        if cfg.finder == "search":
            bundle = Bundle(self.masks_, self.clustering_.centroids, config, logs={"search": self.find_log_})
            return bundle if self.radii_ is None else bundle.with_gate(self.radii_, self.fallback_, cfg.route.gate)
        loss, expected = self.find_log_["train"]["loss"][-10:], self.find_log_["train"]["expected_sparsity"]
        config.update({"final_loss": sum(loss) / max(1, len(loss)),
                       "final_expected_sparsity": expected[-1] if expected else None})
        return Bundle(self.masks_, self.clustering_.centroids, config, self.log_alpha_, logs=self.find_log_)

    def save(self, path: str | Path) -> Path:
        return self.to_bundle().save(path)


def fit_texts(source: str, samples: int | None, seq_len: int, seed: int = 0,
              max_chars: int | None = None) -> list[str]:
    """The calibration passages a fit reads: `samples` training passages of `source`, each about as long as a
    calibration row (4 x seq_len characters) unless `max_chars` says otherwise."""
    from igprune.data import MIN_CHARS, load_calibration

    return load_calibration(source, split="train", max_chars=max_chars or max(MIN_CHARS, 4 * seq_len), limit=samples,
                            seed=seed)


def fit_bundle(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: FitConfig,
               extra: Sequence[Text] = (), checkpoint_dir: str | Path | None = None,
               shared_dir: str | Path | None = None, progress: bool = True) -> Bundle:
    """What `igprune fit` runs: the config's calibration passages and the user's own `extra` texts (inputs a
    deployment expects that no source holds; a Request is clustered by its prompt and scored on its response),
    then IGPruner.fit. The bundle records where its calibration text came from."""
    data = config.data
    texts = [*fit_texts(data.source, data.samples, config.seq_len, config.seed, data.max_chars), *extra]
    pruner = IGPruner(model, tokenizer, config, checkpoint_dir=checkpoint_dir, shared_dir=shared_dir,
                      progress=progress).fit(texts)
    bundle = pruner.to_bundle()
    bundle.config["calibration"] = {"source": config.data.source, "passages": len(texts),
                                    "samples": config.data.samples, "seq_len": config.seq_len}
    if extra:  # the user's own texts: how many, and a digest to tell whether a refit had the same ones
        bundle.config["calibration"].update(extra=len(extra), extra_sha256=digest(extra))
        answered = sum(isinstance(t, Request) for t in extra)
        if answered:  # scored on their responses only
            bundle.config["calibration"]["extra_requests"] = answered
    return bundle
