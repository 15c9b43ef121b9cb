"""KSOM vector quantisation (Irie, Csordas & Schmidhuber) and EMA-VQ, its zero-neighbourhood case.

One update per training forward (or per optimiser step, see ``update_in_forward``), on per-code
statistics of the batch: counts ``c_k`` and sums ``S_k``, smoothed over the grid by ``P_t``::

    c~ = P_t c,  S~ = P_t S
    N_k <- gamma N_k + (1 - gamma) c~_k
    N_k <- (N_k + eps) / (n + K eps) * n,   n = sum_j N_j         (Laplace smoothing)
    m_k <- gamma m_k + (1 - gamma) S~_k
    e_k <- m_k / N_k
    t   <- t + 1

EMA-VQ is P_t = I. With ``update_unused=False`` (the paper's "no-update" variant) codes whose ``c~_k`` is
0 keep ``N_k``, ``m_k`` and ``e_k`` unchanged and no Laplace smoothing is applied. "Is 0" is tested as
``c~_k <= 1e-7`` (the kernel truncation cutoff) for every smoothing method. The reference implementation's
float32 K x K matrix keeps exponential/gaussian weights down to ~1e-38, so there far-away codes count as
used (and decay) where here they do not; with the hard kernel both agree exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed
from ..neighborhood import make_neighborhood
from ..smoothing import GridSmoother
from .base import VectorQuantizerBase, autocast_disabled, check_finite


class KohonenQuantizer(VectorQuantizerBase):
    """Vector quantiser whose codebook is a Kohonen self-organising map, updated without gradients.

    Args:
        dim: vector size D.
        codebook_size: number of codes K.
        grid_shape: grid shape (product K), a :class:`~kohonen_vae.geometry.Grid`, or None for the paper's
            automatic shape in ``grid_dims`` dimensions (512 in 2-D -> (32, 16)).
        grid_dims: dimensions of the automatic grid.
        neighborhood: ``"none"`` (EMA-VQ), ``"hard"``, ``"exponential"`` (the paper's "Gaussian"),
            ``"gaussian"`` (classical), or a :class:`~kohonen_vae.neighborhood.Neighborhood`.
        shrink: tau of the harmonic schedule s(t) = 1 / (1 + tau t).
        sigma: sigma0, the initial width of the exponential and gaussian kernels.
        decay: gamma, the EMA decay of the statistics.
        eps: Laplace smoothing constant.
        count_init: N0, the initial EMA count of every code (1 keeps e = m / N = e0 at t = 0).
        update_unused: False is the paper's "no-update" variant.
        commitment_weight: beta of the commitment loss beta mean((sg(q) - z)^2).
        accept_image_fmap: inputs are (B, dim, H, W) instead of channel-last (..., dim).
        sync_codebook: sum statistics across torch.distributed ranks: None = whenever a group of more
            than one rank is initialised (decided at each training forward), False = never.
        periodic: toroidal grid (every axis wraps around).
        topology: ``"rectangular"`` or ``"hexagonal"``.
        schedule: ``"harmonic"`` (the paper's), ``"exponential"``, or a callable step -> factor.
        schedule_kwargs: extra arguments of the schedule (``time_constant``, ``floor``).
        smoothing: how P_t is applied (see :mod:`kohonen_vae.smoothing`); ``"auto"`` picks the fastest.
        update_in_forward: True applies the update in every training forward. False accumulates the
            statistics of several forwards until :meth:`apply_update` (gradient accumulation).
    """

    def __init__(self, dim: int, codebook_size: int, grid_shape=None, grid_dims: int = 2,
                 neighborhood="hard", shrink: float = 0.1, sigma: float = 10.0, decay: float = 0.99,
                 eps: float = 1e-5, count_init: float = 1.0, update_unused: bool = True,
                 commitment_weight: float = 0.25, accept_image_fmap: bool = False, sync_codebook=None, *,
                 periodic: bool = False, topology: str = "rectangular", schedule="harmonic",
                 schedule_kwargs: dict | None = None, smoothing: str = "auto", update_in_forward: bool = True):
        super().__init__(dim, codebook_size, grid_shape, grid_dims, commitment_weight=commitment_weight,
                         accept_image_fmap=accept_image_fmap, periodic=periodic, topology=topology)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay (gamma) must be in [0, 1), got {decay}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if count_init < 0:
            raise ValueError(f"count_init (N0) must be >= 0, got {count_init}")
        if sync_codebook not in (None, True, False):
            raise ValueError(f"sync_codebook must be None, True or False, got {sync_codebook!r}")
        self.neighborhood = make_neighborhood(neighborhood, shrink=shrink, sigma=sigma, schedule=schedule,
                                              **(schedule_kwargs or {}))
        self.smoother = GridSmoother(self.grid, self.neighborhood, method=smoothing)
        self.decay = float(decay)
        self.eps = float(eps)
        self.count_init = float(count_init)
        self.update_unused = bool(update_unused)
        self.sync_codebook = sync_codebook
        self.update_in_forward = bool(update_in_forward)

        codebook = torch.randn(self.codebook_size, self.dim)
        self.register_buffer("codebook", codebook)  # e, (K, D)
        self.register_buffer("embed_sum", codebook.clone())  # m, (K, D)
        self.register_buffer("cluster_size", torch.full((self.codebook_size,), self.count_init))  # N, (K,)
        # raw statistics [counts | sums] of forwards not yet applied (update_in_forward=False)
        self.register_buffer("pending", torch.zeros(self.codebook_size, 1 + self.dim), persistent=False)

    # -- loss: commitment only; the codebook is a buffer --------------------------------------------
    def _loss(self, z, q, indices, counts):
        if self.commitment_weight == 0:
            return z.new_zeros((), dtype=torch.float32)
        return self.commitment_weight * F.mse_loss(z.float(), q.detach())

    # -- update ------------------------------------------------------------------------------------
    @torch.compiler.disable
    def _update(self, z, indices, counts):
        stats = batch_statistics(z, indices, counts)
        if self.update_in_forward:
            self._apply_statistics(stats)
        else:
            if distributed.world_size() == 1:  # fail at the bad forward; under DDP only after the all-reduce,
                check_finite(stats, "the training batch")  # so that every rank raises and none hangs
            self.pending.add_(stats)

    @torch.no_grad()
    def apply_update(self) -> None:
        """Apply the statistics accumulated since the last call as one update (``update_in_forward=False``).

        Call it once per optimiser step on every rank; it performs the all-reduce under data parallelism.
        """
        if self.update_in_forward:
            raise RuntimeError("apply_update() is for update_in_forward=False; this quantiser updates in forward")
        stats = self.pending.clone()
        self.pending.zero_()
        self._apply_statistics(stats)

    @torch.no_grad()
    def _apply_statistics(self, stats: torch.Tensor) -> None:
        """One KSOM/EMA step from raw batch statistics ``(K, 1 + D)`` = [counts | sums], in float32 even
        inside an autocast region."""
        with autocast_disabled(stats.device):
            self._apply_statistics_float32(stats)

    def _apply_statistics_float32(self, stats: torch.Tensor) -> None:
        if distributed.should_sync(self.sync_codebook):
            distributed.all_reduce_sum_(stats)  # one packed collective per training step
        # one reduction first: a finite sum means every entry is finite (NaN and +-Inf propagate); the
        # elementwise check (4 more passes) only runs to tell a non-finite entry from an overflowing sum
        if not bool(torch.isfinite(stats.sum())):
            check_finite(stats, "the training batch (summed over ranks)" if distributed.world_size() > 1
                         else "the training batch")
        smoothed = self.smoother(stats, int(self.step))
        counts, sums = smoothed[:, 0], smoothed[:, 1:]
        g = self.decay
        if self.update_unused:
            size = g * self.cluster_size + (1 - g) * counts
            n = size.sum()
            size = (size + self.eps) / (n + self.codebook_size * self.eps) * n
            # in place, with the same roundings as g * m + (1 - g) * S and m / N: two fewer (K, D) passes
            self.embed_sum.mul_(g).add_((1 - g) * sums)
            self.cluster_size.copy_(size)
            torch.div(self.embed_sum, size.unsqueeze(1), out=self.codebook)
        else:
            # "unused" = smoothed count below the kernel truncation cutoff, the same test for every smoothing
            # method (FFT rounding leaves ~1e-6 noise where exact arithmetic gives 0 or 1e-30)
            hit = counts > self.smoother.cutoff
            size = torch.where(hit, g * self.cluster_size + (1 - g) * counts, self.cluster_size)
            embed_sum = torch.where(hit[:, None], g * self.embed_sum + (1 - g) * sums, self.embed_sum)
            codebook = torch.where(hit[:, None], embed_sum / size.clamp(min=1e-30).unsqueeze(1), self.codebook)
            self.cluster_size.copy_(size)
            self.embed_sum.copy_(embed_sum)
            self.codebook.copy_(codebook)
        self.step.add_(1)

    def neighborhood_matrix(self, step=None) -> torch.Tensor:
        """Dense ``(K, K)`` P_t at ``step`` (default: the current one). For inspection and small maps."""
        return self.smoother.matrix(int(self.step) if step is None else step, self.codebook.device)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, neighborhood={self.neighborhood!r}, decay={self.decay}, "
                f"count_init={self.count_init}, update_unused={self.update_unused}")


class EMAQuantizer(KohonenQuantizer):
    """EMA-VQ (van den Oord et al.; Razavi et al.): a :class:`KohonenQuantizer` with no neighbourhood."""

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99, eps: float = 1e-5,
                 count_init: float = 1.0, update_unused: bool = True, commitment_weight: float = 0.25,
                 accept_image_fmap: bool = False, sync_codebook=None, **kwargs):
        if "neighborhood" in kwargs:
            raise ValueError("EMAQuantizer has no neighbourhood; use KohonenQuantizer(neighborhood=...)")
        super().__init__(dim, codebook_size, neighborhood="none", decay=decay, eps=eps, count_init=count_init,
                         update_unused=update_unused, commitment_weight=commitment_weight,
                         accept_image_fmap=accept_image_fmap, sync_codebook=sync_codebook, **kwargs)


def batch_statistics(z: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Packed raw statistics ``(K, 1 + D)``: column 0 the counts c_k, then the sums S_k = sum_{k*(n)=k} z_n,
    in float32 whatever the input dtype."""
    # sums into a contiguous (K, D) buffer, then one small (K, 1 + D) copy: index_add_ straight into the
    # strided column block of the packed tensor was slower (docs/performance.md, "optimisations")
    sums = torch.zeros(counts.shape[0], z.shape[1], dtype=torch.float32, device=z.device)
    sums.index_add_(0, indices, z.detach().float())
    return torch.cat([counts.float().unsqueeze(1), sums], 1)
