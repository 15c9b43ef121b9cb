"""When tokens are wrong: corrupt token maps reproducibly and measure how gracefully a tokenizer degrades.

Two places where tokens go wrong in practice are modelled (issue 17):

* **a noisy channel**: the index of every token is sent as a bit pattern through a binary symmetric channel,
  each bit flipped independently with probability p (:func:`flip_bits`). What a flipped bit does depends on
  the *index assignment* (which bit pattern stands for which code, :class:`IndexAssignment`);
* **near misses of whatever predicts tokens**: a fraction q of tokens replaced by a uniformly random other
  code (:func:`substitute_random`) or by a random grid neighbour (:func:`substitute_neighbor`).

Index assignments (all bijections of [0, K) onto K bit patterns)
-----------------------------------------------------------------
An assignment writes code k as digits ``(v_0, ..., v_{m-1})``, ``v_i in [0, s_i)``, of its *rank*
``r(k)`` in mixed radix with the first digit fastest (``r = v_0 + s_0 v_1 + s_0 s_1 v_2 + ...``), and sends
digit i in its own field of ``b_i = ceil(log2 s_i)`` bits (field 0 in the lowest bits), either as the plain
binary number or Gray-coded (:func:`gray_encode`):

==============  =====================================================================================================
``binary``      one field ``s_0 = K``, rank = index: the plain index in ``ceil(log2 K)`` bits.
``gray-grid``   fields = the grid shape, rank = index, Gray-coded: the digits are exactly the grid coordinates
                (:meth:`Grid.index_to_coords`, first axis fastest), each Gray-coded in its own field, so flipping the
                lowest bit of a field moves the code by +-1 along that axis, i.e. to a grid neighbour. Hexagonal
                grids use the package's axial coordinates (q, r) (a rhombus; neighbours at offsets
                (+-1, 0), (0, +-1), (1, -1), (-1, 1)): a low-bit flip changes q or r by 1, both distance-1
                neighbours (the two diagonal ones need two flips). Periodic grids: the same code (the flip does
                not use the wrap-around). FSQ's grid is its level lattice, so FSQ gets the same treatment.
``path``        one field ``s_0 = K``, rank = position on a 1-D path through the code vectors
                (:func:`codebook_path`), Gray-coded: a low-bit flip moves one step along the path, to a code
                that is near in the decoder's input space. Needs no grid: a user computes it after training.
==============  =====================================================================================================

Out-of-range patterns (a field size s that is not a power of two): a flipped bit can yield a field value
``v >= s``. The receiver **mirrors it at the last valid value**, ``v -> 2 (s - 1) - v``, which always lands in
``[0, s)`` (``v < 2^b <= 2 s - 1``). The same rule applies to every field of every assignment (binary index,
path position, grid coordinate), so no method is favoured; a flip that would step one past the border steps
one back instead (still a neighbour), and out-of-range patterns are spread over codes near the border, not
piled onto one. With power-of-two sizes (the ``field`` runs: K = 512, grid 32x16, FSQ 8x8x8) it never fires.
Note that on a grid whose first side ``s_0`` is a power of two the plain binary index *is* the concatenation
of the natural-binary coordinates (``k = c_0 + s_0 c_1``): ``binary`` then also moves along one grid axis per
flipped bit (by a power of two), so a trained grid helps under ``binary`` too.

Corruptions are pure (a new tensor; the input is untouched) and deterministic under a ``torch.Generator``:
all random numbers are drawn on the CPU from that generator, so results do not depend on the device.

:func:`channel_experiment` runs all of it on trained runs and writes ``channel.json``, ``results.md`` and
figures; :func:`channel_from_field` does it for the runs of ``kohonen-vae reproduce field``.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .geometry import Grid, as_size

#: bit error rates p of the channel experiment (log-spaced, 1e-4 .. 1e-1)
DEFAULT_BIT_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
#: token substitution rates q (roughly log-spaced, 1 % .. 50 %)
DEFAULT_SUB_RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
#: the bit error rates shown in channel_images.png (each snapped to the nearest measured rate)
DEFAULT_IMAGE_RATES = (1e-3, 1e-2, 1e-1)
ASSIGNMENTS = ("binary", "gray-grid", "path")
SUBSTITUTIONS = ("random", "neighbor-grid", "neighbor-path")
MAX_BITS = 62
# random streams of the experiment; the same stream and rate give the same error positions for every method and
# assignment (common random numbers: differences between methods are not sampling noise of the error pattern)
_STREAMS = {"bits": 1, "random": 2, "neighbor": 3}


# ------------------------------------------------------------------------------------------------ Gray code
def _check_nonnegative_integers(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    x = x.long()
    if x.numel() and int(x.min()) < 0:
        raise ValueError(f"{name} must be non-negative integers, got a minimum of {int(x.min())}")
    return x


def gray_encode(n) -> torch.Tensor:
    """Binary-reflected Gray code of non-negative integers: ``g = n XOR (n >> 1)`` (int64, same shape).
    Consecutive integers have codes that differ in exactly one bit."""
    n = _check_nonnegative_integers(n, "gray_encode input")
    return n ^ (n >> 1)


def gray_decode(g) -> torch.Tensor:
    """Inverse of :func:`gray_encode`: ``n_i = XOR_{j >= i} g_j`` (bit i of n is the parity of the bits of g at
    and above i), computed as ``g XOR (g >> 1) XOR (g >> 2) XOR ...`` by doubling shifts (int64)."""
    n = _check_nonnegative_integers(g, "gray_decode input").clone()
    shift = 1
    while shift < 64:
        n ^= n >> shift
        shift <<= 1
    return n


def bit_width(size: int) -> int:
    """Bits of a field holding values in [0, size): ``ceil(log2 size)`` (0 for size 1)."""
    return (as_size(size, "field size") - 1).bit_length()


def mirror_into_range(values: torch.Tensor, size: int) -> torch.Tensor:
    """The receiver's rule for out-of-range field values: ``v >= size -> 2 (size - 1) - v`` (mirrored at the last
    valid value), ``v`` unchanged otherwise. For ``v < 2^ceil(log2 size)`` the result is in ``[0, size)``."""
    return torch.where(values >= size, 2 * (size - 1) - values, values)


# ------------------------------------------------------------------------------------- index assignments
class IndexAssignment:
    """A bijection between code indices ``[0, K)`` and ``bits``-bit patterns (see the module docstring).

    Args:
        name: label (``"binary"``, ``"gray-grid"``, ``"path"``, ...).
        radices: field sizes ``(s_0, ..., s_{m-1})`` with ``prod = K``; field i holds digit ``v_i`` of the rank.
        gray: Gray-code every field (else natural binary).
        order: ``(K,)`` permutation, ``order[r]`` = the code of rank r (None: rank = index).

    ``encode(k) = sum_i code_i(v_i(r(k))) << o_i`` with ``o_i = sum_{j<i} b_j``; ``decode`` inverts it and maps
    out-of-range field values back with :func:`mirror_into_range`.
    """

    def __init__(self, name: str, radices: Sequence[int], gray: bool, order=None):
        radices = tuple(as_size(s, "field size") for s in radices)
        if not radices:
            raise ValueError("an index assignment needs at least one field")
        self.name = str(name)
        self.radices = radices
        self.gray = bool(gray)
        self.size = math.prod(radices)
        self.widths = tuple(bit_width(s) for s in radices)
        self.offsets = tuple(sum(self.widths[:i]) for i in range(len(radices)))
        self.strides = tuple(math.prod(radices[:i]) for i in range(len(radices)))
        if self.bits > MAX_BITS:
            raise ValueError(f"{self.bits} bits per token exceed the {MAX_BITS} that fit an int64 pattern")
        if order is None:
            self.order = torch.arange(self.size)
        else:
            self.order = torch.as_tensor(order).long().cpu().reshape(-1)
            if self.order.numel() != self.size or not torch.equal(self.order.sort().values, torch.arange(self.size)):
                raise ValueError(f"order must be a permutation of range({self.size})")
        self.rank = torch.empty_like(self.order)
        self.rank[self.order] = torch.arange(self.size)

    @property
    def bits(self) -> int:
        """Bits per token: ``sum_i ceil(log2 s_i)``."""
        return sum(self.widths)

    def __repr__(self) -> str:
        return f"IndexAssignment({self.name!r}, radices={self.radices}, gray={self.gray}, bits={self.bits})"

    def to_dict(self) -> dict:
        return {"name": self.name, "radices": list(self.radices), "gray": self.gray, "bits": self.bits}

    def _check_indices(self, indices) -> torch.Tensor:
        idx = _check_nonnegative_integers(indices, "code indices")
        if idx.numel() and int(idx.max()) >= self.size:
            raise ValueError(f"code index {int(idx.max())} out of range [0, {self.size}) for {self!r}")
        return idx

    def encode(self, indices) -> torch.Tensor:
        """Bit patterns (int64, same shape and device) of code indices in ``[0, K)``."""
        idx = self._check_indices(indices)
        rank = self.rank.to(idx.device)[idx]
        pattern = torch.zeros_like(rank)
        for s, st, off in zip(self.radices, self.strides, self.offsets):
            digit = (rank // st) % s
            pattern |= (gray_encode(digit) if self.gray else digit) << off
        return pattern

    def decode(self, patterns) -> torch.Tensor:
        """Code indices (int64, same shape) of any ``bits``-bit patterns; out-of-range fields are mirrored."""
        pat = _check_nonnegative_integers(patterns, "bit patterns")
        if pat.numel() and int(pat.max()) >> self.bits:
            raise ValueError(f"bit pattern {int(pat.max())} has more than {self.bits} bits for {self!r}")
        rank = torch.zeros_like(pat)
        for s, w, st, off in zip(self.radices, self.widths, self.strides, self.offsets):
            field = (pat >> off) & ((1 << w) - 1)
            digit = mirror_into_range(gray_decode(field) if self.gray else field, s)
            rank += digit * st
        return self.order.to(pat.device)[rank]


def binary_assignment(codebook_size: int) -> IndexAssignment:
    """The plain index in ``ceil(log2 K)`` bits."""
    return IndexAssignment("binary", (as_size(codebook_size, "codebook_size"),), gray=False)


def gray_grid_assignment(grid: Grid) -> IndexAssignment:
    """Each grid coordinate Gray-coded in its own field (axial coordinates on a hexagonal grid)."""
    return IndexAssignment("gray-grid", grid.shape, gray=True)


def path_assignment(codes: torch.Tensor, **path_options) -> IndexAssignment:
    """The Gray-coded position of each code on :func:`codebook_path` of the code vectors ``(K, D)``."""
    return IndexAssignment("path", (int(codes.shape[0]),), gray=True, order=codebook_path(codes, **path_options))


# ------------------------------------------------------------------------------------------- 1-D path
def path_length(codes: torch.Tensor, order) -> float:
    """``sum_j ||x_{order[j+1]} - x_{order[j]}||``: the length of the open path visiting the codes in ``order``."""
    x = torch.as_tensor(codes).detach().double().cpu()
    o = torch.as_tensor(order).long().cpu()
    return float((x[o[1:]] - x[o[:-1]]).norm(dim=1).sum())


def codebook_path(codes: torch.Tensor, max_moves: int | None = None) -> torch.Tensor:
    """An open path through all K code vectors ``(K, D)`` that is short in Euclidean length; returns ``order``
    (``(K,)`` int64, ``order[j]`` = the j-th code on the path).

    Greedy nearest neighbour from the code farthest from the centroid (a likely end of the path), then
    best-improvement 2-opt to a local optimum: each move reverses a stretch ``order[i+1..j]`` when
    ``d(a_i, a_{i+1}) + d(a_j, a_{j+1}) > d(a_i, a_j) + d(a_{i+1}, a_{j+1})``; the path's two open ends are a
    dummy node at distance 0 from every code, so moves may also reverse a prefix or suffix. At most
    ``max_moves`` moves (default 50 K). Deterministic (float64, ties to the lowest index). This minimises the
    quantity that matters for a +-1 step along the path, the distance between consecutive codes, without any
    hyper-parameter (a 1-D SOM over the codebook would need a schedule and may fold).
    """
    x = torch.as_tensor(codes).detach().double().cpu()
    if x.dim() != 2:
        raise ValueError(f"codes must be (K, D), got shape {tuple(x.shape)}")
    k = x.shape[0]
    if k <= 3:
        return torch.arange(k)
    dist = torch.cdist(x, x)
    # greedy nearest neighbour
    start = int((x - x.mean(0)).norm(dim=1).argmax())
    visited = torch.zeros(k, dtype=torch.bool)
    path = [start]
    visited[start] = True
    for _ in range(k - 1):
        d = dist[path[-1]].masked_fill(visited, math.inf)
        nxt = int(d.argmin())
        path.append(nxt)
        visited[nxt] = True
    # 2-opt on the cycle (dummy, a_0, ..., a_{K-1}); the dummy stays at position 0
    n = k + 1
    ext = torch.zeros(n, n, dtype=torch.float64)
    ext[:k, :k] = dist
    tour = torch.tensor([k] + path)
    allowed = torch.ones(n, n, dtype=torch.bool).triu(2)  # j >= i + 2
    tol = 1e-12 * float(dist.max()) if float(dist.max()) > 0 else 0.0
    for _ in range(max_moves if max_moves is not None else 50 * k):
        a = ext[tour][:, tour]
        nxt = torch.arange(1, n + 1) % n
        edge = a[torch.arange(n), nxt]                    # d(t_i, t_{i+1})
        a_next = a[nxt][:, nxt]                            # d(t_{i+1}, t_{j+1})
        gain = (edge[:, None] + edge[None, :] - a - a_next).masked_fill(~allowed, -math.inf)
        best = int(gain.argmax())
        if float(gain.view(-1)[best]) <= tol:
            break
        i, j = divmod(best, n)
        tour[i + 1:j + 1] = tour[i + 1:j + 1].flip(0).clone()
    return tour[1:].clone()


# ---------------------------------------------------------------------------------------- corruption
def _check_rate(rate, name: str) -> float:
    r = float(rate)
    if not (0.0 <= r <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {rate!r}")
    return r


def _flat_cpu(indices, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    indices = torch.as_tensor(indices)
    flat = _check_nonnegative_integers(indices, "code indices").reshape(-1).cpu()
    if flat.numel() and int(flat.max()) >= size:
        raise ValueError(f"code index {int(flat.max())} out of range [0, {size})")
    return indices, flat


def _like(out_flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return out_flat.reshape(indices.shape).to(device=indices.device, dtype=indices.dtype)


def flip_bits(indices, assignment: IndexAssignment, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``indices`` sent through a binary symmetric channel: ``decode(encode(k) XOR m)`` where each of the
    ``assignment.bits`` bits of the mask m is 1 independently with probability p (``u < p``, u drawn by
    ``torch.rand((N, bits), generator=generator, dtype=float64)`` on the CPU, token n in C order is row n, bit j
    column j). A new tensor of the input's shape, dtype and device; p = 0 returns the input's values exactly."""
    p = _check_rate(p, "bit error rate p")
    indices, flat = _flat_cpu(indices, assignment.size)
    bits = assignment.bits
    u = torch.rand((flat.numel(), bits), generator=generator, dtype=torch.float64)
    mask = ((u < p).long() << torch.arange(bits)).sum(1)
    return _like(assignment.decode(assignment.encode(flat) ^ mask), indices)


def substitute_random(indices, codebook_size: int, q: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each token replaced with probability q by a code drawn uniformly from the *other* K - 1 codes (so q is
    the expected fraction of wrong tokens). Draws (CPU, from ``generator``): ``u = rand(N)`` (token n replaced
    iff ``u_n < q``), then ``r = randint(0, K - 1, (N,))`` and the replacement ``r + (r >= k)``. K = 1: unchanged."""
    q = _check_rate(q, "substitution rate q")
    k = as_size(codebook_size, "codebook_size")
    indices, flat = _flat_cpu(indices, k)
    hit = torch.rand(flat.shape, generator=generator, dtype=torch.float64) < q
    if k == 1:
        return _like(flat.clone(), indices)
    r = torch.randint(0, k - 1, flat.shape, generator=generator)
    return _like(torch.where(hit, r + (r >= flat).long(), flat), indices)


def substitute_neighbor(indices, grid: Grid, q: float, generator: torch.Generator | None = None, *,
                        order=None) -> torch.Tensor:
    """Each token replaced with probability q by a uniformly random grid neighbour
    (:meth:`Grid.random_neighbors`, never the code itself unless it has none). Draws (CPU, from
    ``generator``): ``u = rand(N)`` (replaced iff ``u_n < q``), then the neighbour choice of every token.

    ``order`` (a permutation of ``range(grid.size)``, ``order[j]`` = the code at grid position j) lays the grid
    over another order of the codes, e.g. ``Grid((K,))`` with a :func:`codebook_path` order replaces a code by
    the code one step before or after it on the path."""
    q = _check_rate(q, "substitution rate q")
    indices, flat = _flat_cpu(indices, grid.size)
    hit = torch.rand(flat.shape, generator=generator, dtype=torch.float64) < q
    if order is None:
        neighbours = grid.random_neighbors(flat, generator)
    else:
        perm = IndexAssignment("order", (grid.size,), gray=False, order=order)
        neighbours = perm.order[grid.random_neighbors(perm.rank[flat], generator)]
    return _like(torch.where(hit, neighbours, flat), indices)


# ------------------------------------------------------------------------------------ quantiser helpers
def grid_is_organised(quantizer) -> bool:
    """True when the quantiser's grid carries a trained or built-in topology: a Kohonen/GD-SOM quantiser with a
    neighbourhood other than "none", or FSQ (its grid is its level lattice). EMA-VQ, VectorQuantize and SimVQ
    lay the index order on a grid that means nothing."""
    if getattr(quantizer, "cls", None) == "FSQ":
        return True
    neighborhood = getattr(quantizer, "neighborhood", None)
    return neighborhood is not None and getattr(neighborhood, "name", "none") != "none"


def assignments_for(quantizer) -> dict:
    """``{"binary", "gray-grid", "path"}`` assignments of one quantiser: its codebook size, its grid
    (``quantizer.grid``) and a path through its code vectors in the decoder's input space
    (``quantizer.codebook``, what ``get_codes_from_indices`` returns)."""
    with torch.no_grad():
        codes = quantizer.codebook.detach().float().cpu()
    return {"binary": binary_assignment(quantizer.codebook_size),
            "gray-grid": gray_grid_assignment(quantizer.grid),
            "path": path_assignment(codes)}


# --------------------------------------------------------------------------------------- measurements
def reconstruction_errors(decoded: torch.Tensor, images: torch.Tensor, normalizer) -> dict:
    """``{"mse", "psnr", "mse_pixels"}`` of decodings ``(N, C, H, W)`` (normalised space) against uint8 images:
    ``mse = mean((decoded - normalize(images))^2)`` (normalised space, the training loss' units);
    ``psnr = 10 log10(255^2 / mse_pixels)``, ``mse_pixels = mean((255 denormalize(decoded) - images)^2)`` over all
    pixels of the set (denormalize clamps to [0, 1]; no rounding to integers)."""
    sq, sq_pix, count = 0.0, 0.0, 0
    for s in range(0, images.shape[0], 256):
        img = images[s:s + 256].to(decoded.device)
        dec = decoded[s:s + 256]
        sq += float(((dec.double() - normalizer.normalize(img).double()) ** 2).sum())
        sq_pix += float(((normalizer.denormalize(dec).double() * 255.0 - img.double()) ** 2).sum())
        count += img.numel()
    mse_pix = sq_pix / count
    return {"mse": sq / count, "psnr": 10.0 * math.log10(255.0 ** 2 / mse_pix) if mse_pix > 0 else math.inf,
            "mse_pixels": mse_pix}


def doubling_rate(rates: Sequence[float], mse: Sequence[float], clean_mse: float, factor: float = 2.0) -> dict:
    """The error rate at which the MSE first reaches ``factor x clean_mse``.

    With the rates sorted ascending and i the first point with ``mse_i >= factor clean``: interpolated between
    points i-1 and i linearly in (log rate, log MSE), ``log r* = log r_{i-1} + t (log r_i - log r_{i-1})``,
    ``t = (log(factor clean) - log mse_{i-1}) / (log mse_i - log mse_{i-1})`` (exact when the MSE follows a power
    law of the rate between the two points). Returns ``{"rate", "bound", "text"}``: bound "interpolated"; or
    "above" (never reached: rate None, text "> max rate"); or "below" (already reached at the smallest rate:
    rate None, text "< min rate")."""
    pts = sorted(zip((float(r) for r in rates), (float(m) for m in mse)))
    if not pts:
        raise ValueError("doubling_rate needs at least one measured point")
    if any(r <= 0 for r, _ in pts) or clean_mse <= 0 or any(m <= 0 for _, m in pts):
        raise ValueError("doubling_rate needs positive rates and MSEs (log interpolation)")
    target = factor * float(clean_mse)
    for i, (r, m) in enumerate(pts):
        if m >= target:
            if i == 0:
                return {"rate": None, "bound": "below", "text": f"< {_fmt_rate(r)}"}
            r0, m0 = pts[i - 1]
            t = (math.log(target) - math.log(m0)) / (math.log(m) - math.log(m0))
            rate = math.exp(math.log(r0) + t * (math.log(r) - math.log(r0)))
            return {"rate": rate, "bound": "interpolated", "text": _fmt_rate(rate)}
    return {"rate": None, "bound": "above", "text": f"> {_fmt_rate(pts[-1][0])}"}


def _fmt_rate(r: float) -> str:
    return f"{r:.2g}" if r >= 0.01 else f"{r:.1e}".replace("e-0", "e-")


# -------------------------------------------------------------------------------------------- driver
def _generator(seed: int, stream: str, rate_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + _STREAMS[stream] * 1_009 + int(rate_index))


def _test_images(config: dict, n, seed: int, cache: dict, data_dir=None) -> torch.Tensor:
    from .data import evaluation_subset, splits_from_config, splits_key

    data = dict(config["data"], **({"data_dir": str(data_dir)} if data_dir is not None else {}))
    key = splits_key(data)
    if key not in cache:
        cache[key] = splits_from_config(data, download=False)
    splits = cache[key]
    if splits.test is None:
        raise ValueError(f"dataset {config['data'].get('name')!r} has no test split; pass images= explicitly")
    return evaluation_subset(splits.test.images, int(n), seed)


def _nearest_rates(rates: Sequence[float], wanted: Sequence[float]) -> list[float]:
    out = []
    for w in wanted:
        r = min(rates, key=lambda x: abs(math.log(x) - math.log(w)))
        if r not in out:
            out.append(r)
    return out


def _describe_grid(quantizer) -> dict:
    grid = quantizer.grid
    organised = grid_is_organised(quantizer)
    kind = "lattice" if getattr(quantizer, "cls", None) == "FSQ" else ("trained" if organised else "index order")
    return {**grid.to_dict(), "organised": organised, "kind": kind,
            "text": f"{'x'.join(map(str, grid.shape))} {kind}"}


def channel_experiment(run_dirs: Mapping[str, object], out_dir, *, images=1000, seed: int = 0,
                       bit_rates: Sequence[float] = DEFAULT_BIT_RATES, sub_rates: Sequence[float] = DEFAULT_SUB_RATES,
                       image_rates: Sequence[float] = DEFAULT_IMAGE_RATES, show_images: int = 4,
                       checkpoint: str = "last", batch_size: int = 250, device=None, progress: bool = True,
                       data_dir=None, command: str | None = None, log=print) -> dict:
    """Reconstruction under channel errors and token substitutions for trained runs ``{label: run_dir}``.

    For each run: load ``checkpoint`` (:func:`kohonen_vae.report.load_run`), encode the image set once
    (``images``: a count of test-split images, the fixed subset :func:`kohonen_vae.data.evaluation_subset`
    with ``seed``, read from ``data_dir`` if given, else from where the run was trained; or a uint8 tensor
    (N, C, H, W)), decode the clean tokens, then for every level's
    assignment (:func:`assignments_for`) and bit error rate p decode :func:`flip_bits` of the tokens, and for
    every q decode :func:`substitute_random`, :func:`substitute_neighbor` on the grid and along the path;
    each decoding is scored by :func:`reconstruction_errors`. Every level of a multi-level model is corrupted
    (each with its own assignment). Decodings use ``batch_size`` images at a time for clean and corrupted
    tokens alike, so an unchanged token map decodes to the clean reconstruction bit for bit.

    Random numbers: one generator per (stream, rate index) seeded from ``seed``, shared by all methods and
    assignments (the same error positions wherever the bit count and token count agree).

    Writes into ``out_dir`` (atomically): ``channel.json`` (every number), ``results.md`` (the error rate at
    which MSE doubles, :func:`doubling_rate`, per method x assignment and substitution), ``channel_bits.png``,
    ``channel_substitution.png`` and ``channel_images.png``. Returns ``{"data", "table", "json", "results",
    "figures"}``.
    """
    import matplotlib.pyplot as plt

    from . import figures
    from .fileio import atomic_write_json, atomic_write_text
    from .report import load_run

    if not run_dirs:
        raise ValueError("channel_experiment needs at least one run: {label: run_dir}")
    bit_rates = sorted(_check_rate(r, "bit error rate") for r in bit_rates)
    sub_rates = sorted(_check_rate(r, "substitution rate") for r in sub_rates)
    if not bit_rates or not sub_rates or bit_rates[0] <= 0 or sub_rates[0] <= 0:
        raise ValueError("bit_rates and sub_rates must be non-empty lists of rates in (0, 1]")
    shown_rates = _nearest_rates(bit_rates, image_rates)
    out_dir = Path(out_dir)
    splits_cache: dict = {}
    tasks_per_run = 1 + len(ASSIGNMENTS) * len(bit_rates) + len(SUBSTITUTIONS) * len(sub_rates)
    from tqdm.auto import tqdm

    bar = tqdm(total=tasks_per_run * len(run_dirs), desc="channel", unit="decode", disable=not progress)
    methods, image_rows, shown_inputs, first_images, n_images = {}, [], None, None, None
    t_start = time.perf_counter()
    try:
        for label, run_dir in run_dirs.items():
            bar.set_postfix_str(str(label))
            run = load_run(run_dir, checkpoint, device=device)
            if isinstance(images, torch.Tensor):
                imgs = images
            else:
                imgs = _test_images(run.config, images, seed, splits_cache, data_dir)
            if imgs.dtype != torch.uint8 or imgs.dim() != 4:
                raise ValueError(f"images must be uint8 (N, C, H, W), got {imgs.dtype} {tuple(imgs.shape)}")
            if shown_inputs is None:
                first_images, shown_inputs, n_images = imgs, imgs[:show_images], int(imgs.shape[0])
            elif not torch.equal(imgs, first_images):  # the table compares methods on one image set
                raise ValueError(f"run {label!r} evaluates on other test images than {next(iter(run_dirs))!r} "
                                 "(another dataset or split); compare runs of one dataset, or pass images=")
            methods[label], rows = _measure_run(run, imgs, seed=seed, bit_rates=bit_rates, sub_rates=sub_rates,
                                                shown_rates=shown_rates, show_images=show_images,
                                                batch_size=batch_size, on_decode=lambda: bar.update(1))
            methods[label] = {"run_dir": str(run_dir), "checkpoint": run.checkpoint, "step": run.step,
                              **methods[label]}
            image_rows += [(label, *r) for r in rows]
            del run
    finally:
        bar.close()
    data = {"images": n_images,
            "seed": int(seed), "checkpoint": checkpoint, "bit_rates": bit_rates, "sub_rates": sub_rates,
            "image_rates": shown_rates, "seconds": round(time.perf_counter() - t_start, 1),
            "command": command, "methods": methods,
            "notes": {"mse": "normalised space; psnr over all pixels in [0, 255] after denormalize (clamped)",
                      "doubling": "first crossing of 2 x clean MSE, interpolated in (log rate, log MSE)",
                      "out_of_range": "field value v >= s is read as 2 (s - 1) - v (mirrored at the last valid value)",
                      "random_numbers": "one generator per (stream, rate index) from the seed, shared by all methods"}}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "channel.json", data)
    table = results_markdown(data)
    atomic_write_text(out_dir / "results.md", table)
    written = []
    fig = figures.channel_curves_figure(
        [("bit errors", "bit error rate p", _curves(methods, "bits", ASSIGNMENTS))],
        path=out_dir / "channel_bits.png")
    plt.close(fig)
    written.append(out_dir / "channel_bits.png")
    fig = figures.channel_curves_figure(
        [("random code", "substitution rate q", _curves(methods, "substitution", ("random",))),
         ("random neighbour", "substitution rate q", _curves(methods, "substitution", ("neighbor-grid", "neighbor-path")))],
        path=out_dir / "channel_substitution.png")
    plt.close(fig)
    written.append(out_dir / "channel_substitution.png")
    fig = figures.channel_images_figure(_image_table(image_rows, shown_rates), shown_inputs,
                                        [f"p = {_fmt_rate(r)}" for r in shown_rates], path=out_dir / "channel_images.png")
    plt.close(fig)
    written.append(out_dir / "channel_images.png")
    log(f"channel: {len(methods)} methods in {data['seconds']:.0f} s -> {out_dir}")
    return {"data": data, "table": table, "json": out_dir / "channel.json", "results": out_dir / "results.md",
            "figures": written}


def _measure_run(run, imgs: torch.Tensor, *, seed, bit_rates, sub_rates, shown_rates, show_images, batch_size,
                 on_decode) -> tuple[dict, list]:
    """One run of :func:`channel_experiment`: ``(numbers, image rows)``; the rows are ``(assignment, rate,
    decodings of the first show_images images, normalizer)``, rate 0 for the clean reconstruction."""
    model, normalizer = run.model, run.normalizer
    dev = next(model.parameters()).device
    with torch.no_grad():
        x = torch.cat([normalizer.normalize(imgs[s:s + batch_size].to(dev)) for s in range(0, len(imgs), batch_size)])
        clean_idx = model.encode(x, batch_size=batch_size)
        del x

    def decode(indices):
        on_decode()
        with torch.no_grad():
            return model.decode_indices(indices, batch_size=batch_size)

    clean_dec = decode(clean_idx)
    clean = reconstruction_errors(clean_dec, imgs, normalizer)
    tokens = sum(c.numel() for c in clean_idx)

    def point(rate, indices):
        dec = decode(indices)
        changed = sum(int((i != c).sum()) for i, c in zip(indices, clean_idx))
        return dec, {"rate": rate, **reconstruction_errors(dec, imgs, normalizer), "token_error_rate": changed / tokens}

    quantizers = list(model.quantizers)
    per_level = [assignments_for(q) for q in quantizers]
    for level in per_level:  # a guard: every assignment must be a bijection (rate 0 = the clean tokens)
        for a in level.values():
            k = torch.arange(a.size)
            if not torch.equal(a.decode(a.encode(k)), k):
                raise AssertionError(f"assignment {a!r} is not a bijection")
    own = "gray-grid" if grid_is_organised(quantizers[-1]) else "path"  # shown in channel_images.png with binary
    rows = [("clean", 0.0, clean_dec[:show_images].cpu(), normalizer)]
    bits = {}
    for name in ASSIGNMENTS:
        points = []
        for ri, p in enumerate(bit_rates):
            gen = _generator(seed, "bits", ri)
            dec, pt = point(p, [flip_bits(idx, lv[name], p, gen) for idx, lv in zip(clean_idx, per_level)])
            points.append(pt)
            if p in shown_rates and name in ("binary", own):
                rows.append((name, p, dec[:show_images].cpu(), normalizer))
        bits[name] = {"bits_per_token": [lv[name].bits for lv in per_level], "points": points,
                      "doubling": doubling_rate(bit_rates, [pt["mse"] for pt in points], clean["mse"])}
    subs = {}
    for name in SUBSTITUTIONS:
        points = []
        for ri, q in enumerate(sub_rates):
            gen = _generator(seed, "random" if name == "random" else "neighbor", ri)
            corrupted = []
            for idx, qz, lv in zip(clean_idx, quantizers, per_level):
                if name == "random":
                    corrupted.append(substitute_random(idx, qz.codebook_size, q, gen))
                elif name == "neighbor-grid":
                    corrupted.append(substitute_neighbor(idx, qz.grid, q, gen))
                else:
                    corrupted.append(substitute_neighbor(idx, Grid((qz.codebook_size,)), q, gen, order=lv["path"].order))
            points.append(point(q, corrupted)[1])
        subs[name] = {"points": points,
                      "doubling": doubling_rate(sub_rates, [pt["mse"] for pt in points], clean["mse"])}
    codes = [q.codebook.detach().double().cpu() for q in quantizers]
    numbers = {
        "codebook_size": [q.codebook_size for q in quantizers],
        "grid": [_describe_grid(q) for q in quantizers],
        "used_codes": [int(torch.unique(c).numel()) for c in clean_idx],
        "path_length": [{"path": path_length(c, lv["path"].order), "index_order": path_length(c, torch.arange(c.shape[0]))}
                        for c, lv in zip(codes, per_level)],
        "clean": clean, "bits": bits, "substitution": subs,
    }
    return numbers, rows


def _curves(methods: dict, kind: str, names: Sequence[str]) -> list:
    out = []
    for label, m in methods.items():
        for name in names:
            series = m[kind][name]
            marked = name in ("gray-grid", "neighbor-grid") and not m["grid"][-1]["organised"]
            out.append({"method": label, "variant": name + (" (index order)" if marked else ""),
                        "style": name, "rates": [pt["rate"] for pt in series["points"]],
                        "mse": [pt["mse"] for pt in series["points"]], "clean_mse": m["clean"]["mse"]})
    return out


def _image_table(rows, rates) -> list:
    """``[(row label, [decodings per column: clean, then each shown rate])]`` from the collected decodings."""
    clean = {label: (dec, norm) for label, name, _, dec, norm in rows if name == "clean"}
    grouped: dict = {}
    for label, name, rate, dec, norm in rows:
        if name != "clean":
            grouped.setdefault((label, name), {})[rate] = dec
    out = []
    for (label, name), by_rate in grouped.items():
        dec0, norm = clean[label]
        out.append((f"{label}\n{name}", [dec0] + [by_rate[r] for r in rates], norm))
    return out


# ------------------------------------------------------------------------------------------- results.md
def results_markdown(data: dict) -> str:
    """The tables of ``channel.json``: the error rate at which MSE doubles per method x assignment (bit errors)
    and substitution, and the PSNR at the bit error rates of channel_images.png."""
    lines = ["# When tokens are wrong: reconstruction under channel errors and token substitutions", ""]
    if data.get("command"):
        lines += [f"Command: `{data['command']}`", ""]
    lines += [(f"{data['images']} test images, seed {data['seed']}, checkpoint `{data['checkpoint']}`; bit error "
               f"rates p in {', '.join(_fmt_rate(r) for r in data['bit_rates'])}; substitution rates q in "
               f"{', '.join(_fmt_rate(r) for r in data['sub_rates'])}. MSE in normalised space (the training loss' "
               "units), PSNR over all pixels in [0, 255]."), "",
              "## Error rate at which the reconstruction MSE doubles", "",
              ("Higher is better: the channel bit error rate p (per transmitted bit) or the fraction q of substituted "
               "tokens at which MSE first reaches twice the clean MSE, interpolated in (log rate, log MSE) between "
               "measured points; `> max` if it never does, `< min` if it already does at the smallest rate."), ""]
    head = ["method", "grid", "bits / token", "clean MSE x10^3", "clean PSNR dB"] + \
           [f"bits: {a}" for a in ASSIGNMENTS] + ["random code", "grid neighbour", "path neighbour"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    any_index_order = False
    for label, m in data["methods"].items():
        organised = m["grid"][-1]["organised"]
        any_index_order |= not organised
        star = "" if organised else "*"
        bits = "/".join(str(b) for b in m["bits"]["binary"]["bits_per_token"])
        cells = [label, " / ".join(g["text"] for g in m["grid"]), bits, f"{1000 * m['clean']['mse']:.1f}",
                 f"{m['clean']['psnr']:.2f}"]
        cells += [m["bits"][a]["doubling"]["text"] + (star if a == "gray-grid" else "") for a in ASSIGNMENTS]
        cells += [m["substitution"]["random"]["doubling"]["text"],
                  m["substitution"]["neighbor-grid"]["doubling"]["text"] + star,
                  m["substitution"]["neighbor-path"]["doubling"]["text"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if any_index_order:
        lines += [("\\* on a grid that only lays out the index order (no topology was trained): a reference, not "
                   "an assignment that method offers."), ""]
    lines += ["Bits per token differ between assignments only when a field size is not a power of two "
              "(here: " + ", ".join(sorted({f"{a} {'/'.join(map(str, m['bits'][a]['bits_per_token']))}"
                                            for m in data["methods"].values() for a in ASSIGNMENTS})) + ").", ""]
    rates = data["image_rates"]
    lines += ["## PSNR (dB) under bit errors", "",
              "| method | assignment | clean | " + " | ".join(f"p = {_fmt_rate(r)}" for r in rates) + " |",
              "|---|---|---|" + "---|" * len(rates)]
    for label, m in data["methods"].items():
        for a in ASSIGNMENTS:
            by_rate = {pt["rate"]: pt for pt in m["bits"][a]["points"]}
            marked = a == "gray-grid" and not m["grid"][-1]["organised"]
            lines.append(f"| {label} | {a}{'*' if marked else ''} | {m['clean']['psnr']:.2f} | "
                         + " | ".join(f"{by_rate[r]['psnr']:.2f}" for r in rates) + " |")
    lines += ["", ("Figures: `channel_bits.png`, `channel_substitution.png` (MSE against the rate, and MSE "
                   "relative to clean), `channel_images.png` (decodings at the bit error rates above). All numbers: "
                   "`channel.json`."), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- on the field runs
def field_run_dirs(out_dir="runs/reproduce", scale: str = "cpu", seed: int = 0) -> dict:
    """``{label: run_dir}`` of the finished runs of seed ``seed`` of ``kohonen-vae reproduce field`` under
    ``out_dir`` (in the experiment's variant order; unfinished variants are left out)."""
    from .reproduce import EXPERIMENTS, experiment_dir, run_finished

    root = experiment_dir(out_dir, "field", scale)
    found = {}
    for v in EXPERIMENTS["field"].variants:
        d = root / v.slug / f"seed{seed}"
        if run_finished(d):
            found[v.label] = d
    return found


def channel_from_field(out_dir="runs/reproduce", scale: str = "cpu", seed: int = 0, command: str | None = None,
                       log=print, **options) -> dict:
    """:func:`channel_experiment` on the finished field runs of one seed (:func:`field_run_dirs`), written to
    ``OUT/channel`` (``OUT/channel-SCALE`` at other scales than cpu). ``options`` go to the experiment."""
    from .reproduce import experiment_dir

    runs = field_run_dirs(out_dir, scale, seed)
    if not runs:
        from .errors import ConfigError

        raise ConfigError(f"no finished field runs of seed {seed} under {experiment_dir(out_dir, 'field', scale)}; "
                          f"train them first: kohonen-vae reproduce field --scale {scale}")
    log(f"channel: {len(runs)} field runs (seed {seed}): {', '.join(runs)}")
    command = command or f"kohonen-vae reproduce channel --scale {scale}"
    return channel_experiment(runs, experiment_dir(out_dir, "channel", scale), command=command, log=log, **options)


def load_results(out_dir) -> dict:
    """The ``channel.json`` written by :func:`channel_experiment` in ``out_dir``."""
    return json.loads((Path(out_dir) / "channel.json").read_text())
