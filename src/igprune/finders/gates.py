"""Hard-concrete (L0) gates over the blocks, one row of learnable log_alpha per mask (paper eqs. 3-7).

Sampling follows Louizos et al. (2018) as used by CoFi and Sheared-LLaMA:

    u ~ U(eps, 1 - eps)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)        beta = 2/3
    z = clamp(s * (r - l) + l, 0, 1)                             l = -0.1, r = 1.1

The paper's eq. 4 writes sigmoid(log(u / (1 - u)) / beta + log_alpha); that is the same distribution
with log_alpha rescaled by beta, so only the scale of log_alpha differs. The probability that a gate
is exactly zero has the closed form P(z = 0) = sigmoid(beta * log(-l / r) - log_alpha), which gives
the expected sparsity used in the Lagrangian (eq. 7).
"""

from __future__ import annotations

import math

import torch
from torch import nn

BETA, LEFT, RIGHT, EPS = 2.0 / 3.0, -0.1, 1.1, 1e-6


class HardConcreteGates(nn.Module):
    """`n_masks` independent hard-concrete masks over `n_blocks` blocks."""

    def __init__(self, n_masks: int, n_blocks: int, init_keep: float = 0.9, beta: float = BETA,
                 left: float = LEFT, right: float = RIGHT, eps: float = EPS):
        super().__init__()
        self.beta, self.left, self.right, self.eps = beta, left, right, eps
        # Start with P(z=0) = 1 - init_keep for every gate: close to dense, yet where P(z=0) still responds.
        self.log_alpha = nn.Parameter(torch.full((n_masks, n_blocks), self.log_alpha_for(1.0 - init_keep)))

    def log_alpha_for(self, p_zero: float) -> float:
        """The log_alpha at which P(z = 0) equals p_zero."""
        return self.beta * math.log(-self.left / self.right) - math.log(p_zero / (1.0 - p_zero))

    def sample(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stochastic gates (len(rows), n_blocks) in [0, 1] for masks `rows`; differentiable in log_alpha."""
        log_alpha = self.log_alpha[rows]
        u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype).to(log_alpha.device)
        u = u * (1 - 2 * self.eps) + self.eps  # U(eps, 1 - eps); drawn on the CPU so a seed means the same everywhere
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.beta)
        return (s * (self.right - self.left) + self.left).clamp(0.0, 1.0)

    def prob_zero(self) -> torch.Tensor:
        """P(z = 0) for every gate, shape (n_masks, n_blocks); closed form."""
        return torch.sigmoid(self.beta * math.log(-self.left / self.right) - self.log_alpha)

    def expected_sparsity(self) -> torch.Tensor:
        """Expected share of skipped blocks per mask, shape (n_masks,)."""
        return self.prob_zero().mean(dim=1)

    def binarize(self, n_off: int) -> torch.Tensor:
        """Deterministic binary masks (n_masks, n_blocks), True = keep, exactly `n_off` blocks off per mask.

        Blocks with the lowest log_alpha are switched off (ties broken by block index, so it is stable).
        """
        n_masks, n_blocks = self.log_alpha.shape
        order = torch.sort(self.log_alpha.detach(), dim=1, stable=True).indices
        masks = torch.ones(n_masks, n_blocks, dtype=torch.bool, device=self.log_alpha.device)
        masks.scatter_(1, order[:, :n_off], False)
        return masks


class Lagrangian(nn.Module):
    """Sparsity constraint per mask (eq. 7): lambda1 * (t - s) + lambda2 * (t - s)^2.

    The multipliers are trained by gradient *ascent* (their optimiser uses maximize=True), so any
    persistent gap between expected sparsity t and the target s makes the penalty grow until it closes.

    t and s are measured in units (expected and target numbers of skipped blocks) rather than as shares
    of B. That is eq. 7 with lambda1 rescaled by B and lambda2 by B^2: the optimum is the same, but with
    shares the gradient reaching each log_alpha is divided by B, and at the paper's multiplier learning
    rate (0.1) the multipliers need thousands of steps to outweigh the LM loss; in units they catch up
    within the few hundred steps a CPU budget allows.
    """

    def __init__(self, n_masks: int, n_units: int):
        super().__init__()
        self.n_units = n_units
        self.lambda1 = nn.Parameter(torch.zeros(n_masks))
        self.lambda2 = nn.Parameter(torch.zeros(n_masks))

    def forward(self, expected: torch.Tensor, target: float) -> torch.Tensor:
        """expected: expected sparsity per mask, as a share; target: the target share."""
        gap = (expected - target) * self.n_units
        return self.lambda1 * gap + self.lambda2 * gap.pow(2)
