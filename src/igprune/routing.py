"""The router (paper eqs. 9-10): embed the input, take the nearest centroid, use that cluster's mask.

Two guards keep an input on the global mask, the one every cluster's choice starts from, when its cluster's mask
may not suit it: a gate (an input farther from its centroid than most of that cluster's own texts) and evidence (the
calibration texts most like the input, which no finder or choice scored, show no clear gain for any route's mask
over the global one). Evidence holds on text from sources the calibration never read (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune import distributed
from igprune.bundle import Bundle
from igprune.encoder import SentenceEncoder
from igprune.files import IGPruneError
from igprune.masks import mask_row
from igprune.scoring import Calibration, Scorer, tokenize
from igprune.texts import Text


@dataclass(frozen=True)
class RouteConfig:
    """kind: "nearest", the paper's nearest centroid, or "evidence": leave the global mask only for a route whose
    gain on the k calibration texts most like the input (cosine, `samples` reserved per cluster that no finder or
    choice scores) clears z standard errors plus `margin` nats per token.
    gate (nearest only): an input farther from its nearest centroid than this quantile of that cluster's own texts'
    distances runs under the global mask."""

    kind: Literal["nearest", "evidence"] = "nearest"
    gate: float | None = None
    samples: int = 32
    k: int = 32
    z: float = 0.0
    margin: float = 0.05

    def validate(self) -> None:
        if self.gate is not None and not 0.0 < self.gate <= 1.0:
            raise IGPruneError(f"the gate quantile must be in (0, 1], e.g. 0.95, got {self.gate!r}")
        if self.kind == "evidence" and self.gate is not None:
            raise IGPruneError("route.gate is for the nearest-centroid router; evidence keeps the global mask itself")
        if self.samples < 1 or self.k < 1 or self.z < 0 or self.margin < 0:
            raise IGPruneError("route.samples and route.k must be >= 1, route.z and route.margin >= 0")


@dataclass(frozen=True)
class Evidence:
    """Calibration texts' embeddings (n, d) and, per text, each route's gain over the global mask (n, R: mean NLL
    per token under the global mask minus under the route's), with how sure a gain must be to leave the global mask."""

    embeddings: torch.Tensor
    gains: torch.Tensor
    k: int
    z: float
    margin: float

    def routes(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Per input, the route with the highest lower bound (mean - z * se) on its k nearest texts' gains where that
        bound clears the margin; else the last route, the global mask's."""
        sims = _unit(embeddings.float()) @ _unit(self.embeddings.float()).T
        k = min(self.k, sims.shape[1])
        gains = self.gains.float()[sims.topk(k, dim=1).indices]  # (n, k, R)
        se = gains.std(dim=1) / k ** 0.5 if k > 1 else torch.zeros_like(gains[:, 0])
        bound = gains.mean(dim=1) - self.z * se
        bound[:, -1] = -torch.inf
        best = bound.max(dim=1)
        return torch.where(best.values > self.margin, best.indices, bound.shape[1] - 1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@dataclass
class Route:
    cluster: int  # n_clusters: the fallback (global) mask, where a gate or the evidence sends the input
    distance: float  # Euclidean distance to the nearest centroid


class Router:
    """Nearest-centroid routing over an embedding pool; a pool of one routes everything to cluster 0.

    With `radii` (a gate) an input farther from its nearest centroid than that cluster's radius takes route
    n_clusters, the fallback mask: a cluster's mask was chosen on its members' text, and an input unlike all but a
    few of them is better served by the mask every cluster starts from. With `evidence` the route is the one whose
    gain the calibration texts most like the input show clearly, else n_clusters, the fallback (global) mask."""

    def __init__(self, centroids: torch.Tensor, encoder: SentenceEncoder | None = None,
                 radii: torch.Tensor | None = None, evidence: Evidence | None = None):
        self.centroids = centroids.float()
        self.encoder = encoder
        self.radii = None if radii is None else radii.float()
        self.evidence = evidence

    @classmethod
    def from_bundle(cls, bundle: Bundle, route_tokens: int | None = None,
                    device: str | torch.device | None = "auto") -> Router:
        """The bundle's centroids with its encoder; `route_tokens` overrides how much of an input is read
        (default: as many tokens as the calibration texts were embedded from)."""
        if bundle.static:
            return cls(bundle.centroids)
        encoder = SentenceEncoder(bundle.config["encoder"], device=device,
                                  max_tokens=route_tokens or bundle.config.get("encoder_tokens"))
        evidence = None
        if bundle.evidence_gains is not None:
            settings = bundle.config["evidence"]
            evidence = Evidence(bundle.evidence_embeddings, bundle.evidence_gains, settings["k"], settings["z"],
                                settings["margin"])
        return cls(bundle.centroids, encoder, bundle.radii, evidence)

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]

    @property
    def n_routes(self) -> int:
        """How many masks routes index: one per cluster, and the fallback's when guarded."""
        return self.n_clusters + (self.radii is not None or self.evidence is not None)

    def route_embeddings(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(routes, distances) for embeddings (n, d): argmin_k ||e - c_k||_2, or n_clusters beyond its radius; with
        evidence, its route (distances stay the nearest centroid's)."""
        distances = torch.cdist(embeddings.float(), self.centroids)
        best = distances.min(dim=1)
        if self.evidence is not None:
            return self.evidence.routes(embeddings), best.values
        if self.radii is None:
            return best.indices, best.values
        outside = best.values > self.radii[best.indices]
        return torch.where(outside, self.n_clusters, best.indices), best.values

    def route(self, texts: list[str]) -> list[Route]:
        if self.n_clusters == 1:
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


def route_gains(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[Text],
                route_masks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Evidence's gains (n, R): per text (its first seq_len tokens), the mean NLL per scored token under the last
    route's mask (the global one) minus under each route's. Each distinct mask is scored once."""
    ids, attention, scored = tokenize(tokenizer, texts, seq_len)
    scorer = Scorer(model, Calibration(ids, {"source": "evidence"}, tuple(texts), scored & attention.bool()))
    keys = [mask_row(m) for m in route_masks]
    distinct = dict(zip(keys, route_masks, strict=True))
    rows = dict(zip(distinct, distributed.map_sharded(scorer.row_nll, list(distinct.values())), strict=True))
    nll = torch.tensor([[total / max(count, 1.0) for total, count in rows[key]] for key in keys]).T  # (n, R)
    return nll[:, -1:] - nll
