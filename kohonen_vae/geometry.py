"""Grid geometry of a Kohonen map: where each code sits and how far apart two codes are.

Code ``k`` sits at integer coordinates ``(c_0, ..., c_{d-1})`` on a grid of shape ``(s_0, ..., s_{d-1})``
with **the first axis varying fastest**: ``k = c_0 + s_0 c_1 + s_0 s_1 c_2 + ...``
(2-D: ``k -> (k mod s_0, k div s_0)``), as in the paper's reference implementation.

Topologies
----------
``"rectangular"``  Euclidean distance between integer coordinates (the paper's).
``"hexagonal"``    2-D only. Coordinates are *axial* hex coordinates ``(q, r)``; the cell centre in the
                   plane is ``(q + r/2, r sqrt(3)/2)``, so each interior code has 6 neighbours at distance 1
                   and the map is a rhombus. Axial coordinates keep every distance a function of the
                   coordinate *difference*, which is what lets every kernel be a convolution.
``periodic=True``  each axis wraps around (a torus): the distance is the shortest over the wrap-arounds.

Every grid distance is therefore ``metric(c_j - c_k)``; :meth:`Grid.offset_distance` computes it for
arbitrary offset vectors, and all neighborhood code (dense, stencil, FFT) is built on it.
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Iterable, Sequence

import torch

TOPOLOGIES = ("rectangular", "hexagonal")


def as_size(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, for sizes (codebook size, vector size, grid sides, dims).

    Accepts integers and integral floats (``8.0``); rejects booleans, non-integral numbers (``8.5`` would
    silently become 8), NaN/Inf and non-numbers with a ``ValueError`` that names ``name``.
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and isinstance(value, numbers.Real) and not isinstance(value, bool):
        ok = math.isfinite(float(value)) and float(value) == int(value)
    if not ok and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a 0-d tensor / numpy scalar
        return as_size(value.item(), name, minimum)
    if not ok or int(value) < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def auto_grid_shape(codebook_size: int, dims: int) -> tuple[int, ...]:
    """Grid shape for ``codebook_size`` codes in ``dims`` dimensions, as the paper factorises it.

    The last factor is the largest divisor ``i`` of K with ``i <= ceil(K ** (1/dims))``; the remaining
    ``K / i`` is factorised the same way with ``dims - 1`` dimensions.
    512 in 2-D -> (32, 16); 1024 -> (32, 32); 128 -> (16, 8).
    """
    codebook_size = as_size(codebook_size, "codebook_size")
    dims = as_size(dims, "grid dims")
    if dims == 1:
        return (codebook_size,)
    root = codebook_size ** (1.0 / dims)
    limit = math.ceil(root - 1e-9)  # guard against 512 ** (1/3) = 7.9999999
    last = max(i for i in range(1, limit + 1) if codebook_size % i == 0)
    return auto_grid_shape(codebook_size // last, dims - 1) + (last,)


class Grid:
    """Positions of K codes on a d-dimensional grid and the distances between them.

    Args:
        shape: grid shape ``(s_0, ..., s_{d-1})``; ``prod(shape)`` is the codebook size.
        periodic: wrap every axis around (toroidal map).
        topology: ``"rectangular"`` or ``"hexagonal"`` (2-D only).

    Use :meth:`Grid.auto` to get the paper's shape from a codebook size.
    """

    def __init__(self, shape: Sequence[int], periodic: bool = False, topology: str = "rectangular"):
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
            raise ValueError(f"grid shape must be a sequence of positive integers such as (32, 16), got {shape!r}")
        raw = tuple(shape)
        if len(raw) == 0:
            raise ValueError(f"grid shape must be a non-empty tuple of positive sizes, got {raw}")
        try:
            shape = tuple(as_size(s, "grid shape") for s in raw)
        except ValueError:
            raise ValueError(f"grid shape must be a non-empty tuple of positive integers, got {raw!r}") from None
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown grid topology {topology!r}; choose one of {TOPOLOGIES}")
        if topology == "hexagonal" and len(shape) != 2:
            raise ValueError(f"a hexagonal grid must be 2-D, got shape {shape}")
        self.shape = shape
        self.periodic = bool(periodic)
        self.topology = topology

    @classmethod
    def auto(cls, codebook_size: int, dims: int = 2, **kwargs) -> "Grid":
        """The grid with :func:`auto_grid_shape` ``(codebook_size, dims)``."""
        return cls(auto_grid_shape(codebook_size, dims), **kwargs)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of codes K = prod(shape)."""
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        extra = ", periodic=True" if self.periodic else ""
        extra += f", topology={self.topology!r}" if self.topology != "rectangular" else ""
        return f"Grid(shape={self.shape}{extra})"

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Grid)
            and (self.shape, self.periodic, self.topology) == (other.shape, other.periodic, other.topology)
        )

    def __hash__(self) -> int:
        return hash((self.shape, self.periodic, self.topology))

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "periodic": self.periodic, "topology": self.topology}

    # -- index <-> coordinates -----------------------------------------------------------------
    def _strides(self) -> list[int]:
        strides, acc = [], 1
        for s in self.shape:
            strides.append(acc)
            acc *= s
        return strides

    def index_to_coords(self, index) -> torch.Tensor:
        """Coordinates ``(..., d)`` of code indices ``(...)``: ``c_i = (k // prod(s_<i)) mod s_i``."""
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise ValueError(f"code index out of range [0, {self.size}) for {self!r}")
        coords = [(index // st) % s for st, s in zip(self._strides(), self.shape)]
        return torch.stack(coords, dim=-1)

    def coords_to_index(self, coords) -> torch.Tensor:
        """Code indices ``(...)`` of coordinates ``(..., d)``: ``k = sum_i c_i prod(s_<i)``.

        Periodic grids wrap coordinates first; otherwise out-of-grid coordinates raise (see :meth:`clamp`).
        """
        coords = torch.as_tensor(coords, dtype=torch.long)
        if coords.shape[-1] != self.ndim:
            raise ValueError(f"coordinates must have last dimension {self.ndim} for {self!r}, got {tuple(coords.shape)}")
        sizes = torch.tensor(self.shape, device=coords.device)
        if self.periodic:
            coords = coords % sizes
        elif coords.numel() and (bool((coords < 0).any()) or bool((coords >= sizes).any())):
            raise ValueError(f"coordinates outside {self!r}; use grid.clamp(coords) first")
        strides = torch.tensor(self._strides(), device=coords.device)
        return (coords * strides).sum(-1)

    def coords(self, device=None) -> torch.Tensor:
        """All codes' coordinates, ``(K, d)`` long, row k for code k."""
        return self.index_to_coords(torch.arange(self.size)).to(device)

    def clamp(self, coords) -> torch.Tensor:
        """Coordinates moved onto the grid: clamped per axis to ``[0, s_i - 1]``; wrapped on periodic grids."""
        coords = torch.as_tensor(coords, dtype=torch.long)
        sizes = torch.tensor(self.shape, device=coords.device)
        if self.periodic:
            return coords % sizes
        return torch.minimum(coords.clamp(min=0), sizes - 1)

    def shift(self, index, offset: Sequence[int]) -> torch.Tensor:
        """Indices of the codes at ``coords(index) + offset`` (clamped at the border, wrapped if periodic)."""
        index = torch.as_tensor(index, dtype=torch.long)
        offset_t = torch.tensor(list(offset), dtype=torch.long, device=index.device)
        if offset_t.numel() != self.ndim:
            raise ValueError(f"offset must have {self.ndim} entries for {self!r}, got {list(offset)}")
        return self.coords_to_index(self.clamp(self.index_to_coords(index).to(index.device) + offset_t))

    # -- distances -----------------------------------------------------------------------------
    def _plane(self, delta: torch.Tensor) -> torch.Tensor:
        """Offsets mapped to the plane where the metric is Euclidean."""
        if self.topology == "hexagonal":
            dq, dr = delta[..., 0], delta[..., 1]
            return torch.stack((dq + 0.5 * dr, dr * (math.sqrt(3.0) / 2.0)), dim=-1)
        return delta

    def offset_distance(self, delta) -> torch.Tensor:
        """Grid distance of coordinate offsets ``(..., d)``: ``||plane(delta)||_2``, minimised over the
        wrap-arounds ``delta + w * shape`` (``w`` in {-1, 0, 1}^d) on periodic grids."""
        delta = torch.as_tensor(delta).to(torch.float64)
        if not self.periodic:
            return self._plane(delta).norm(dim=-1)
        sizes = torch.tensor(self.shape, dtype=torch.float64, device=delta.device)
        delta = torch.remainder(delta + sizes / 2, sizes) - sizes / 2  # centred in [-s/2, s/2)
        best = None
        for w in itertools.product((-1.0, 0.0, 1.0), repeat=self.ndim):
            d = self._plane(delta + torch.tensor(w, dtype=torch.float64, device=delta.device) * sizes).norm(dim=-1)
            best = d if best is None else torch.minimum(best, d)
        return best

    def distance(self, i, j) -> torch.Tensor:
        """Grid distance between codes ``i`` and ``j`` (broadcasting)."""
        ci, cj = self.index_to_coords(i), self.index_to_coords(j)
        return self.offset_distance(cj - ci)

    def distance_matrix(self, device=None) -> torch.Tensor:
        """Dense ``(K, K)`` grid distances. O(K^2) memory: for tests and small maps only."""
        c = self.coords(device)
        return self.offset_distance(c[None, :, :] - c[:, None, :]).float()

    def neighbours(self, index: int, radius: float = 1.5) -> torch.Tensor:
        """Indices (sorted) of the codes ``j != index`` with ``0 < d(index, j) < radius``."""
        index = int(index)
        if not 0 <= index < self.size:
            raise ValueError(f"code index {index} out of range [0, {self.size})")
        c = self.coords()
        d = self.offset_distance(c - c[index])
        mask = (d > 0) & (d < radius)
        return torch.nonzero(mask).flatten()

    def random_neighbors(self, indices, generator: torch.Generator | None = None, *, u=None,
                         radius: float = 1.5) -> torch.Tensor:
        """For every code index, a code drawn uniformly from its grid neighbours ``{j : 0 < d(k, j) < radius}``
        (the 8 Moore neighbours inside a rectangular 2-D grid, fewer at the border; 6 on a hexagonal grid;
        wrap-around neighbours on a periodic one), same shape and device as ``indices``.

        The choice is the ``floor(u * n_k)``-th (from 0, in increasing code index, i.e. the order of
        :meth:`neighbours`) of the ``n_k`` distinct neighbours of k, with ``u`` uniform in [0, 1): taken from
        ``u`` (a float tensor of the shape of ``indices``) when given, else drawn with
        ``torch.rand(..., generator=generator)`` on the CPU. A code without neighbours (K = 1) stays.
        """
        indices = torch.as_tensor(indices)
        device = indices.device
        flat = indices.reshape(-1).long().cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.size):
            raise ValueError(f"code index out of range [0, {self.size}) for {self!r}")
        if u is None:
            u = torch.rand(flat.shape, generator=generator, dtype=torch.float64)
        else:
            u = torch.as_tensor(u).reshape(-1).double().cpu()
            if u.shape != flat.shape:
                raise ValueError(f"u must have the shape of indices {tuple(indices.shape)}, got {tuple(u.shape)}")
        offsets = self.lattice_offsets(radius)
        dist = self.offset_distance(offsets)
        offsets = offsets[(dist > 0) & (dist < radius)]  # (M, d), the zero offset removed
        if offsets.shape[0] == 0 or flat.numel() == 0:
            return indices.clone()
        coords = self.index_to_coords(flat)  # (N, d)
        target = coords[:, None, :] + offsets[None]  # (N, M, d)
        sizes = torch.tensor(self.shape)
        if self.periodic:
            target = target % sizes
            valid = torch.ones(target.shape[:2], dtype=torch.bool)
        else:
            valid = ((target >= 0) & (target < sizes)).all(-1)
        strides = torch.tensor(self._strides())
        target_idx = (target.clamp(min=0) * strides).sum(-1)  # (N, M); invalid columns are masked below
        if self.periodic:
            valid &= target_idx != flat[:, None]  # wrapped around onto itself (an axis of size 1 or 2)
            # the same neighbour reached by two offsets (a periodic axis of size 2) counts once
            m = offsets.shape[0]
            earlier = (target_idx[:, :, None] == target_idx[:, None, :]) & valid[:, None, :]
            earlier &= torch.ones(m, m, dtype=torch.bool).tril(-1)[None]
            valid &= ~earlier.any(-1)
        n_valid = valid.sum(1)
        pick = (u * n_valid.double()).floor().long().clamp(max=(n_valid - 1).clamp(min=0))
        ordered = torch.where(valid, target_idx, torch.full_like(target_idx, self.size)).sort(1).values
        out = torch.where(n_valid > 0, ordered.gather(1, pick[:, None]).squeeze(1), flat)
        return out.reshape(indices.shape).to(device=device, dtype=indices.dtype)

    def lattice_offsets(self, radius: float) -> torch.Tensor:
        """All integer offsets ``(M, d)`` with distance ``< radius`` (the zero offset included), without
        duplicates modulo the grid size on periodic axes. These are the taps of a truncated stencil."""
        reach = [min(math.ceil(radius * (2.0 if self.topology == "hexagonal" else 1.0)), s - 1) for s in self.shape]
        ranges = [range(-r, r + 1) for r in reach]
        cand = torch.tensor(list(itertools.product(*ranges)), dtype=torch.long).reshape(-1, self.ndim)
        dist = self.offset_distance(cand)
        cand = cand[(dist < radius) | (dist == 0)]
        if self.periodic:
            sizes = torch.tensor(self.shape)
            cand = torch.unique(torch.remainder(cand, sizes), dim=0)
        return cand

    def grid_view(self, values: torch.Tensor) -> torch.Tensor:
        """View per-code values ``(K, ...)`` as ``(s_{d-1}, ..., s_0, ...)``: a C-order reshape, since the
        first grid axis varies fastest in the code index."""
        if values.shape[0] != self.size:
            raise ValueError(f"expected {self.size} rows (one per code), got {values.shape[0]}")
        return values.reshape(tuple(reversed(self.shape)) + tuple(values.shape[1:]))


def as_grid(grid_or_shape: "Grid | Iterable[int] | None", codebook_size: int, dims: int = 2, **kwargs) -> Grid:
    """A :class:`Grid` from a grid, a shape, or ``None`` (the automatic shape), checked against K."""
    if isinstance(grid_or_shape, Grid):
        grid = grid_or_shape
    elif grid_or_shape is None:
        grid = Grid.auto(codebook_size, dims, **kwargs)
    else:
        grid = Grid(tuple(grid_or_shape), **kwargs)
    if grid.size != codebook_size:
        raise ValueError(
            f"grid shape {grid.shape} holds {grid.size} codes but codebook_size is {codebook_size}; "
            f"pass a shape whose product is {codebook_size}, or grid_shape=None for the automatic "
            f"{auto_grid_shape(codebook_size, dims)}"
        )
    return grid
