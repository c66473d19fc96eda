"""Cluster calibration embeddings with K-means (paper eq. 2); the centroids become the router's pool.

A cluster with fewer than `min_size` texts cannot train a mask worth having, so it is merged into
the nearest other cluster (its texts join that cluster, the centroid is recomputed as the mean of
all its members), repeatedly, until every cluster is large enough. A warning says what was merged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from sklearn.cluster import KMeans

from igprune.encoder import DEFAULT_ENCODER
from igprune.files import IGPruneError


@dataclass(frozen=True)
class ClusterConfig:
    """n_clusters: K-means' N. encoder, encoder_tokens: the sentence encoder and how many of a text's first tokens
    it reads, here and when routing: a prefix places a text well enough (64 tokens route 93% of evaluation prompts
    as 256 do) and keeps routing at about 2% of a 512-token prefill of smollm2. The encoder is a sentence-transformers
    folder or name; "all-MiniLM-L6-v2-static" is the default's distillation to one vector per token (encoder.py),
    routing in under a millisecond. min_cluster_size: smaller clusters are merged into their nearest neighbour."""

    n_clusters: int = 16
    encoder: str = DEFAULT_ENCODER
    encoder_tokens: int = 64
    min_cluster_size: int = 4

    def validate(self) -> None:
        if self.n_clusters < 1 or self.encoder_tokens < 1 or self.min_cluster_size < 1:
            raise IGPruneError("clusters.n_clusters, clusters.encoder_tokens and clusters.min_cluster_size must be "
                               "at least 1")


@dataclass
class Clustering:
    centroids: torch.Tensor  # (N, d) float32
    labels: torch.Tensor  # (M,) long, each text's cluster
    requested: int  # N asked for; len(centroids) may be smaller after merging
    merged: list[int]  # sizes of the clusters that were merged away

    @property
    def sizes(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.centroids)).tolist()


def check_n_clusters(n_clusters: int, m: int) -> None:
    """At least one cluster and no more than texts; checked before the texts are embedded."""
    if n_clusters < 1:
        raise IGPruneError(f"need at least one cluster, got {n_clusters}")
    if n_clusters > m:
        raise IGPruneError(f"{n_clusters} clusters but only {m} calibration texts; use fewer clusters or more texts")


def cluster(embeddings: torch.Tensor, n_clusters: int, seed: int = 0, min_size: int = 4) -> Clustering:
    """K-means (k-means++ init, seeded) on the embeddings, then merge clusters smaller than min_size."""
    m = embeddings.shape[0]
    check_n_clusters(n_clusters, m)
    x = embeddings.double().numpy()
    kmeans = KMeans(n_clusters=n_clusters, init="k-means++", n_init=10, random_state=seed).fit(x)
    labels = torch.as_tensor(kmeans.labels_, dtype=torch.long)
    centroids = torch.as_tensor(kmeans.cluster_centers_)
    merged = []
    while len(centroids) > 1:
        sizes = torch.bincount(labels, minlength=len(centroids))
        small = int(sizes.argmin())
        if sizes[small] >= min_size:
            break
        merged.append(int(sizes[small]))
        others = [k for k in range(len(centroids)) if k != small]
        members = labels == small
        nearest = torch.cdist(centroids[small : small + 1], centroids[others]).argmin()
        target = others[int(nearest)]
        labels[members] = target
        centroids[target] = torch.as_tensor(x)[labels == target].mean(0)
        keep = torch.tensor(others)
        remap = torch.full((len(centroids),), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        labels, centroids = remap[labels], centroids[keep]
    if merged:
        warnings.warn(f"merged {len(merged)} cluster(s) smaller than {min_size} texts (sizes {merged}) into their "
                      f"nearest neighbours; {len(centroids)} clusters remain", stacklevel=2)
    return Clustering(centroids.float(), labels, n_clusters, merged)
