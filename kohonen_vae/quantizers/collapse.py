"""The codebook-collapse fixes practitioners use, with vector-quantize-pytorch's names and semantics.

* ``codebook_init``: how the codes start (:func:`initial_codebook`).
* ``kmeans_init`` / ``kmeans_iters``: Lloyd's k-means on the first training batch (:func:`kmeans`).
* ``threshold_ema_dead_code``: codes whose EMA count falls below a threshold are replaced by vectors of the
  current batch (:func:`sample_candidates`, :func:`dead_code_targets`).

Data parallelism. Every result here is identical on all ranks by construction, with no reliance on the
ranks' random generators agreeing: a rank only ever contributes *its own* vectors, to slots it owns, and a
sum all-reduce puts the slots together (:func:`sample_candidates`); every later choice is a deterministic
function of the reduced (hence identical) data. The candidates of a step travel in the same packed
all-reduce as the codebook statistics: restarts add no collective.

Randomness. Each rank draws one seed per step from torch's global generator (:func:`draw_seed`) and uses
it for a local generator; with the global generator seeded by the run seed (and restored on resume), the
choices are deterministic and resume exactly.
"""
from __future__ import annotations

import math

import torch

from .. import distributed
from ..geometry import as_size
from ..neighborhood import finite_number
from .base import COMPILE_TRAINING_REASON, autocast_disabled, batch_statistics, check_statistics, code_counts, nearest_codes

#: the codebook initialisations (see :func:`initial_codebook`)
CODEBOOK_INITS = ("normal", "uniform")


def initial_codebook(kind: str, codebook_size: int, dim: int) -> torch.Tensor:
    """A ``(K, D)`` float32 starting codebook drawn from torch's global generator.

    * ``"normal"``: e_k ~ N(0, I), the paper's and its reference code's initialisation.
    * ``"uniform"``: e_kd ~ U(-b, b) with b = sqrt(6 / (K D)): exactly vector-quantize-pytorch's
      ``uniform_init`` (``nn.init.kaiming_uniform_`` of its ``(1, K, D)`` tensor, whose fan-in is K D), a
      small-scale codebook (b = 0.0135 for K = 512, D = 64). The same seed gives the same numbers.
    """
    if kind == "normal":
        return torch.randn(codebook_size, dim)
    if kind == "uniform":
        bound = math.sqrt(6.0 / (codebook_size * dim))
        return torch.empty(codebook_size, dim).uniform_(-bound, bound)
    raise ValueError(f"unknown codebook_init {kind!r}; choose one of {CODEBOOK_INITS}")


def draw_seed() -> int:
    """One integer in [0, 2^62) from torch's global (CPU) generator: the only draw restarts and k-means
    make from it per step, so the run seed determines them and a restored RNG state resumes them."""
    return int(torch.randint(0, 1 << 62, (), dtype=torch.long))


def _local_generator(seed: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 0x9E3779B97F4A7C15 * (rank + 1)) % (1 << 63))


def sample_candidates(z: torch.Tensor, num: int, seed: int, step: int = 0, sync: bool = False) -> torch.Tensor:
    """``(num, 1 + D)`` float32 candidate slots ``[valid | vector]`` filled from this rank's vectors ``z``.

    Slot j belongs to rank ``(j + step) mod world`` (all slots to this process without ``sync``); a rank
    fills its slots, in order, with rows of ``z`` in a random order (a permutation from a generator seeded by
    ``seed`` and the rank: distinct rows while it has enough, then the permutation again) and sets ``valid``
    to 1; every other slot is 0. Summed over ranks, each slot holds one vector of its owner, or is invalid
    (``valid`` 0) when its owner had no vectors.
    """
    world, rank = (distributed.world_size(), distributed.rank()) if sync else (1, 0)
    out = torch.zeros(num, 1 + z.shape[1], dtype=torch.float32, device=z.device)
    n = z.shape[0]
    if n == 0:
        return out
    owner = (torch.arange(num) + int(step)) % world
    mine = torch.nonzero(owner == rank).flatten()
    if mine.numel() == 0:
        return out
    perm = torch.randperm(n, generator=_local_generator(seed, rank))
    rows = perm[torch.arange(mine.numel()) % n].to(z.device)
    mine = mine.to(z.device)
    out[mine, 0] = 1.0
    out[mine, 1:] = z.detach()[rows].float()
    return out


def merge_candidates(pending: torch.Tensor, new: torch.Tensor, seen: int, added: int, seed: int) -> torch.Tensor:
    """Reservoir merge for accumulated micro-batches: each valid slot of ``new`` replaces the slot of
    ``pending`` with probability ``added / (seen + added)`` (``seen`` vectors before, ``added`` in the new
    micro-batch), so a slot holds a uniformly chosen vector of all micro-batches. Returns the merged slots."""
    if added == 0:
        return pending
    u = torch.rand(new.shape[0], generator=_local_generator(seed, -1)).to(new.device)
    take = (new[:, 0] > 0) & (u < added / (seen + added))
    return torch.where(take.unsqueeze(1), new, pending)


def kmeans(z: torch.Tensor, means: torch.Tensor, iters: int, sync: bool = False, what: str = "the k-means batch"):
    """Lloyd's algorithm from the starting ``means`` (K, D): ``iters`` times assign every row of ``z`` to
    its nearest mean, then move each mean to the average of its rows (a mean without rows stays). With
    ``sync`` the per-cluster counts and sums are summed over ranks (one all-reduce per iteration), so every
    rank computes the same means from the union of the ranks' vectors. Returns ``(means, counts)`` with the
    counts of the last assignment, as vector-quantize-pytorch's ``kmeans`` returns its bins. Raises
    :class:`~kohonen_vae.quantizers.base.NonFiniteInputError` if the statistics overflow."""
    k = means.shape[0]
    means = means.float()
    counts = torch.zeros(k, device=means.device)
    for _ in range(iters):
        indices = nearest_codes(z, means)
        stats = batch_statistics(z, indices, code_counts(indices, k))
        if sync:
            distributed.all_reduce_sum_(stats)
        check_statistics(stats.square().sum(), stats, what)
        counts = stats[:, 0]
        means = torch.where((counts > 0).unsqueeze(1), stats[:, 1:] / counts.clamp(min=1).unsqueeze(1), means)
    return means, counts


def dead_code_targets(cluster_size: torch.Tensor, threshold: float, candidates: torch.Tensor, total: int):
    """Which codes restart and with which vectors: ``(codes (M,), vectors (M, D))``.

    Dead codes are those with ``cluster_size < threshold``; they are taken in order of increasing
    cluster size (ties by index) and get the valid candidate slots in slot order. At most ``total`` (the
    number of vectors in the step's batch over all ranks) codes restart per step; vector-quantize-pytorch
    also replaces at most as many codes as there are vectors (it picks them at random; here the least used
    go first, a deterministic choice that needs no shared random numbers). The rest wait for a later step.
    """
    dead = torch.nonzero(cluster_size < threshold).flatten()
    if dead.numel() == 0:
        return dead, candidates.new_zeros(0, candidates.shape[1] - 1)
    order = torch.sort(cluster_size[dead], stable=True).indices
    dead = dead[order]
    slots = torch.nonzero(candidates[:, 0] > 0.5).flatten()
    m = min(dead.numel(), slots.numel(), int(total))
    return dead[:m], candidates[slots[:m], 1:]


class CollapseFixes:
    """Mixin for :class:`~kohonen_vae.quantizers.base.VectorQuantizerBase` subclasses: k-means
    initialisation and dead-code restarts. A subclass provides ``_collective_sync()`` (sum over ranks
    now?), ``_set_kmeans_result(means, counts)``, ``usage`` (the EMA counts compared with the threshold)
    and ``_replace_codes(codes, vectors)``; it calls :meth:`_init_collapse_fixes` in its constructor, and
    :meth:`_restart_dead_codes` after each update with the step's reduced candidates."""

    kmeans_init = False
    threshold_ema_dead_code = 0.0

    def _init_collapse_fixes(self, kmeans_init: bool, kmeans_iters: int, threshold_ema_dead_code: float,
                             reset_cluster_size: float | None) -> None:
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = as_size(kmeans_iters, "kmeans_iters")
        threshold = finite_number(threshold_ema_dead_code, "threshold_ema_dead_code")
        if threshold < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0 (0 = off), got {threshold}")
        self.threshold_ema_dead_code = threshold
        reset = threshold if reset_cluster_size is None else finite_number(reset_cluster_size, "reset_cluster_size")
        if reset < 0:
            raise ValueError(f"reset_cluster_size must be >= 0, got {reset}")
        self.reset_cluster_size = reset
        if self.kmeans_init:
            # recorded in the state: a loaded or resumed quantiser never runs k-means again
            self.register_buffer("initted", torch.zeros((), dtype=torch.bool))

    @property
    def restarts(self) -> bool:
        """Whether dead-code restarts are on (``threshold_ema_dead_code > 0``)."""
        return self.threshold_ema_dead_code > 0

    def _fill_missing_state(self, state_dict: dict, prefix: str) -> None:
        # a state saved without k-means initialisation holds a trained codebook: never overwrite it
        if self.kmeans_init and prefix + "initted" not in state_dict:
            state_dict[prefix + "initted"] = torch.ones((), dtype=torch.bool)

    def _candidates(self, z: torch.Tensor) -> torch.Tensor | None:
        """This step's restart candidates (None when restarts are off); see :func:`sample_candidates`."""
        if not self.restarts:
            return None
        return sample_candidates(z, self.codebook_size, draw_seed(), int(self.step), self._collective_sync())

    def _restart_dead_codes(self, candidates: torch.Tensor, total: int) -> None:
        """Replace the codes whose usage is below the threshold by candidate vectors (all ranks alike)."""
        codes, vectors = dead_code_targets(self.usage, self.threshold_ema_dead_code, candidates, total)
        if codes.numel():
            self._replace_codes(codes, vectors)

    @torch.compiler.disable(reason=COMPILE_TRAINING_REASON)
    def _before_assignment(self, z: torch.Tensor) -> None:
        self._kmeans_initialise(z)

    @torch.no_grad()
    def _kmeans_initialise(self, z: torch.Tensor) -> None:
        """Codebook and statistics from k-means on the first training batch (union over ranks), once."""
        if bool(self.initted):
            return
        sync = self._collective_sync()
        with autocast_disabled(z.device):
            starts = sample_candidates(z, self.codebook_size, draw_seed(), 0, sync)
            if sync:
                distributed.all_reduce_sum_(starts)
            check_statistics(starts.square().sum(), starts, "the k-means initialisation batch")
            valid = starts[:, 0] > 0.5
            if not bool(valid.any()):  # no vectors on any rank yet: initialise at the next training forward
                return
            means = torch.where(valid.unsqueeze(1), starts[:, 1:], self.codebook.detach().float())
            means, counts = kmeans(z, means, self.kmeans_iters, sync, "the k-means initialisation batch")
            self._set_kmeans_result(means, counts)
            self.initted.fill_(True)
