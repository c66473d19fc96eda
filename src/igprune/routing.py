"""The router (paper eqs. 9-10): embed the input, take the nearest centroid, use that cluster's mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from igprune.bundle import Bundle
from igprune.encoder import SentenceEncoder
from igprune.files import IGPruneError


@dataclass(frozen=True)
class RouteConfig:
    """gate: an input farther from its nearest centroid than this quantile of that cluster's own calibration texts'
    distances runs under the global mask (None: every input takes its nearest cluster's mask)."""

    gate: float | None = None

    def validate(self) -> None:
        if self.gate is not None and not 0.0 < self.gate <= 1.0:
            raise IGPruneError(f"the gate quantile must be in (0, 1], e.g. 0.95, got {self.gate!r}")


@dataclass
class Route:
    cluster: int  # n_clusters: beyond its nearest cluster's radius, the fallback mask (a gated router)
    distance: float  # Euclidean distance to the nearest centroid


class Router:
    """Nearest-centroid routing over an embedding pool; a pool of one, or a router without an encoder, routes
    everything to cluster 0.

    With `radii` (a gate) an input farther from its nearest centroid than that cluster's radius takes route
    n_clusters, the fallback mask: a cluster's mask was chosen on its members' text, and an input unlike all but a
    few of them is better served by the mask every cluster starts from."""

    def __init__(self, centroids: torch.Tensor, encoder: SentenceEncoder | None = None,
                 radii: torch.Tensor | None = None):
        self.centroids = centroids.float()
        self.encoder = encoder
        self.radii = None if radii is None else radii.float()

    @classmethod
    def from_bundle(cls, bundle: Bundle, route_tokens: int | None = None, device: str | torch.device | None = "auto",
                    always_embed: bool = False) -> Router:
        """The bundle's centroids with its encoder; `route_tokens` overrides how much of an input is read
        (default: as many tokens as the calibration texts were embedded from). Where every route carries the same
        mask (every cluster kept the global one) the router does not embed, since that would decide nothing, and
        routes everything to cluster 0, unless `always_embed` (to show where inputs fall)."""
        if bundle.static or (bundle.one_mask and not always_embed):
            return cls(bundle.centroids, radii=bundle.radii)
        encoder = SentenceEncoder(bundle.config["encoder"], device=device,
                                  max_tokens=route_tokens or bundle.config.get("encoder_tokens"))
        return cls(bundle.centroids, encoder, bundle.radii)

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]

    @property
    def n_routes(self) -> int:
        """How many masks routes index: one per cluster, and the fallback's when gated."""
        return self.n_clusters + (self.radii is not None)

    def route_embeddings(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(routes, distances) for embeddings (n, d): argmin_k ||e - c_k||_2, or n_clusters beyond its radius."""
        distances = torch.cdist(embeddings.float(), self.centroids)
        best = distances.min(dim=1)
        if self.radii is None:
            return best.indices, best.values
        outside = best.values > self.radii[best.indices]
        return torch.where(outside, self.n_clusters, best.indices), best.values

    def route(self, texts: list[str]) -> list[Route]:
        if self.encoder is None or self.n_clusters == 1:
            return [Route(0, 0.0) for _ in texts]
        clusters, distances = self.route_embeddings(self.encoder.encode(texts))
        return [Route(int(c), float(d)) for c, d in zip(clusters, distances, strict=True)]


def gate_radii(centroids: torch.Tensor, embeddings: torch.Tensor, quantile: float) -> torch.Tensor:
    """Each cluster's radius for a gate: the `quantile` of the distances to its centroid of the calibration texts
    routed to it (0 for a cluster none is routed to). quantile 1.0 gates only inputs farther than every member."""
    if not 0.0 < quantile <= 1.0:
        raise IGPruneError(f"the gate quantile must be in (0, 1], got {quantile}")
    clusters, distances = Router(centroids).route_embeddings(embeddings)
    return torch.stack([torch.quantile(distances[clusters == k], quantile, interpolation="higher")
                        if bool((clusters == k).any()) else distances.new_zeros(())
                        for k in range(centroids.shape[0])])
