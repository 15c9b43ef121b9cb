"""Codebooks trained by gradient descent: the original VQ-VAE and the gradient-descent SOM baseline.

GradientQuantizer (van den Oord et al.)::

    loss = ||q - sg(z)||^2 + beta ||sg(q) - z||^2                        (means over all N*D elements)

GDSOMQuantizer (the paper's "SOM-VAE-like" baseline) adds a neighbourhood term pulling the winner's grid
neighbours towards a target::

    loss += lambda_som * mean_n sum_k h_t(k*(n), k) ||w_k - sg(target_n)||^2

with ``target="winner"`` (target_n = q_n, the authors' version) or ``target="input"`` (target_n = z_n,
SOM-VAE proper). The term is split into the winner's own term, computed directly (exactly 0 for
``target="winner"``, so ``neighborhood="none"`` adds exactly nothing), and the neighbours' term, computed
from per-code statistics smoothed by ``P_t - I``:
``sum_k (c'_k ||w_k||^2 - 2 w_k . T'_k + Q'_k)`` with c = counts, T = sums of targets, Q = sums of
``||target||^2`` per winner and ``X' = (P_t - I) X``, so no N x K matrix is formed.

Collapse fixes (vector-quantize-pytorch's names, :mod:`kohonen_vae.quantizers.collapse`): ``codebook_init``,
``kmeans_init``/``kmeans_iters`` (the parameter is set by k-means on the first training batch) and
``threshold_ema_dead_code`` with a usage EMA ``cluster_size`` (``N <- decay N + (1 - decay) c``, summed over
ranks, starting at 1 as in vector-quantize-pytorch) kept only when restarts are on. A restarted code's
optimiser state (e.g. Adam moments) is not reset, as in vector-quantize-pytorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..neighborhood import finite_number, make_neighborhood
from ..smoothing import GridSmoother
from .base import COMPILE_TRAINING_REASON, VectorQuantizerBase, check_statistics
from .collapse import CollapseFixes, initial_codebook

TARGETS = ("winner", "input")


class GradientQuantizer(CollapseFixes, VectorQuantizerBase):
    """The original VQ-VAE quantiser: a codebook parameter trained by the codebook loss.

    The returned loss is ``||q - sg(z)||^2 + commitment_weight ||sg(q) - z||^2``.

    Args (beyond the grid and layout ones of :class:`KohonenQuantizer`):
        codebook_init: ``"normal"`` (N(0, I), the paper's) or ``"uniform"`` (vector-quantize-pytorch's).
        kmeans_init, kmeans_iters: k-means initialisation on the first training batch.
        threshold_ema_dead_code, reset_cluster_size: dead-code restarts on the usage EMA (0 = off).
        decay: decay of the usage EMA (only used with restarts).

    The step counts training forwards with at least one vector. Without restarts or k-means the
    training forward compiles with ``fullgraph=True``; with them see :mod:`kohonen_vae.quantizers.base`.
    """

    def __init__(self, dim: int, codebook_size: int, grid_shape=None, grid_dims: int = 2,
                 commitment_weight: float = 0.25, accept_image_fmap: bool = False, *,
                 codebook_init: str = "normal", kmeans_init: bool = False, kmeans_iters: int = 10,
                 threshold_ema_dead_code: float = 0.0, reset_cluster_size: float | None = None,
                 decay: float = 0.99, **grid_kwargs):
        super().__init__(dim, codebook_size, grid_shape, grid_dims, commitment_weight=commitment_weight,
                         accept_image_fmap=accept_image_fmap, **grid_kwargs)
        decay = finite_number(decay, "decay")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.codebook_init = codebook_init
        self._init_collapse_fixes(kmeans_init, kmeans_iters, threshold_ema_dead_code, reset_cluster_size)
        self.codebook = nn.Parameter(initial_codebook(codebook_init, self.codebook_size, self.dim))
        if self.restarts:
            self.register_buffer("cluster_size", torch.ones(self.codebook_size))  # usage EMA

    def _loss(self, z, q, indices, counts):
        zf = z.float()
        return F.mse_loss(q, zf.detach()) + self.commitment_weight * F.mse_loss(zf, q.detach())

    def _update(self, z, indices, counts):
        if self.restarts:
            self._update_usage(z, indices, counts)
        elif z.shape[0] > 0:  # a static shape under torch.compile: no graph break
            self.step.add_(1)

    # -- collapse fixes (quantizers.collapse) --------------------------------------------------------
    def _collective_sync(self) -> bool:
        return distributed.should_sync(None)

    @property
    def usage(self) -> torch.Tensor:
        """The usage EMA compared with ``threshold_ema_dead_code`` (restarts only)."""
        return self.cluster_size

    def _fill_missing_state(self, state_dict: dict, prefix: str) -> None:
        super()._fill_missing_state(state_dict, prefix)
        if self.restarts and prefix + "cluster_size" not in state_dict:  # saved without restarts
            state_dict[prefix + "cluster_size"] = torch.ones(self.codebook_size)

    @torch.no_grad()
    def _set_kmeans_result(self, means, counts):
        self.codebook.copy_(means)
        if self.restarts:
            self.cluster_size.copy_(torch.where(counts > 0, counts, torch.ones_like(counts)))

    @torch.no_grad()
    def _replace_codes(self, codes, vectors):
        self.codebook[codes] = vectors.to(self.codebook.dtype)
        self.cluster_size[codes] = self.reset_cluster_size

    @torch.compiler.disable(reason=COMPILE_TRAINING_REASON)
    @torch.no_grad()
    def _update_usage(self, z, indices, counts):
        """Usage EMA over all ranks, then dead-code restarts; one all-reduce of [counts | energy |
        candidates], energy_k = sum_{k*(n)=k} ||z_n||^2 (only there to detect inputs that overflow)."""
        energy = torch.zeros(self.codebook_size, device=z.device).index_add_(0, indices, z.detach().float().square().sum(1))
        packet = torch.cat([counts.float().unsqueeze(1), energy.unsqueeze(1), self._candidates(z)], 1)
        if self._collective_sync():
            distributed.all_reduce_sum_(packet)
        total, square_sum = torch.stack([packet[:, 0].sum(), packet.square().sum()]).tolist()
        check_statistics(square_sum, packet, "the training batch")
        if total == 0:
            return
        self.cluster_size.mul_(self.decay).add_((1 - self.decay) * packet[:, 0])
        self._restart_dead_codes(packet[:, 2:], int(total))
        self.step.add_(1)


class GDSOMQuantizer(GradientQuantizer):
    """Gradient-descent SOM: :class:`GradientQuantizer` plus ``som_weight`` times the neighbourhood loss.

    Args (beyond GradientQuantizer's):
        neighborhood, shrink, sigma, schedule: the kernel h_t, as in :class:`KohonenQuantizer`.
        som_weight: lambda_som (1 by default).
        target: ``"winner"`` (neighbours pulled towards the detached winning code, the authors' version)
            or ``"input"`` (towards the detached input, SOM-VAE proper).

    Its training loss reads the step on the host (the kernel at step t): a training forward with a kernel
    has one graph break under ``torch.compile``, and ``fullgraph=True`` fails with
    :data:`~kohonen_vae.quantizers.base.COMPILE_TRAINING_REASON` (the eval forward, and the training forward
    with ``neighborhood="none"``, compile with ``fullgraph=True``).
    """

    def __init__(self, dim: int, codebook_size: int, grid_shape=None, grid_dims: int = 2,
                 neighborhood="hard", shrink: float = 0.1, sigma: float = 10.0, som_weight: float = 1.0,
                 target: str = "winner", commitment_weight: float = 0.25, accept_image_fmap: bool = False, *,
                 schedule="harmonic", smoothing: str = "auto", codebook_init: str = "normal",
                 kmeans_init: bool = False, kmeans_iters: int = 10, threshold_ema_dead_code: float = 0.0,
                 reset_cluster_size: float | None = None, decay: float = 0.99, **grid_kwargs):
        super().__init__(dim, codebook_size, grid_shape, grid_dims, commitment_weight=commitment_weight,
                         accept_image_fmap=accept_image_fmap, codebook_init=codebook_init,
                         kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                         threshold_ema_dead_code=threshold_ema_dead_code, reset_cluster_size=reset_cluster_size,
                         decay=decay, **grid_kwargs)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        som_weight = finite_number(som_weight, "som_weight")
        if som_weight < 0:
            raise ValueError(f"som_weight must be >= 0, got {som_weight}")
        self.neighborhood = make_neighborhood(neighborhood, shrink=finite_number(shrink, "shrink (tau)"),
                                              sigma=finite_number(sigma, "sigma"), schedule=schedule)
        self.smoother = GridSmoother(self.grid, self.neighborhood, method=smoothing)
        self.som_weight = som_weight
        self.target = target
        self._refresh_geometry()

    def geometry_description(self) -> dict:
        """The grid and the neighbourhood (kind, kernel parameters, schedule)."""
        out = super().geometry_description()
        if hasattr(self, "neighborhood"):
            out["neighborhood"] = self.neighborhood.to_dict()
        return out

    def som_loss(self, z, q, indices, counts) -> torch.Tensor:
        """mean_n sum_k h_t(k*(n), k) ||w_k - sg(target_n)||^2 = the winners' own term
        mean_n ||w_{k*(n)} - sg(target_n)||^2 (computed directly: exactly 0, value and gradient, for
        ``target="winner"``) plus the neighbours' term from statistics smoothed by ``P_t - I`` (skipped,
        i.e. exactly 0, when P_t = I)."""
        w = self.codebook
        target = q.detach() if self.target == "winner" else z.detach().float()
        total = (F.embedding(indices, w) - target).square().sum()
        if self.neighborhood.name != "none":  # a plain attribute: no graph break without a kernel
            others = self._neighbour_statistics(target, indices, counts)
            if others is not None:
                c, t_sum, t_sq = others[:, 0], others[:, 1:-1], others[:, -1]
                total = total + (c * w.square().sum(1)).sum() - 2.0 * (w * t_sum).sum() + t_sq.sum()
        return total / max(z.shape[0], 1)

    @torch.compiler.disable(reason=COMPILE_TRAINING_REASON)
    @torch.no_grad()
    def _neighbour_statistics(self, target, indices, counts):
        """``(P_t - I) [c | T | Q]`` (K, 2 + D) at the current step, or None when P_t = I; the kernel at
        step t is chosen on the host, hence the graph break."""
        step = int(self.step)
        if self.smoother.choose(step) == "identity":
            return None
        stats = torch.zeros(self.codebook_size, 2 + self.dim, device=target.device)
        stats[:, 0] = counts
        stats[:, 1:-1].index_add_(0, indices, target)
        stats[:, -1].index_add_(0, indices, target.square().sum(1))
        return self.smoother(stats, step) - stats  # the neighbours only

    def _loss(self, z, q, indices, counts):
        loss = super()._loss(z, q, indices, counts)
        if self.som_weight == 0 or not self.training:
            return loss
        return loss + self.som_weight * self.som_loss(z, q, indices, counts)
