"""The router (paper eqs. 9-10): embed the input, take the nearest centroid, use that cluster's mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from igprune.bundle import Bundle
from igprune.encoder import SentenceEncoder


@dataclass
class Route:
    cluster: int
    distance: float  # Euclidean distance to the chosen centroid


class Router:
    """Nearest-centroid routing over an embedding pool; a pool of one routes everything to cluster 0."""

    def __init__(self, centroids: torch.Tensor, encoder: SentenceEncoder | None = None):
        self.centroids = centroids.float()
        self.encoder = encoder

    @classmethod
    def from_bundle(cls, bundle: Bundle, route_tokens: int | None = None,
                    device: str | torch.device | None = "auto") -> Router:
        """The bundle's centroids with its encoder; `route_tokens` overrides how much of an input is read
        (default: as many tokens as the calibration texts were embedded from)."""
        if bundle.static:
            return cls(bundle.centroids)
        encoder = SentenceEncoder(bundle.config["encoder"], device=device,
                                  max_tokens=route_tokens or bundle.config.get("encoder_tokens"))
        return cls(bundle.centroids, encoder)

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]

    def route_embeddings(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clusters, distances) for embeddings (n, d): argmin_k ||e - c_k||_2."""
        distances = torch.cdist(embeddings.float(), self.centroids)
        best = distances.min(dim=1)
        return best.indices, best.values

    def route(self, texts: list[str]) -> list[Route]:
        if self.n_clusters == 1:
            return [Route(0, 0.0) for _ in texts]
        clusters, distances = self.route_embeddings(self.encoder.encode(texts))
        return [Route(int(c), float(d)) for c, d in zip(clusters, distances, strict=True)]
