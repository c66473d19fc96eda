"""Router prototypes as small pure functions: inputs are embeddings or per-candidate NLLs, outputs route indices.

Conventions: M candidate masks, index `g` is the global mask (the one every input keeps when the router cannot
tell). `gain[i, c]` = mean per-token NLL under the global mask minus under candidate c (nats/token; > 0: c is
better). Every router returns, per input, an index into the candidates.
"""

from __future__ import annotations

import numpy as np


def nearest_centroid(emb: np.ndarray, centroids: np.ndarray, cluster_mask: np.ndarray) -> np.ndarray:
    """Today's router: the mask of the nearest centroid (Euclidean). cluster_mask[k]: candidate index of cluster k."""
    d = ((emb[:, None, :] - centroids[None]) ** 2).sum(-1)
    return cluster_mask[d.argmin(1)]


def radius_gate(emb: np.ndarray, centroids: np.ndarray, cluster_mask: np.ndarray, radii: np.ndarray,
                g: int) -> np.ndarray:
    """Nearest centroid, but the global mask for an input farther from it than that cluster's radius."""
    d = np.sqrt(((emb[:, None, :] - centroids[None]) ** 2).sum(-1))
    k = d.argmin(1)
    return np.where(d[np.arange(len(k)), k] > radii[k], g, cluster_mask[k])


def knn_gain(emb: np.ndarray, train_emb: np.ndarray, train_gain: np.ndarray, k: int,
             exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per input and candidate: the mean gain of its k nearest training texts (cosine), the standard error of that
    mean, and the mean cosine similarity of the neighbours. exclude[i, j] True: training text j may not be a
    neighbour of input i (leave-one-source-out)."""
    sim = emb @ train_emb.T
    if exclude is not None:
        sim = np.where(exclude, -np.inf, sim)
    idx = np.argsort(-sim, axis=1)[:, :k]
    neigh = train_gain[idx]  # (n, k, M)
    mean = neigh.mean(1)
    se = neigh.std(1, ddof=1) / np.sqrt(k)
    return mean, se, np.take_along_axis(sim, idx, 1).mean(1)


def lcb_route(mean: np.ndarray, se: np.ndarray, g: int, z: float, margin: float = 0.0,
              allowed: np.ndarray | None = None) -> np.ndarray:
    """Leave the global mask for the candidate with the highest lower confidence bound mean - z * se, only where
    that bound clears `margin` (nats/token). allowed (M,) bool: the candidates it may pick."""
    lcb = mean - z * se
    if allowed is not None:
        lcb = np.where(allowed[None], lcb, -np.inf)
    lcb[:, g] = -np.inf
    best = lcb.argmax(1)
    return np.where(lcb[np.arange(len(best)), best] > margin, best, g)


def prompt_route(prefix_nll: np.ndarray, g: int, margin: float, proposals: np.ndarray | None = None) -> np.ndarray:
    """Choose by the input itself: prefix_nll[i, c] is the mean per-token NLL of input i's first T tokens under
    candidate c. Among the proposed candidates (proposals[i]: candidate indices scored beside the global mask;
    None: all), keep the lowest if it beats the global mask by more than `margin` nats/token."""
    n, m = prefix_nll.shape
    scored = np.full((n, m), np.inf)
    if proposals is None:
        scored = prefix_nll.copy()
    else:
        rows = np.arange(n)[:, None]
        scored[rows, proposals] = prefix_nll[rows, proposals]
    scored[:, g] = np.inf
    best = scored.argmin(1)
    gain = prefix_nll[:, g] - scored[np.arange(n), best]
    return np.where(gain > margin, best, g)


def top_proposals(mean: np.ndarray, g: int, m: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """The m candidates (not the global one) with the highest predicted gain, per input: (n, m) indices."""
    score = mean.copy()
    if allowed is not None:
        score = np.where(allowed[None], score, -np.inf)
    score[:, g] = -np.inf
    return np.argsort(-score, axis=1)[:, :m]


def oracle(cont_nll: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """The best candidate on the scored tokens themselves (an upper bound, not a router)."""
    x = cont_nll if allowed is None else np.where(allowed[None], cont_nll, np.inf)
    return x.argmin(1)


def validated_clusters(route: np.ndarray, gain_of_route: np.ndarray, n_routes: int, g: int, z: float) -> np.ndarray:
    """Which routes to keep: those whose texts (of a validation set) gain over the global mask by more than z
    standard errors on average. route[i]: the route text i took; gain_of_route[i]: its gain (nats/token) there.
    Returns a (n_routes,) bool array; the global mask's route is always kept."""
    keep = np.zeros(n_routes, bool)
    keep[g] = True
    for c in range(n_routes):
        x = gain_of_route[route == c]
        if c != g and len(x) >= 2 and x.mean() - z * x.std(ddof=1) / np.sqrt(len(x)) > 0:
            keep[c] = True
    return keep


def restrict(route: np.ndarray, keep: np.ndarray, g: int) -> np.ndarray:
    """A router's choices, with every route outside `keep` sent to the global mask."""
    return np.where(keep[route], route, g)


def prompt_route_z(prefix_tok: np.ndarray, g: int, z: float, proposals: np.ndarray | None = None) -> np.ndarray:
    """prompt_route with a paired test in place of a flat margin: prefix_tok[i, c, t] is the NLL of prompt token t
    of input i under candidate c; a proposed candidate replaces the global mask only where its per-token NLL is
    lower on average by more than z standard errors (over the T - 1 scored prompt tokens)."""
    n, m, t = prefix_tok.shape
    diff = prefix_tok[:, [g], :] - prefix_tok  # (n, m, t) > 0: candidate better
    zs = diff.mean(2) / (diff.std(2, ddof=1) / np.sqrt(t) + 1e-9)
    allowed = np.zeros((n, m), bool)
    if proposals is None:
        allowed[:] = True
    else:
        allowed[np.arange(n)[:, None], proposals] = True
    allowed[:, g] = False
    zs = np.where(allowed, zs, -np.inf)
    best = zs.argmax(1)
    return np.where(zs[np.arange(n), best] > z, best, g)


def domain_oracle_halves(cont_mean: np.ndarray, groups: list[str]) -> np.ndarray:
    """Per group (domain), the single candidate with the lowest mean NLL on the group's other half (even texts choose
    for odd ones and back): the best one-mask-per-domain choice, never scored on the texts that chose it."""
    groups = np.asarray(groups)
    route = np.zeros(len(groups), int)
    for d in dict.fromkeys(groups.tolist()):
        idx = np.flatnonzero(groups == d)
        for half in (0, 1):
            judges, scored = idx[half::2], idx[1 - half::2]
            route[scored] = cont_mean[judges].mean(0).argmin()
    return route


def familiarity(emb: np.ndarray, ref_emb: np.ndarray, k: int = 8) -> np.ndarray:
    """How familiar an input is: the mean cosine similarity of its k nearest calibration passages (the fit's own)."""
    sim = emb @ ref_emb.T
    return np.sort(sim, axis=1)[:, -k:].mean(1)


def familiarity_gate(route: np.ndarray, fam: np.ndarray, tau: float, g: int) -> np.ndarray:
    """A router's choices where the input is at least `tau` familiar, the global mask elsewhere."""
    return np.where(fam >= tau, route, g)
