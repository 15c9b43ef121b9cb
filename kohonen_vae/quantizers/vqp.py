"""vector-quantize-pytorch's quantisers behind this package's interface (the optional ``field`` extra).

``VQPQuantizer(dim, codebook_size, cls="VectorQuantize", options={...})`` builds
``vector_quantize_pytorch.<cls>`` and makes it a drop-in quantiser of this package: its forward returns a
:class:`~kohonen_vae.quantizers.base.QuantizerOutput` (``quantized, indices, loss`` plus the batch's
``counts``, hence ``perplexity`` and ``used_codes``), inputs are channel-last ``(..., dim)`` or
``(B, dim, H, W)`` with ``accept_image_fmap=True``, and it has a ``codebook``, a ``grid``,
``get_codes_from_indices``/``get_output_from_indices`` and ``assignment_space`` for the metrics.

=================  ==============================================================================================
``cls``            what ``codebook`` (K, dim) and ``grid`` are
=================  ==============================================================================================
``VectorQuantize`` its codes mapped to the output space (``project_out(embed)``; the identity without
                   ``codebook_dim``). No topology is trained: ``grid`` lays the index order out like EMA-VQ's
                   (``grid_shape``/``grid_dims``), so the topology metrics give the unorganised reference.
``FSQ``            the implied lattice codes ``project_out(codes of every index)``; ``grid`` is the level lattice
                   ``Grid(levels)``: FSQ's index is mixed radix with the first level fastest, which is this
                   package's index <-> coordinates convention, so grid neighbours differ by one level in one
                   dimension. ``codebook_size`` is ``prod(levels)`` (give None or that number).
``SimVQ``          the effective codes ``code_transform(frozen_codebook)``; ``grid`` as for VectorQuantize.
=================  ==============================================================================================

Differences from calling vector-quantize-pytorch directly: ``get_codes_from_indices`` returns the codes in
the output space (what the decoder receives), as this package's quantisers do, not its codebook space;
``VectorQuantize``'s ``sync_codebook`` (unless given) is decided at every training forward, not when the
module is built, so a model built before ``init_process_group`` still syncs its EMA statistics (the
library's own default decides once, at construction); ``heads`` > 1, ``num_codebooks`` > 1 and its own
layout flags (``accept_image_fmap``, ``channel_last``, ``channel_first``) are refused (this wrapper owns the
layout). Everything it holds is in ``state_dict`` (the wrapped module's parameters and buffers, the step
and the geometry).

Without vector-quantize-pytorch, building one raises ``kohonen_vae.errors.MissingDependencyError`` (an
``ImportError``; the command line prints it as one ``error:`` line with exit code 2).
"""
from __future__ import annotations

import math

import torch

from .. import distributed
from ..geometry import Grid, as_size
from .base import QuantizerOutput, VectorQuantizerBase, code_counts

#: the wrapped classes (each needs its own adapter for indices, codes and the assignment space)
VQP_CLASSES = ("VectorQuantize", "FSQ", "SimVQ")
#: layout options of the wrapped classes that this wrapper owns
_LAYOUT_OPTIONS = ("accept_image_fmap", "accept_3d_fmap", "channel_last", "channel_first")
INSTALL_HINT = "pip install 'kohonen-vae[field]'"


def import_vqp():
    """The ``vector_quantize_pytorch`` module, or ``MissingDependencyError`` with the install command."""
    try:
        import vector_quantize_pytorch
    except ImportError as e:
        from ..errors import MissingDependencyError  # here, not at import time: errors imports this package

        raise MissingDependencyError(
            f"quantizer type 'vqp' needs vector-quantize-pytorch: {INSTALL_HINT}") from e
    return vector_quantize_pytorch


class VQPQuantizer(VectorQuantizerBase):
    """A vector-quantize-pytorch quantiser by class name (see the module docstring).

    Args:
        dim: vector size D of the inputs and outputs.
        codebook_size: K (VectorQuantize, SimVQ); for FSQ None or ``prod(levels)``.
        cls: ``"VectorQuantize"``, ``"FSQ"`` or ``"SimVQ"``.
        accept_image_fmap: inputs are (B, dim, H, W) instead of channel-last (..., dim).
        options: keyword arguments of the wrapped class (plain data, e.g. from a config:
            ``{"levels": [8, 8, 8]}`` for FSQ, ``{"rotation_trick": False, "decay": 0.99}`` for
            VectorQuantize); ``**kwargs`` are merged into them.
        grid_shape, grid_dims, periodic, topology: the grid of VectorQuantize/SimVQ indices (as EMA-VQ's);
            FSQ's grid is its level lattice.

    The loss is the wrapped module's (commitment and codebook terms with its own weights; 0 for FSQ).
    """

    def __init__(self, dim: int, codebook_size: int | None = None, cls: str = "VectorQuantize",
                 accept_image_fmap: bool = False, options: dict | None = None, grid_shape=None,
                 grid_dims: int = 2, *, periodic: bool = False, topology: str = "rectangular", **kwargs):
        if cls not in VQP_CLASSES:
            raise ValueError(f"unknown vector-quantize-pytorch class {cls!r}; choose one of {VQP_CLASSES}")
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"options must be a dict of keyword arguments for {cls}, got {options!r}")
        opts = {**(options or {}), **kwargs}
        layout = sorted(set(opts) & set(_LAYOUT_OPTIONS))
        if layout:
            raise ValueError(f"{cls} option {layout[0]!r} is set by the wrapper; use VQPQuantizer(accept_image_fmap=...)")
        for key in ("dim", "codebook_size"):
            if key in opts:
                raise ValueError(f"pass {key} as VQPQuantizer's own argument, not in options")
        vqp = import_vqp()
        dim = as_size(dim, "dim")
        if cls == "FSQ":
            levels = opts.get("levels")
            if not isinstance(levels, (list, tuple)) or not levels:
                raise ValueError("FSQ needs options={'levels': [...]} (e.g. [8, 8, 8] for 512 codes)")
            levels = [as_size(v, "FSQ level", minimum=2) for v in levels]
            implied = math.prod(levels)
            if codebook_size is not None and as_size(codebook_size, "codebook_size") != implied:
                raise ValueError(f"FSQ levels {levels} imply {implied} codes, but codebook_size is {codebook_size}; "
                                 f"set codebook_size = {implied} (or None)")
            if int(opts.get("num_codebooks", 1)) != 1:
                raise ValueError("FSQ with num_codebooks > 1 is not supported (one index per vector)")
            if grid_shape is not None and tuple(grid_shape) != tuple(levels) or periodic or topology != "rectangular":
                raise ValueError(f"FSQ's grid is its level lattice {tuple(levels)} (rectangular, not periodic); "
                                 "leave grid_shape, periodic and topology unset")
            codebook_size, grid_shape = implied, Grid(levels)
            opts["levels"] = levels
        elif codebook_size is None:
            raise ValueError(f"{cls} needs a codebook_size")
        if cls == "VectorQuantize" and (int(opts.get("heads", 1)) != 1 or opts.get("separate_codebook_per_head")):
            raise ValueError("VectorQuantize with heads > 1 is not supported (one index per vector)")
        super().__init__(dim, codebook_size, grid_shape, grid_dims, commitment_weight=0.0,
                         accept_image_fmap=accept_image_fmap, periodic=periodic, topology=topology)
        self.cls = cls
        self.options = opts
        # VectorQuantize decides sync_codebook when built unless told: we decide it at each training forward
        self._auto_sync = cls == "VectorQuantize" and opts.get("sync_codebook") is None
        if self._auto_sync:
            opts = {**opts, "sync_codebook": False}
        try:
            if cls == "FSQ":
                self.inner = vqp.FSQ(dim=self.dim, **opts)
            else:
                self.inner = getattr(vqp, cls)(dim=self.dim, codebook_size=self.codebook_size, **opts)
        except AssertionError as e:  # the library validates its options with assert
            raise ValueError(f"invalid {cls} options {opts}: {e}") from e
        self._refresh_geometry()

    def geometry_description(self) -> dict:
        """The grid and which vector-quantize-pytorch class is wrapped."""
        return {**super().geometry_description(), "vqp": getattr(self, "cls", None)}

    # -- codes ---------------------------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """``(K, dim)`` code vectors in the output (latent) space, in index order."""
        inner = self.inner
        if self.cls == "VectorQuantize":
            return inner.project_out(inner.codebook)
        if self.cls == "FSQ":
            return inner.indices_to_codes(torch.arange(self.codebook_size, device=inner.implicit_codebook.device))
        return inner.codebook  # SimVQ: code_transform(frozen_codebook)

    def assignment_space(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors, codes)`` in which the wrapped module's index is the nearest code: VectorQuantize's
        ``project_in(z)`` and its codebook (both l2-normalised with ``use_cosine_sim``), FSQ's bounded
        pre-rounding values and its normalised lattice, SimVQ's inputs and effective codes."""
        inner = self.inner
        with torch.no_grad():
            if self.cls == "VectorQuantize":
                x, codes = inner.project_in(z.float()), inner.codebook.float()
                if inner.use_cosine_sim:
                    x, codes = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(codes, dim=-1)
                return x, codes
            if self.cls == "FSQ":
                return self._fsq_bounded(z), inner.implicit_codebook.float()
            return z.float(), inner.codebook.float()

    def _fsq_bounded(self, z: torch.Tensor) -> torch.Tensor:
        """FSQ's value just before rounding, in the units of its normalised codes (per dimension the nearest
        lattice value is the rounded one, so the nearest code is FSQ's code)."""
        inner = self.inner
        x = inner.project_in(z.float())
        if getattr(inner, "orthogonal_rotation", False):
            x = x @ inner.orthogonal_rot
        levels = inner._levels.float()
        squash = torch.tanh if not inner.bound_hard_clamp else (lambda v: v.clamp(-1.0, 1.0))
        if inner.preserve_symmetry:  # codes 2 / (L - 1) * floor(v + 0.5) - 1, v = (L - 1)(tanh(x) + 1) / 2
            v = (levels - 1) * (squash(x) + 1) / 2
            return v * (2.0 / (levels - 1)) - 1.0
        eps = 1e-3
        half_l = (levels - 1) * (1 + eps) / 2
        offset = torch.where(inner._levels % 2 == 0, 0.5, 0.0)
        shift = offset / half_l if inner.bound_hard_clamp else torch.atanh(offset / half_l)
        bounded = squash(x + shift) * half_l - offset
        return bounded / (inner._levels // 2).float()

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        z, spatial = self._to_vectors(x)
        n = z.shape[0]
        if self.training and z.device.type == "meta":
            raise ValueError("VQPQuantizer cannot train on the 'meta' device (meta tensors have no values)")
        counts_device = z.device
        if n == 0:  # the wrapped modules do not accept an empty batch: nothing to do
            indices = torch.zeros(0, dtype=torch.long, device=counts_device)
            counts = torch.zeros(self.codebook_size, device=counts_device)
            return QuantizerOutput(self._from_vectors(z.clone(), spatial), indices.reshape(spatial),
                                   z.float().sum() * 0.0, counts)
        if self.training and self._auto_sync:
            self._decide_sync()
        out = self.inner(z.unsqueeze(0))  # (1, N, dim): channel-last, one sequence
        quantized, indices = out[0], out[1]
        loss = out[2].float().sum() if len(out) > 2 else z.float().sum() * 0.0
        indices = indices.reshape(-1).long()
        counts = code_counts(indices, self.codebook_size)
        if self.training:
            self.step.add_(1)
        return QuantizerOutput(self._from_vectors(quantized.reshape(n, self.dim), spatial), indices.reshape(spatial),
                               loss, counts)

    def _decide_sync(self) -> None:
        """VectorQuantize's EMA statistics (and k-means, dead-code sampling) are summed over ranks iff a
        process group of more than one rank exists now: the library's ``sync_codebook=None`` is decided
        once, when the module is built, possibly before ``init_process_group`` (then ranks diverge)."""
        cb = self.inner._codebook
        want = distributed.world_size() > 1
        if cb.use_ddp == want:
            return
        from vector_quantize_pytorch import vector_quantize_pytorch as lib

        sync_kmeans = self.options.get("sync_kmeans", True)
        cb.use_ddp = want
        cb.sample_fn = lib.sample_vectors_distributed if want and sync_kmeans else lib.batched_sample_vectors
        cb.replace_sample_fn = cb.sample_fn
        cb.kmeans_all_reduce_fn = torch.distributed.all_reduce if want and sync_kmeans else lib.noop
        cb.all_reduce_fn = torch.distributed.all_reduce if want else lib.noop

    def extra_repr(self) -> str:
        return f"cls={self.cls!r}, {super().extra_repr()}"
