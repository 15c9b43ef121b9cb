"""Codebooks trained by gradient descent: the original VQ-VAE and the gradient-descent SOM baseline.

GradientQuantizer (van den Oord et al.)::

    loss = ||q - sg(z)||^2 + beta ||sg(q) - z||^2                        (means over all N*D elements)

GDSOMQuantizer (the paper's "SOM-VAE-like" baseline) adds a neighbourhood term pulling the winner's grid
neighbours towards a target::

    loss += lambda_som * mean_n sum_k h_t(k*(n), k) ||w_k - sg(target_n)||^2

with ``target="winner"`` (target_n = q_n, the authors' version) or ``target="input"`` (target_n = z_n,
SOM-VAE proper). The term is computed from per-code statistics smoothed over the grid,
``sum_k (c~_k ||w_k||^2 - 2 w_k . T~_k + Q~_k)`` with c = counts, T = sums of targets, Q = sums of
``||target||^2`` per winner, so no N x K matrix is formed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..neighborhood import make_neighborhood
from ..smoothing import GridSmoother
from .base import VectorQuantizerBase

TARGETS = ("winner", "input")


class GradientQuantizer(VectorQuantizerBase):
    """The original VQ-VAE quantiser: a codebook parameter (init N(0, I)) trained by the codebook loss.

    The returned loss is ``||q - sg(z)||^2 + commitment_weight ||sg(q) - z||^2``.
    """

    def __init__(self, dim: int, codebook_size: int, grid_shape=None, grid_dims: int = 2,
                 commitment_weight: float = 0.25, accept_image_fmap: bool = False, **grid_kwargs):
        super().__init__(dim, codebook_size, grid_shape, grid_dims, commitment_weight=commitment_weight,
                         accept_image_fmap=accept_image_fmap, **grid_kwargs)
        self.codebook = nn.Parameter(torch.randn(self.codebook_size, self.dim))

    def _loss(self, z, q, indices, counts):
        zf = z.float()
        return F.mse_loss(q, zf.detach()) + self.commitment_weight * F.mse_loss(zf, q.detach())

    def _update(self, z, indices, counts):
        self.step.add_(1)


class GDSOMQuantizer(GradientQuantizer):
    """Gradient-descent SOM: :class:`GradientQuantizer` plus ``som_weight`` times the neighbourhood loss.

    Args (beyond GradientQuantizer's):
        neighborhood, shrink, sigma, schedule: the kernel h_t, as in :class:`KohonenQuantizer`.
        som_weight: lambda_som (1 by default).
        target: ``"winner"`` (neighbours pulled towards the detached winning code, the authors' version)
            or ``"input"`` (towards the detached input, SOM-VAE proper).
    """

    def __init__(self, dim: int, codebook_size: int, grid_shape=None, grid_dims: int = 2,
                 neighborhood="hard", shrink: float = 0.1, sigma: float = 10.0, som_weight: float = 1.0,
                 target: str = "winner", commitment_weight: float = 0.25, accept_image_fmap: bool = False, *,
                 schedule="harmonic", smoothing: str = "auto", **grid_kwargs):
        super().__init__(dim, codebook_size, grid_shape, grid_dims, commitment_weight=commitment_weight,
                         accept_image_fmap=accept_image_fmap, **grid_kwargs)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if som_weight < 0:
            raise ValueError(f"som_weight must be >= 0, got {som_weight}")
        self.neighborhood = make_neighborhood(neighborhood, shrink=shrink, sigma=sigma, schedule=schedule)
        self.smoother = GridSmoother(self.grid, self.neighborhood, method=smoothing)
        self.som_weight = float(som_weight)
        self.target = target

    def som_loss(self, z, q, indices, counts) -> torch.Tensor:
        """mean_n sum_k h_t(k*(n), k) ||w_k - sg(target_n)||^2 via grid-smoothed per-code statistics."""
        with torch.no_grad():
            target = q.detach() if self.target == "winner" else z.detach().float()
            stats = torch.zeros(self.codebook_size, 2 + self.dim, device=z.device)
            stats[:, 0] = counts
            stats[:, 1:-1].index_add_(0, indices, target)
            stats[:, -1].index_add_(0, indices, target.square().sum(1))
            smoothed = self.smoother(stats, int(self.step))
        c, t_sum, t_sq = smoothed[:, 0], smoothed[:, 1:-1], smoothed[:, -1]
        w = self.codebook
        total = (c * w.square().sum(1)).sum() - 2.0 * (w * t_sum).sum() + t_sq.sum()
        return total / max(z.shape[0], 1)

    def _loss(self, z, q, indices, counts):
        loss = super()._loss(z, q, indices, counts)
        if self.som_weight == 0 or not self.training:
            return loss
        return loss + self.som_weight * self.som_loss(z, q, indices, counts)
