"""What every quantiser shares: input layout, nearest-code assignment, straight-through output, telemetry.

The call convention follows vector-quantize-pytorch's ``VectorQuantize``::

    quantized, indices, loss = vq(x)       # x: (..., dim), or (B, dim, H, W) with accept_image_fmap=True

``indices`` has the input's spatial shape, ``loss`` is already weighted, and the returned tuple also
carries ``.perplexity``, ``.used_codes`` and ``.counts`` of the batch.

Contracts shared by every quantiser:

* An empty batch (N = 0) returns empty outputs and a zero loss, and changes nothing (no decay of the
  statistics, no step). Under data parallelism the rank still joins the step's collective.
* A training batch whose statistics are not finite in float32 (NaN, Inf, or values so large that squared
  distances overflow, e.g. 1e30) raises :class:`NonFiniteInputError` before any buffer is touched.
* The state holds the geometry (grid and neighbourhood) as a ``geometry`` buffer: loading the state of a
  map with another geometry raises :class:`GeometryMismatchError`; older states without it still load.
* ``device="meta"``: building and eval-mode forwards (shape inference) work; a training forward raises a
  ``ValueError`` (an update needs values).
* ``torch.compile``: the eval forward compiles with ``fullgraph=True``. A training forward of a quantiser
  with a host-side update (KSOM/EMA statistics, GDSOM's step-dependent kernel, k-means initialisation,
  dead-code restarts) has exactly one graph break, the update, which runs eagerly: it reads values on the
  host (finiteness check, the kernel's schedule at step t, which codes are dead), may call a
  torch.distributed collective and writes buffers in place. ``torch.compile(..., fullgraph=True)`` of such
  a training forward therefore fails with dynamo's ``Unsupported`` error, whose message carries
  :data:`COMPILE_TRAINING_REASON`; compile it without ``fullgraph`` (everything else is compiled) or
  compile only the eval forward with ``fullgraph=True``.
"""
from __future__ import annotations

import contextlib
import json
import math

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn

from ..errors import GeometryMismatchError, NonFiniteInputError  # noqa: F401 (raised here, re-exported)
from ..geometry import as_grid, as_size
from ..neighborhood import finite_number

#: why a training forward cannot be compiled with fullgraph=True (shown in dynamo's error message)
COMPILE_TRAINING_REASON = (
    "kohonen_vae: the quantiser's training update runs eagerly (host-side finiteness check, the kernel "
    "schedule at step t, dead-code/k-means choices, a torch.distributed all-reduce, in-place buffer "
    "writes); compile the training forward without fullgraph=True (one graph break), or compile the eval "
    "forward with fullgraph=True"
)

#: the N x K distance matrix is computed in row chunks of at most this many elements (64 MiB in float32)
DISTANCE_CHUNK_ELEMENTS = 1 << 24
#: on a CPU, rows go in blocks of about this many distances (4 MiB, within the L3 cache) written into one
#: reused buffer: a fresh N x K result is a fresh allocation whose page faults cost as much as the GEMM
#: itself; with the reused block the assignment is 1.5-1.9x faster at 1 and 2 threads (docs/performance.md)
CPU_BLOCK_ELEMENTS = 1 << 20
#: fewest rows per block (keeps the GEMM efficient for very large K)
CPU_BLOCK_MIN_ROWS = 64
#: on a CPU, the argmin over K >= 4 * ARGMIN_BLOCK codes first takes the minimum of every block of this many
#: codes with a vectorised ``amin``, then the argmin among the block minima and within the best block (the
#: same index as ``argmin``; the whole assignment 1.12-1.35x faster at K = 512-4,096, 1 and 2 threads:
#: benchmarks/ab_blocked_argmin.py, benchmarks/results/ab-blocked-argmin.md)
ARGMIN_BLOCK = 64


class QuantizerOutput(tuple):
    """``(quantized, indices, loss)`` that also carries the batch's telemetry as attributes.

    Attributes:
        perplexity: exp(-sum_k p_k log(p_k + 1e-10)), p_k the share of the batch's vectors assigned to k.
        used_codes: number of codes with at least one vector assigned in this batch.
        counts: ``(K,)`` float32 assignment counts of the batch.
    """

    def __new__(cls, quantized, indices, loss, counts):
        self = super().__new__(cls, (quantized, indices, loss))
        self.counts = counts
        return self

    @property
    def quantized(self) -> torch.Tensor:
        return self[0]

    @property
    def indices(self) -> torch.Tensor:
        return self[1]

    @property
    def loss(self) -> torch.Tensor:
        return self[2]

    @property
    def perplexity(self) -> torch.Tensor:
        return perplexity_from_counts(self.counts)

    @property
    def used_codes(self) -> torch.Tensor:
        return (self.counts > 0).sum()


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(-sum_k p_k log(p_k + 1e-10)) with p = counts / sum(counts): K for uniform use, 1 for one code."""
    p = counts.float() / counts.float().sum().clamp(min=1e-12)
    return torch.exp(-(p * torch.log(p + 1e-10)).sum())


#: device types that have an autocast mode (others, e.g. ``meta``, reject ``torch.autocast``)
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")


def autocast_disabled(device: torch.device):
    """A context that turns autocast off on ``device``: inside a bf16/fp16 autocast region, distances and
    codebook statistics are still computed in float32 (autocast would run ``addmm``/``mm`` in bf16)."""
    if device.type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor, chunk_elements: int | None = None) -> torch.Tensor:
    """k*(n) = argmin_k ||z_n - e_k||^2 = argmin_k (||e_k||^2 - 2 z_n . e_k), in float32.

    The ``N x K`` distance matrix is never allocated whole: rows go in blocks of at most ``chunk_elements``
    distances (default: see :func:`distance_block_rows`), on a CPU all written into one reused buffer and, for
    K >= 4 * :data:`ARGMIN_BLOCK`, reduced by a blocked argmin (:func:`_blocked_argmin_codes`; the same
    indices). Autocast is off inside: the distances are float32 even in a bf16/fp16 autocast region.
    """
    with torch.no_grad(), autocast_disabled(vectors.device):
        z = vectors.detach().float()
        e = codebook.detach().float()
        e_sq = e.square().sum(1)
        n, k = z.shape[0], e.shape[0]
        cpu_blocks = z.device.type == "cpu" and not torch.compiler.is_compiling()
        if cpu_blocks and k >= 4 * ARGMIN_BLOCK:
            return _blocked_argmin_codes(z, e, e_sq, chunk_elements)
        rows = distance_block_rows(n, k, chunk_elements, cpu_blocks)
        if rows >= n:
            return torch.addmm(e_sq, z, e.t(), alpha=-2.0).argmin(1)
        out = torch.empty(n, dtype=torch.long, device=z.device)
        if not cpu_blocks:  # the compiler / the GPU caching allocator manage the chunks' memory
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                out[start:stop] = torch.addmm(e_sq, z[start:stop], e.t(), alpha=-2.0).argmin(1)
            return out
        block = torch.empty(rows, k, dtype=torch.float32, device=z.device)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            distances = block[: stop - start]
            torch.addmm(e_sq, z[start:stop], e.t(), alpha=-2.0, out=distances)
            torch.argmin(distances, 1, out=out[start:stop])
        return out


def _blocked_argmin_codes(z: torch.Tensor, e: torch.Tensor, e_sq: torch.Tensor, chunk_elements: int | None) -> torch.Tensor:
    """The CPU block loop of :func:`nearest_codes` for K >= 4 B, B = :data:`ARGMIN_BLOCK`: the codebook is
    padded to a multiple of B codes with ``||e||^2 = +inf`` (never chosen), every block of B distances of a
    row is reduced by ``amin``, and ``k* = B b* + argmin(block b*)`` with ``b*`` the first block holding the
    row's minimum: the first index on ties, as ``argmin``."""
    b = ARGMIN_BLOCK
    n, k = z.shape[0], e.shape[0]
    blocks = -(-k // b)
    padded = blocks * b
    e_sq = torch.cat([e_sq, torch.full((padded - k,), math.inf, device=e.device)])
    e_t = torch.cat([e, e.new_zeros(padded - k, e.shape[1])]).t()
    rows = min(distance_block_rows(n, padded, chunk_elements), n)
    out = torch.empty(n, dtype=torch.long, device=z.device)
    block = torch.empty(rows, padded, dtype=torch.float32, device=z.device)
    index = torch.arange(rows, device=z.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        grouped = torch.addmm(e_sq, z[start:stop], e_t, alpha=-2.0, out=block[: stop - start]).view(stop - start, blocks, b)
        best_block = grouped.amin(2).argmin(1)
        out[start:stop] = best_block * b + grouped[index[: stop - start], best_block].argmin(1)
    return out


def distance_block_rows(n: int, k: int, chunk_elements: int | None = None, cpu_blocks: bool = True) -> int:
    """Rows of the distance matrix computed at once by :func:`nearest_codes`.

    An explicit ``chunk_elements`` is a hard bound: ``max(1, chunk_elements // k)`` rows. By default a CPU
    block has ``CPU_BLOCK_ELEMENTS // k`` rows but at least ``CPU_BLOCK_MIN_ROWS`` (so that the GEMM stays
    efficient at large K) as long as that stays within ``DISTANCE_CHUNK_ELEMENTS``; elsewhere
    ``DISTANCE_CHUNK_ELEMENTS // k`` rows.
    """
    k = max(int(k), 1)
    if chunk_elements is not None:
        return max(1, int(chunk_elements) // k)
    if not cpu_blocks:
        return max(1, DISTANCE_CHUNK_ELEMENTS // k)
    return max(1, CPU_BLOCK_ELEMENTS // k, min(CPU_BLOCK_MIN_ROWS, n, DISTANCE_CHUNK_ELEMENTS // k))


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """c_k = #{n : k*(n) = k}, ``(K,)`` float32. Under torch.compile (and on the meta device) an integer
    scatter-add (a static output shape) replaces ``bincount``, whose data-dependent shape would break the
    graph; both are exact."""
    if torch.compiler.is_compiling() or indices.device.type == "meta":
        ones = torch.ones_like(indices)
        return torch.zeros(codebook_size, dtype=indices.dtype, device=indices.device).scatter_add_(0, indices, ones).float()
    return torch.bincount(indices, minlength=codebook_size).float()


class _StraightThrough(torch.autograd.Function):
    """Value ``q`` (a fresh copy: one (N, D) pass), gradient and forward-mode tangent to ``z`` the identity."""

    generate_vmap_rule = True  # torch.func transforms (vmap, grad, jacrev) work through it

    @staticmethod
    def forward(z, q):
        # a fresh tensor, not a view of q: callers may modify the output in place (ReLU(inplace=True),
        # x += pos_emb) while the commitment loss still holds q for its backward
        return q.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None

    @staticmethod
    def jvp(ctx, z_tangent, q_tangent):
        return z_tangent


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The straight-through estimator z + sg(q - z) for a ``q`` that carries no gradient of its own: its
    value is exactly ``q`` and the gradient to ``z`` is the identity.

    Eagerly an autograd function returns a copy of ``q`` (one (N, D) pass instead of the arithmetic form's
    two, docs/performance.md); under ``torch.compile`` the arithmetic form ``q + (z - sg(z))``, which the
    compiler fuses, keeps compiled and eager runs equal (the autograd function inside a compiled graph
    drifted from eager). Without a gradient to carry it is just ``q``.
    """
    carries_gradient = torch.is_grad_enabled() and z.requires_grad
    if torch.compiler.is_compiling():
        return q + (z - z.detach()) if carries_gradient else q
    if carries_gradient or forward_ad.unpack_dual(z).tangent is not None:  # forward-mode AD: a dual z
        return _StraightThrough.apply(z, q)
    return q


def batch_statistics(z: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Packed raw statistics ``(K, 1 + D)``: column 0 the counts c_k, then the sums S_k = sum_{k*(n)=k} z_n,
    in float32 whatever the input dtype."""
    # sums into a contiguous (K, D) buffer, then one small (K, 1 + D) copy: index_add_ straight into the
    # strided column block of the packed tensor was slower (docs/performance.md, "optimisations")
    sums = torch.zeros(counts.shape[0], z.shape[1], dtype=torch.float32, device=z.device)
    sums.index_add_(0, indices, z.detach().float())
    return torch.cat([counts.float().unsqueeze(1), sums], 1)


def check_finite(stats: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteInputError` if ``stats`` holds NaN or Inf."""
    if not bool(torch.isfinite(stats).all()):
        raise NonFiniteInputError(
            f"{what} contains NaN or Inf; the codebook and its statistics were left unchanged. "
            "Check the encoder output (learning rate, loss scaling, data normalisation)."
        )


def check_statistics(square_sum, stats: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteInputError` unless ``square_sum`` (``sum(stats ** 2)``, computed by the caller
    in float32) is finite: that one number is finite iff every entry is finite *and* no squared entry
    overflows float32 (|value| < ~1.8e19), i.e. the distances to codes built from these statistics stay
    finite. NaN/Inf and overflow get different messages."""
    if torch.isfinite(torch.as_tensor(square_sum)):
        return
    check_finite(stats, what)
    raise NonFiniteInputError(
        f"{what} has values too large for float32 statistics (squared distances overflow; |z| must stay "
        "well below 1e19); the codebook and its statistics were left unchanged. Check the encoder output "
        "(learning rate, loss scaling, data normalisation)."
    )


def _encode_geometry(description: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(description, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def _decode_geometry(tensor: torch.Tensor) -> dict:
    try:
        return json.loads(bytes(tensor.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {"unreadable": True}


class VectorQuantizerBase(nn.Module):
    """Shared forward of all quantisers; subclasses register ``codebook`` ``(K, dim)`` (a buffer or a
    parameter) and provide two hooks:

    * ``_loss(z, q, indices, counts)``: the weighted training loss (commitment, codebook, SOM terms);
    * ``_update(z, indices, counts)``: the codebook update of a training forward (EMA/KSOM statistics).

    ``z`` is the flattened ``(N, dim)`` input; ``q = codebook[indices]`` in float32. See the module
    docstring for the contracts (empty batch, overflow, geometry in the state, meta device, compile).
    """

    def __init__(self, dim: int, codebook_size: int, grid_shape=None, grid_dims: int = 2, *,
                 commitment_weight: float = 0.25, accept_image_fmap: bool = False,
                 periodic: bool = False, topology: str = "rectangular"):
        super().__init__()
        self.dim = as_size(dim, "dim")
        self.codebook_size = as_size(codebook_size, "codebook_size")
        commitment_weight = finite_number(commitment_weight, "commitment_weight")
        if commitment_weight < 0:
            raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight}")
        self.grid = as_grid(grid_shape, self.codebook_size, as_size(grid_dims, "grid_dims"), periodic=periodic,
                            topology=topology)
        self.commitment_weight = commitment_weight
        self.accept_image_fmap = bool(accept_image_fmap)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("geometry", _encode_geometry(self.geometry_description()))
        self.register_load_state_dict_pre_hook(_check_state_geometry)

    # -- geometry in the state ----------------------------------------------------------------------
    def geometry_description(self) -> dict:
        """Plain data that must match for a state to be loadable: the grid (and, in subclasses, the
        neighbourhood). Stored as the ``geometry`` buffer (UTF-8 JSON bytes)."""
        return {"grid": self.grid.to_dict()}

    def _refresh_geometry(self) -> None:
        """Re-encode the ``geometry`` buffer (subclasses call it once their neighbourhood exists)."""
        self.geometry = _encode_geometry(self.geometry_description()).to(self.geometry.device)

    def _fill_missing_state(self, state_dict: dict, prefix: str) -> None:
        """Hook for subclasses: add entries that older states lack (called before loading)."""

    # -- layout ----------------------------------------------------------------------------------
    def _to_vectors(self, x: torch.Tensor):
        """(N, dim) view of the input and the spatial shape to give back to the outputs."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point tensor, got dtype {x.dtype}")
        if self.accept_image_fmap:
            if x.dim() != 4 or x.shape[1] != self.dim:
                raise ValueError(
                    f"expected an image feature map of shape (batch, {self.dim}, height, width) "
                    f"(accept_image_fmap=True), got {tuple(x.shape)}"
                )
            spatial = (x.shape[0],) + tuple(x.shape[2:])
            return x.permute(0, 2, 3, 1).reshape(-1, self.dim), spatial
        if x.dim() < 1 or x.shape[-1] != self.dim:
            hint = " (for (B, C, H, W) feature maps pass accept_image_fmap=True)" if x.dim() == 4 and x.shape[1] == self.dim else ""
            raise ValueError(f"expected input of shape (..., {self.dim}) (channel last), got {tuple(x.shape)}{hint}")
        return x.reshape(-1, self.dim), tuple(x.shape[:-1])

    def _from_vectors(self, flat: torch.Tensor, spatial) -> torch.Tensor:
        if self.accept_image_fmap:
            b, h, w = spatial
            return flat.reshape(b, h, w, self.dim).permute(0, 3, 1, 2)
        return flat.reshape(tuple(spatial) + (self.dim,))

    # -- codes -----------------------------------------------------------------------------------
    def assignment_space(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors (N, d'), codes (K, d'))`` in which the forward's index is the nearest code of each of
        the flattened inputs ``z`` (N, dim): here ``(z, codebook)``. Used by the metrics (quantisation and
        topographic error) so that they measure every quantiser in the space where it assigns."""
        return z, self.codebook

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The quantised output for ``indices``, in the layout the forward returns (vector-quantize-pytorch's
        name): ``(..., dim)`` for ``(...)`` indices, ``(B, dim, H, W)`` for ``(B, H, W)`` with
        ``accept_image_fmap=True``. For these quantisers the output is the code vector, so this equals
        :meth:`get_codes_from_indices`."""
        return self.get_codes_from_indices(indices)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors ``(..., dim)`` of indices ``(...)``; ``(B, dim, H, W)`` for ``(B, H, W)`` indices
        when ``accept_image_fmap=True``."""
        indices = torch.as_tensor(indices, device=self.codebook.device)
        if indices.dtype not in (torch.long, torch.int, torch.int32, torch.int64, torch.int16, torch.uint8):
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        codes = F.embedding(indices.long(), self.codebook)
        if self.accept_image_fmap and indices.dim() == 3:
            return codes.permute(0, 3, 1, 2)
        return codes

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        z, spatial = self._to_vectors(x)
        if self.training:
            if z.device.type == "meta":
                raise ValueError(f"{type(self).__name__} cannot train on the 'meta' device: a training forward "
                                 "updates the codebook from the values of the batch, and meta tensors have none "
                                 "(use a real device, or eval mode for shape inference)")
            if self.kmeans_init:  # a plain attribute: without k-means the compiled graph has no call here
                self._before_assignment(z)
        indices = nearest_codes(z, self.codebook)
        counts = code_counts(indices, self.codebook_size)
        q = F.embedding(indices, self.codebook)  # looked up before this step's update
        # an empty batch: a zero loss that still depends on z (no NaN from a mean over nothing)
        loss = self._loss(z, q, indices, counts) if z.shape[0] > 0 else z.float().sum() * 0.0
        if self.training:
            self._update(z, indices, counts)
        out = straight_through(z, q.detach().to(z.dtype))
        return QuantizerOutput(self._from_vectors(out, spatial), indices.reshape(spatial), loss, counts)

    #: k-means initialisation pending at the first training forward (see quantizers.collapse)
    kmeans_init = False

    def _before_assignment(self, z) -> None:
        """Training-mode hook before the assignment, called when ``kmeans_init`` is set."""

    def _loss(self, z, q, indices, counts) -> torch.Tensor:
        raise NotImplementedError

    def _update(self, z, indices, counts) -> None:
        pass

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, grid={self.grid!r}"


def _check_state_geometry(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs) -> None:
    """Load pre-hook: refuse a state saved with another geometry; let older states (without one) load."""
    module._fill_missing_state(state_dict, prefix)
    key = prefix + "geometry"
    if key not in state_dict:
        state_dict[key] = module.geometry.detach().clone()  # a state from before the geometry was stored
        return
    saved, mine = _decode_geometry(state_dict[key]), _decode_geometry(module.geometry)
    if saved != mine:
        differing = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        detail = "; ".join(f"{k}: saved {json.dumps(saved.get(k))}, this one {json.dumps(mine.get(k))}" for k in differing)
        raise GeometryMismatchError(
            f"cannot load the state of {prefix.rstrip('.') or type(module).__name__}: it comes from a quantiser "
            f"with another geometry ({detail}); build the quantiser with the saved geometry (e.g. from the "
            "run's config.json) before loading")

