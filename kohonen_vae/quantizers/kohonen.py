"""KSOM vector quantisation (Irie, Csordas & Schmidhuber) and EMA-VQ, its zero-neighbourhood case.

One update per training forward (or per optimiser step, see ``update_in_forward``), on per-code
statistics of the batch: counts ``c_k`` and sums ``S_k``, smoothed over the grid by ``P_t``::

    c~ = P_t c,  S~ = P_t S
    N_k <- gamma N_k + (1 - gamma) c~_k
    N_k <- (N_k + eps) / (n + K eps) * n,   n = sum_j N_j         (Laplace smoothing)
    m_k <- gamma m_k + (1 - gamma) S~_k
    e_k <- m_k / N_k
    t   <- t + 1

EMA-VQ is P_t = I. With ``update_unused=False`` (the paper's "no-update" variant) codes that no update
reaches keep ``N_k``, ``m_k`` and ``e_k`` unchanged and no Laplace smoothing is applied. "Reached" is the
authors' test exactly: code k is hit iff the float32 weight ``P_t[j, k]`` of some winner j of the step
(over all ranks) is > 0 (their ``n_writes > 0``), for every kernel and smoothing method; it is computed as a
dilation of the winner set by the kernel's float32 support (:meth:`GridSmoother.dilate`), never from the
smoothed counts, whose values are unchanged.

Collapse fixes with vector-quantize-pytorch's names (:mod:`kohonen_vae.quantizers.collapse`):
``codebook_init``, ``kmeans_init``/``kmeans_iters`` and ``threshold_ema_dead_code``/``reset_cluster_size``.
After k-means: ``e = means``, ``N = counts`` of the last k-means assignment (``count_init`` for a cluster
without vectors; vector-quantize-pytorch leaves such a code at 0), ``m = e N``. A restarted code gets
``e = v``, ``N = reset_cluster_size`` (default: the threshold), ``m = v N``, as in vector-quantize-pytorch;
its threshold is compared with ``N`` after the Laplace smoothing that this update writes back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed
from ..neighborhood import finite_number, make_neighborhood
from ..smoothing import GridSmoother
from .base import (COMPILE_TRAINING_REASON, VectorQuantizerBase, autocast_disabled, batch_statistics,
                   check_statistics)
from .collapse import CollapseFixes, draw_seed, initial_codebook, merge_candidates


class KohonenQuantizer(CollapseFixes, VectorQuantizerBase):
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
        codebook_init: ``"normal"`` (N(0, I), the paper's) or ``"uniform"`` (vector-quantize-pytorch's
            U(+-sqrt(6 / (K D)))); see :func:`~kohonen_vae.quantizers.collapse.initial_codebook`.
        kmeans_init: initialise codebook and statistics by k-means on the first training batch (over all
            ranks); the ``initted`` buffer records that it is done.
        kmeans_iters: Lloyd iterations of that k-means.
        threshold_ema_dead_code: after each update, codes whose EMA count N_k is below this are replaced
            by random vectors of the step's batch (0 = off).
        reset_cluster_size: N_k of a restarted code (None: the threshold).

    ``torch.compile``: see :mod:`kohonen_vae.quantizers.base` (the training update is one graph break).
    """

    def __init__(self, dim: int, codebook_size: int, grid_shape=None, grid_dims: int = 2,
                 neighborhood="hard", shrink: float = 0.1, sigma: float = 10.0, decay: float = 0.99,
                 eps: float = 1e-5, count_init: float = 1.0, update_unused: bool = True,
                 commitment_weight: float = 0.25, accept_image_fmap: bool = False, sync_codebook=None, *,
                 periodic: bool = False, topology: str = "rectangular", schedule="harmonic",
                 schedule_kwargs: dict | None = None, smoothing: str = "auto", update_in_forward: bool = True,
                 codebook_init: str = "normal", kmeans_init: bool = False, kmeans_iters: int = 10,
                 threshold_ema_dead_code: float = 0.0, reset_cluster_size: float | None = None):
        super().__init__(dim, codebook_size, grid_shape, grid_dims, commitment_weight=commitment_weight,
                         accept_image_fmap=accept_image_fmap, periodic=periodic, topology=topology)
        decay = finite_number(decay, "decay (gamma)")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay (gamma) must be in [0, 1), got {decay}")
        eps = finite_number(eps, "eps")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        count_init = finite_number(count_init, "count_init (N0)")
        if count_init < 0:
            raise ValueError(f"count_init (N0) must be >= 0, got {count_init}")
        if sync_codebook not in (None, True, False):
            raise ValueError(f"sync_codebook must be None, True or False, got {sync_codebook!r}")
        self.neighborhood = make_neighborhood(neighborhood, shrink=finite_number(shrink, "shrink (tau)"),
                                              sigma=finite_number(sigma, "sigma"), schedule=schedule,
                                              **(schedule_kwargs or {}))
        self.smoother = GridSmoother(self.grid, self.neighborhood, method=smoothing)
        self.decay = decay
        self.eps = eps
        self.count_init = count_init
        self.update_unused = bool(update_unused)
        self.sync_codebook = sync_codebook
        self.update_in_forward = bool(update_in_forward)
        self.codebook_init = codebook_init
        self._init_collapse_fixes(kmeans_init, kmeans_iters, threshold_ema_dead_code, reset_cluster_size)
        self._refresh_geometry()

        codebook = initial_codebook(codebook_init, self.codebook_size, self.dim)
        self.register_buffer("codebook", codebook)  # e, (K, D)
        self.register_buffer("embed_sum", codebook.clone())  # m, (K, D)
        self.register_buffer("cluster_size", torch.full((self.codebook_size,), self.count_init))  # N, (K,)
        # raw statistics [counts | sums] of forwards not yet applied (update_in_forward=False)
        self.register_buffer("pending", torch.zeros(self.codebook_size, 1 + self.dim), persistent=False)
        if self.restarts and not self.update_in_forward:  # restart candidates [valid | vector] of those forwards
            self.register_buffer("pending_candidates", torch.zeros(self.codebook_size, 1 + self.dim),
                                 persistent=False)

    def geometry_description(self) -> dict:
        """The grid and the neighbourhood (kind, kernel parameters, schedule)."""
        out = super().geometry_description()
        if hasattr(self, "neighborhood"):
            out["neighborhood"] = self.neighborhood.to_dict()
        return out

    # -- loss: commitment only; the codebook is a buffer --------------------------------------------
    def _loss(self, z, q, indices, counts):
        if self.commitment_weight == 0:
            return z.new_zeros((), dtype=torch.float32)
        return self.commitment_weight * F.mse_loss(z.float(), q.detach())

    # -- collapse fixes (quantizers.collapse) --------------------------------------------------------
    def _collective_sync(self) -> bool:
        return distributed.should_sync(self.sync_codebook)

    @property
    def usage(self) -> torch.Tensor:
        """The EMA counts N_k that ``threshold_ema_dead_code`` is compared with."""
        return self.cluster_size

    def _set_kmeans_result(self, means, counts):
        size = torch.where(counts > 0, counts, torch.full_like(counts, self.count_init))
        self.codebook.copy_(means)
        self.cluster_size.copy_(size)
        self.embed_sum.copy_(means * size.unsqueeze(1))

    def _replace_codes(self, codes, vectors):
        self.codebook[codes] = vectors
        self.cluster_size[codes] = self.reset_cluster_size
        self.embed_sum[codes] = vectors * self.reset_cluster_size

    # -- update ------------------------------------------------------------------------------------
    @torch.compiler.disable(reason=COMPILE_TRAINING_REASON)
    def _update(self, z, indices, counts):
        stats = batch_statistics(z, indices, counts)
        candidates = self._candidates(z)
        if self.update_in_forward:
            self._apply_statistics(stats, candidates)
            return
        if distributed.world_size() == 1:  # fail at the bad forward; under DDP only after the all-reduce,
            check_statistics(stats.square().sum(), stats, "the training batch")  # so that every rank raises
        if candidates is not None:
            seen = int(self.pending[:, 0].sum())
            self.pending_candidates.copy_(
                merge_candidates(self.pending_candidates, candidates, seen, z.shape[0], draw_seed()))
        self.pending.add_(stats)

    @torch.no_grad()
    def apply_update(self) -> None:
        """Apply the statistics accumulated since the last call as one update (``update_in_forward=False``).

        Call it once per optimiser step on every rank; it performs the all-reduce under data parallelism.
        Dead-code restarts draw their vectors uniformly from all the accumulated forwards.
        """
        if self.update_in_forward:
            raise RuntimeError("apply_update() is for update_in_forward=False; this quantiser updates in forward")
        stats = self.pending.clone()
        self.pending.zero_()
        candidates = None
        if self.restarts:
            candidates = self.pending_candidates.clone()
            self.pending_candidates.zero_()
        self._apply_statistics(stats, candidates)

    @torch.no_grad()
    def _apply_statistics(self, stats: torch.Tensor, candidates: torch.Tensor | None = None) -> None:
        """One KSOM/EMA step from raw batch statistics ``(K, 1 + D)`` = [counts | sums] (and, with restarts,
        the candidate slots ``(K, 1 + D)``), in float32 even inside an autocast region."""
        with autocast_disabled(stats.device):
            self._apply_statistics_float32(stats, candidates)

    def _apply_statistics_float32(self, stats: torch.Tensor, candidates: torch.Tensor | None) -> None:
        packet = stats if candidates is None else torch.cat([stats, candidates], 1)
        if distributed.should_sync(self.sync_codebook):
            distributed.all_reduce_sum_(packet)  # one packed collective per training step
        # one host read: the total count (an empty batch everywhere is a no-op) and sum(packet^2), finite
        # iff every entry is finite and no squared value overflows (e.g. inputs of 1e30)
        total, square_sum = torch.stack([packet[:, 0].sum(), packet.square().sum()]).tolist()
        check_statistics(square_sum, packet, "the training batch (summed over ranks)"
                         if distributed.world_size() > 1 else "the training batch")
        if total == 0:
            return  # no vectors: no decay, no step
        if candidates is not None:
            stats, candidates = packet[:, :1 + self.dim], packet[:, 1 + self.dim:]
        step = int(self.step)
        smoothed = self.smoother(stats, step)
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
            # the authors' n_writes > 0: a winner's float32 kernel weight reaches the code
            hit = self.smoother.dilate(stats[:, 0] > 0, step)
            size = torch.where(hit, g * self.cluster_size + (1 - g) * counts, self.cluster_size)
            embed_sum = torch.where(hit[:, None], g * self.embed_sum + (1 - g) * sums, self.embed_sum)
            codebook = torch.where(hit[:, None], embed_sum / size.clamp(min=1e-30).unsqueeze(1), self.codebook)
            self.cluster_size.copy_(size)
            self.embed_sum.copy_(embed_sum)
            self.codebook.copy_(codebook)
        if candidates is not None:
            self._restart_dead_codes(candidates, int(total))
        self.step.add_(1)

    def neighborhood_matrix(self, step=None) -> torch.Tensor:
        """Dense ``(K, K)`` P_t at ``step`` (default: the current one). For inspection and small maps."""
        return self.smoother.matrix(int(self.step) if step is None else step, self.codebook.device)

    def extra_repr(self) -> str:
        extra = f", codebook_init={self.codebook_init!r}" if self.codebook_init != "normal" else ""
        extra += f", kmeans_init=True, kmeans_iters={self.kmeans_iters}" if self.kmeans_init else ""
        extra += f", threshold_ema_dead_code={self.threshold_ema_dead_code}" if self.restarts else ""
        return (f"{super().extra_repr()}, neighborhood={self.neighborhood!r}, decay={self.decay}, "
                f"count_init={self.count_init}, update_unused={self.update_unused}{extra}")


class EMAQuantizer(KohonenQuantizer):
    """EMA-VQ (van den Oord et al.; Razavi et al.): a :class:`KohonenQuantizer` with no neighbourhood.

    The collapse fixes (``codebook_init``, ``kmeans_init``, ``threshold_ema_dead_code``) are those of
    :class:`KohonenQuantizer`, named as in vector-quantize-pytorch's ``VectorQuantize``.
    """

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99, eps: float = 1e-5,
                 count_init: float = 1.0, update_unused: bool = True, commitment_weight: float = 0.25,
                 accept_image_fmap: bool = False, sync_codebook=None, *, codebook_init: str = "normal",
                 kmeans_init: bool = False, kmeans_iters: int = 10, threshold_ema_dead_code: float = 0.0,
                 reset_cluster_size: float | None = None, **kwargs):
        if "neighborhood" in kwargs:
            raise ValueError("EMAQuantizer has no neighbourhood; use KohonenQuantizer(neighborhood=...)")
        super().__init__(dim, codebook_size, neighborhood="none", decay=decay, eps=eps, count_init=count_init,
                         update_unused=update_unused, commitment_weight=commitment_weight,
                         accept_image_fmap=accept_image_fmap, sync_codebook=sync_codebook,
                         codebook_init=codebook_init, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                         threshold_ema_dead_code=threshold_ema_dead_code, reset_cluster_size=reset_cluster_size,
                         **kwargs)


__all__ = ["KohonenQuantizer", "EMAQuantizer", "batch_statistics"]
