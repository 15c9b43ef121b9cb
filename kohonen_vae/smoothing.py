"""Smoothing per-code statistics over the grid: ``X~ = P_t X`` with ``P_t[j, k] = h_t(d(j, k))``.

This is the whole neighborhood part of a KSOM update. ``X`` is ``(K, C)``: the batch's counts and sums
packed side by side. Because ``h_t`` depends only on the coordinate offset, ``P_t X`` is a convolution
over the grid, and it never needs the ``K x K`` matrix (16 GiB at K = 65,536). Methods:

``identity``   P = I (EMA-VQ, or a kernel whose off-diagonal weights all fell below the cutoff)
``dense``      an explicit ``K x K`` P (small maps only; cached distances)
``stencil``    a truncated kernel: one shifted add per lattice offset within the kernel's radius
``separable``  one small ``s_i x s_i`` matrix per axis (Gaussian kernel on a rectangular grid)
``fft``        a zero-padded (or, on a torus, circular) FFT convolution, O(K C log K)

``method="auto"`` picks the cheapest exact-enough one for the current step: identity, else a stencil of
at most :data:`STENCIL_MAX_TAPS` taps, else separable (Gaussian, rectangular grid), else FFT. The dense
matrix is never chosen automatically (at K = 512 it is 1.5-9x slower than the others, measured).
"""
from __future__ import annotations

import math

import torch

from .geometry import Grid
from .neighborhood import DEFAULT_CUTOFF, FLOAT32_ZERO_CUTOFF, Neighborhood

METHODS = ("auto", "identity", "dense", "stencil", "separable", "fft")

#: auto uses a stencil while the kernel has at most this many taps
STENCIL_MAX_TAPS = 49


class GridSmoother:
    """Applies ``P_t`` of a neighborhood on a grid to per-code statistics ``(K, C)``.

    Args:
        grid: the :class:`~kohonen_vae.geometry.Grid` of the codebook.
        neighborhood: the kernel h_t.
        method: one of :data:`METHODS`.
        cutoff: weights below this count as zero when truncating the kernel (stencil, identity).
    """

    def __init__(self, grid: Grid, neighborhood: Neighborhood, method: str = "auto", cutoff: float = DEFAULT_CUTOFF):
        if method not in METHODS:
            raise ValueError(f"unknown smoothing method {method!r}; choose one of {METHODS}")
        if method == "separable" and not (neighborhood.separable and grid.topology == "rectangular"):
            raise ValueError("method='separable' needs a separable kernel ('gaussian') on a rectangular grid")
        self.grid = grid
        self.neighborhood = neighborhood
        self.method = method
        self.cutoff = float(cutoff)
        # step-independent geometry, computed once: P_t changes with t only through h_t
        self._distance_cache: dict = {}  # device -> (unique grid distances (U,), inverse index (K, K))
        self._fft_cache: dict = {}  # device -> grid distances of the FFT lattice's offsets
        self._taps_cache: tuple | None = None  # (radius, taps (M, d), tap distances (M,)) of the last radius
        self._support_taps_cache: tuple | None = None  # the same for the float32 support (dilate)

    # -- which method ----------------------------------------------------------------------------
    def choose(self, step: float) -> str:
        """The method used at ``step``."""
        radius = self.neighborhood.radius(step, self.cutoff)
        if self.method != "auto":
            return self.method
        if radius <= 1.0:  # the nearest other code is at distance 1
            return "identity"
        # measured (docs/performance.md): a few shifted adds, a separable or an FFT convolution all beat
        # even a 512 x 512 dense P, so "dense" is only used on request
        if self._tap_count(radius) <= STENCIL_MAX_TAPS:
            return "stencil"
        if self.neighborhood.separable and self.grid.topology == "rectangular":
            return "separable"
        return "fft"

    def _tap_count(self, radius: float) -> int:
        # the number of lattice points in a d-ball of this radius, bounded by the grid
        if radius > 8:  # cheap upper bound without enumerating
            return math.prod(min(2 * math.ceil(radius) + 1, s) for s in self.grid.shape)
        return len(self._taps(radius)[0])

    def _taps(self, radius: float):
        """Lattice offsets within ``radius`` and their grid distances (cached for the last radius used: the
        hard kernel's never changes, a shrinking kernel's is asked twice per step)."""
        if self._taps_cache is None or self._taps_cache[0] != radius:
            taps = self.grid.lattice_offsets(radius)
            self._taps_cache = (radius, taps, self.grid.offset_distance(taps))
        return self._taps_cache[1], self._taps_cache[2]

    def matrix(self, step: float, device=None) -> torch.Tensor:
        """The dense ``(K, K)`` P_t (diagonal 1, not normalised). O(K^2): small maps and tests only."""
        unique, inverse = self._distances(device)
        # h_t of the few distinct grid distances, gathered: the same values as h_t of every entry
        return self.neighborhood.weights(unique, step).to(torch.float32)[inverse]

    def __call__(self, stats: torch.Tensor, step: float) -> torch.Tensor:
        """``P_t @ stats`` for ``stats`` of shape ``(K, C)``."""
        if stats.dim() != 2 or stats.shape[0] != self.grid.size:
            raise ValueError(f"expected statistics of shape ({self.grid.size}, C), got {tuple(stats.shape)}")
        method = self.choose(step)
        if method == "identity":
            return stats
        if method == "dense":
            return self.matrix(step, stats.device).to(stats.dtype) @ stats
        if method == "stencil":
            return self._stencil(stats, step)
        if method == "separable":
            return self._separable(stats, step)
        return self._fft(stats, step)

    # -- implementations -------------------------------------------------------------------------
    def _distances(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct grid distances ``(U,)`` and the ``(K, K)`` index of each pair's distance in them."""
        key = str(device)
        if key not in self._distance_cache:
            unique, inverse = torch.unique(self.grid.distance_matrix(), return_inverse=True)
            self._distance_cache[key] = (unique.to(device), inverse.to(device=device, dtype=torch.int32))
        return self._distance_cache[key]

    def _stencil(self, stats: torch.Tensor, step: float) -> torch.Tensor:
        grid = self.grid
        radius = self.neighborhood.radius(step, self.cutoff)
        taps, tap_distances = self._taps(radius)
        weights = self.neighborhood.weights(tap_distances, step).tolist()
        src = grid.grid_view(stats)  # (s_{d-1}, ..., s_0, C): grid axis i is tensor dim d-1-i
        out = torch.zeros_like(src)
        d = grid.ndim
        for tap, w in zip(taps.tolist(), weights):
            if w < self.cutoff:
                continue
            if grid.periodic:  # out[c] += w in[c + tap]
                shifted = torch.roll(src, shifts=[-o for o in reversed(tap)], dims=list(range(d)))
                out.add_(shifted, alpha=w)
                continue
            dst_idx, src_idx = [], []
            for o, s in zip(reversed(tap), reversed(grid.shape)):
                dst_idx.append(slice(max(0, -o), s - max(0, o)))
                src_idx.append(slice(max(0, o), s - max(0, -o)))
            out[tuple(dst_idx)].add_(src[tuple(src_idx)], alpha=w)
        return out.reshape(stats.shape)

    def _axis_matrix(self, axis: int, step: float, device) -> torch.Tensor:
        s = self.grid.shape[axis]
        a = torch.arange(s, dtype=torch.float64)
        delta = (a[None, :] - a[:, None]).abs()
        if self.grid.periodic:
            delta = torch.minimum(delta, s - delta)
        return self.neighborhood.weights(delta, step).to(device=device, dtype=torch.float32)

    def _separable(self, stats: torch.Tensor, step: float) -> torch.Tensor:
        grid = self.grid
        x = grid.grid_view(stats)
        for axis in range(grid.ndim):
            dim = grid.ndim - 1 - axis
            m = self._axis_matrix(axis, step, stats.device).to(stats.dtype)
            x = torch.movedim(torch.tensordot(m, x, dims=([1], [dim])), 0, dim)
        return x.reshape(stats.shape)

    def _fft(self, stats: torch.Tensor, step: float) -> torch.Tensor:
        radius = self.neighborhood.radius(step, self.cutoff)
        y = self._fft_convolve(stats.float(), radius, lambda dist: self.neighborhood.weights(dist, step))
        y = y.to(stats.dtype)
        # P_t >= 0: a column that is non-negative (the counts) stays so despite float rounding
        return torch.where((stats >= 0).all(0, keepdim=True), y.clamp(min=0), y)

    def _fft_convolve(self, x: torch.Tensor, radius: float, kernel_of_distance) -> torch.Tensor:
        """``(K, C)`` values convolved over the grid with ``kernel_of_distance(grid distance of an offset)``,
        which must vanish beyond ``radius``; an FFT in ``x``'s dtype (float32 or float64)."""
        grid = self.grid
        d = grid.ndim
        sizes = list(reversed(grid.shape))  # tensor order
        lengths = sizes if grid.periodic else self._fft_lengths(sizes, radius)
        # offsets of the FFT lattice, centred: index j <-> j if j < L/2 else j - L (tensor order)
        key = (str(x.device), tuple(lengths))
        if key not in self._fft_cache:
            if len(self._fft_cache) > 8:  # the padding shrinks with the radius: keep only a few lattices
                self._fft_cache.clear()
            axes = [torch.arange(L) for L in lengths]
            axes = [torch.where(a < (L + 1) // 2, a, a - L) for a, L in zip(axes, lengths)]
            mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (L_{d-1}, ..., L_0, d) tensor order
            offsets = mesh.flip(-1)  # grid order (o_0, ..., o_{d-1})
            self._fft_cache[key] = grid.offset_distance(offsets).to(x.device)
        kernel = kernel_of_distance(self._fft_cache[key]).to(device=x.device, dtype=x.dtype)
        v = torch.movedim(grid.grid_view(x), -1, 0)  # (C, ...grid)
        dims = list(range(1, d + 1))
        spec = torch.fft.rfftn(v, s=lengths, dim=dims) * torch.fft.rfftn(kernel, s=lengths, dim=list(range(d)))
        y = torch.fft.irfftn(spec, s=lengths, dim=dims)
        y = y[(slice(None),) + tuple(slice(0, s) for s in sizes)]
        return torch.movedim(y, 0, -1).reshape(x.shape)

    # -- which codes an update reaches (the authors' no-update variant) ------------------------------
    def support_radius(self, step: float) -> float:
        """R_t: every grid distance beyond it has a float32 weight of exactly 0 (``h_t(d) < 2^-150``)."""
        return self.neighborhood.radius(step, FLOAT32_ZERO_CUTOFF)

    def dilate(self, winners: torch.Tensor, step: float) -> torch.Tensor:
        """``hit_k = OR_j (winners_j and float32(h_t(d(j, k))) > 0)``: the codes that some winner's float32
        neighbourhood weight reaches, ``(K,)`` bool. It equals ``(one_hot(winners) @ P_t > 0)`` with the dense
        float32 ``P_t`` of the authors' code (``n_writes > 0``) for every kernel, including weights far
        below the smoothing cutoff (down to the smallest float32 subnormal), at any K: a boolean dilation of
        the winner set by the kernel's float32 support, by shifted ORs for a small support, else by an
        exact float64 FFT count of the winners within the support (an integer; > 0.5 means >= 1)."""
        winners = winners.reshape(-1).bool()
        if winners.shape[0] != self.grid.size:
            raise ValueError(f"expected a ({self.grid.size},) winner mask, got {tuple(winners.shape)}")
        radius = self.support_radius(step)
        if radius <= 1.0 or not bool(winners.any()):  # the nearest other code is at distance 1
            return winners.clone()
        positive = lambda dist: (self.neighborhood.weights(dist, step).to(torch.float32) > 0)  # noqa: E731
        taps = self._support_taps(radius)
        if taps is not None:
            return self._shifted_or(winners, taps[positive(self.grid.offset_distance(taps))])
        # an integer count of winners within the support: float64 keeps the FFT's rounding far below 0.5
        # (float32 on MPS, which has no float64: still well below 0.5 for the grids it can hold)
        dtype = torch.float32 if winners.device.type == "mps" else torch.float64
        counts = self._fft_convolve(winners.to(dtype).unsqueeze(1), radius, lambda dist: positive(dist).to(dtype))
        return counts.squeeze(1) > 0.5

    def _support_taps(self, radius: float):
        """The lattice offsets within ``radius`` (plus a margin for float rounding) when there are at most
        :data:`STENCIL_MAX_TAPS` of them, else None (then the FFT is cheaper); cached for the last radius."""
        if self._support_taps_cache is None or self._support_taps_cache[0] != radius:
            taps = None
            if radius <= 8:  # a larger disc holds more than 49 lattice points on any grid of >= 2 x 8 codes
                taps = self.grid.lattice_offsets(max(radius * (1 + 1e-9), radius + 1e-9))
                if len(taps) > STENCIL_MAX_TAPS:
                    taps = None
            self._support_taps_cache = (radius, taps)
        return self._support_taps_cache[1]

    def _shifted_or(self, mask: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        """``out[c] = OR_tap mask[c + tap]`` on the grid (wrapped on periodic grids, cut at the border)."""
        grid = self.grid
        src = grid.grid_view(mask)
        out = torch.zeros_like(src)
        d = grid.ndim
        for tap in taps.tolist():
            if grid.periodic:
                out |= torch.roll(src, shifts=[-o for o in reversed(tap)], dims=list(range(d)))
                continue
            dst_idx, src_idx = [], []
            for o, s in zip(reversed(tap), reversed(grid.shape)):
                dst_idx.append(slice(max(0, -o), s - max(0, o)))
                src_idx.append(slice(max(0, o), s - max(0, -o)))
            out[tuple(dst_idx)] |= src[tuple(src_idx)]
        return out.reshape(mask.shape)

    @staticmethod
    def _fft_lengths(sizes, radius: float) -> list:
        """Zero-padded FFT length per axis for a linear (not circular) convolution of a kernel that is
        below the cutoff beyond ``radius``: ``s + ceil(radius)`` rounded up to a 2^a 3^b 5^c size while that
        is below ``2 s`` (then ``2 s``, exact for any kernel). Every grid distance is at least the largest
        per-axis offset, so an offset wrapped around by the shorter period lands beyond the radius, where
        the kernel is below the cutoff: the same truncation as the stencil's."""
        if not math.isfinite(radius):
            return [2 * s for s in sizes]
        return [min(_fast_fft_size(s + math.ceil(radius)), 2 * s) for s in sizes]


def _fast_fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes that FFT libraries transform fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best
