"""The paper's autoencoders (spec section 5): the CIFAR-10 VQ-VAE and the two-level VQ-VAE-2.

Both share one contract, relied on by the trainer and by the figures/metrics code::

    out = model(images)                    # images normalised, (B, C, H, W)
    out.reconstruction                     # (B, C, H, W), normalised space
    out.commitment_loss                    # sum over levels of each quantiser's (weighted) loss
    out.indices / perplexity / used_codes / counts   # one entry per level; VQVAE2 order [top, bottom]
    model.encode(images, batch_size=None)  # eval mode, no grad: list of (B, h, w) int64 index maps per level
    model.encode_indices(images)           # the same maps in the model's current mode; never updates a codebook
    model.decode_indices(indices, batch_size=None)   # eval mode: images (B, C, H, W) in normalised space
    model.latent_shapes(image_size)        # [(h, w), ...] per level
    model.quantizers                       # nn.ModuleList, one per level

Training loss (spec section 1): ``MSE(reconstruction, images) + commitment_loss``.

Tokens: level ``l`` of an ``H x W`` image is an ``(H / s_l, W / s_l)`` map of code indices in
``[0, K_l)``, ``s_l = model.strides[l]``: VQ-VAE ``[bottom (H/4, W/4)]`` (8x8 for CIFAR-10), VQ-VAE-2
``[top (H/8, W/8), bottom (H/4, W/4)]`` (32x32 and 64x64 at 256x256). In eval mode
``decode_indices(encode(x))`` equals ``model(x).reconstruction`` bit for bit (the quantised output of a
forward without gradient is exactly the looked-up code, see ``quantizers.base.straight_through``) when
both see the same batch; split into other batches the results agree to float rounding only, because
the CPU convolution kernels depend on the batch size. (vector-quantize-pytorch's SimVQ recomputes its
codes from indices by another matrix product than its forward: there the two agree to ~1e-8.)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .layers import decoder_stride2, decoder_stride4, encoder_stride2, encoder_stride4


@dataclass
class ModelOutput:
    """What a forward pass returns; the lists have one entry per quantiser level."""

    reconstruction: torch.Tensor
    commitment_loss: torch.Tensor
    indices: list = field(default_factory=list)      # LongTensor (B, h, w) per level
    perplexity: list = field(default_factory=list)   # scalar tensor per level
    used_codes: list = field(default_factory=list)   # scalar tensor per level
    counts: list = field(default_factory=list)       # (K,) float tensor per level


@contextlib.contextmanager
def frozen_codebooks(model: nn.Module):
    """Put every quantiser of ``model`` in eval mode (no codebook update, no step count) for the block and
    restore each module's previous mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    for q in model.quantizers:
        q.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def evaluation_mode(model: nn.Module):
    """``model.eval()`` for the block, then every module's previous ``training`` flag is restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _batch_slices(n: int, batch_size) -> list[slice]:
    if batch_size is None:
        return [slice(0, n)]
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    return [slice(s, min(s + int(batch_size), n)) for s in range(0, n, int(batch_size))] or [slice(0, 0)]


class _VQModelBase(nn.Module):
    """Shared helpers; subclasses define ``quantizers``, ``_forward_levels`` and ``_decode_codes``."""

    #: smallest input side the architecture is meant for (checked by the trainer against the dataset)
    min_image_size = 4
    #: total downsampling factor of each level, in the order of ``quantizers``
    strides: tuple = ()

    def latent_shapes(self, image_size) -> list[tuple[int, int]]:
        """Latent ``(h, w)`` of each level for a square ``image_size`` (or an ``(H, W)`` pair)."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        big = max(self.strides)
        if h % big or w % big:
            raise ValueError(f"{type(self).__name__} needs image sides divisible by {big}, got {h}x{w}")
        return [(h // s, w // s) for s in self.strides]

    def forward(self, images: torch.Tensor) -> ModelOutput:
        """Encode, quantise every level (updating EMA/KSOM codebooks in training mode), decode."""
        recon, outs = self._forward_levels(images)
        loss = outs[0].loss
        for o in outs[1:]:
            loss = loss + o.loss
        return ModelOutput(
            reconstruction=recon,
            commitment_loss=loss,
            indices=[o.indices for o in outs],
            perplexity=[o.perplexity for o in outs],
            used_codes=[o.used_codes for o in outs],
            counts=[o.counts for o in outs],
        )

    @torch.no_grad()
    def encode_indices(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Code indices of every level, ``[(B, h, w), ...]``; codebooks stay untouched even in training mode."""
        with frozen_codebooks(self):
            _, outs = self._forward_levels(images, decode=False)
        return [o.indices for o in outs]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int | None = None) -> list[torch.Tensor]:
        """Token indices of ``images`` (normalised, ``(B, C, H, W)`` on the model's device), one int64 map
        ``(B, H / s_l, W / s_l)`` per level in the order of :attr:`level_names` (VQ-VAE-2: ``[top, bottom]``),
        values in ``[0, K_l)``. Runs in eval mode without gradient, ``batch_size`` images at a time (None: all
        at once); the model's modes are restored and no codebook changes."""
        if images.dim() != 4:
            raise ValueError(f"{type(self).__name__}.encode expects images (batch, channels, height, width), "
                             f"got shape {tuple(images.shape)}")
        with evaluation_mode(self):
            parts = [self.encode_indices(images[sl]) for sl in _batch_slices(images.shape[0], batch_size)]
        if len(parts) == 1:
            return parts[0]
        return [torch.cat([p[level] for p in parts]) for level in range(len(self.quantizers))]

    def decode_indices(self, indices, batch_size: int | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in normalised space decoded from one ``(B, h_l, w_l)`` index map per level
        (:attr:`level_names` order, integer tensors or numpy arrays of any integer dtype, e.g. the uint16 of
        a token file). Runs in eval mode, ``batch_size`` images at a time (None: all at once); gradients
        follow the caller's grad mode. Raises ValueError for a wrong number of levels, shapes that do not
        belong to one image size, or an index outside ``[0, K_l)``."""
        indices = [self._as_index_tensor(idx) for idx in indices]
        if len(indices) != len(self.quantizers):
            raise ValueError(f"{type(self).__name__} expects {len(self.quantizers)} index maps "
                             f"(order {self.level_names}), got {len(indices)}")
        for name, idx in zip(self.level_names, indices):
            if idx.dim() != 3:
                raise ValueError(f"index map of level {name!r} must be (batch, height, width), got {tuple(idx.shape)}")
        sizes = {(idx.shape[0], idx.shape[1] * s, idx.shape[2] * s) for idx, s in zip(indices, self.strides)}
        if len(sizes) != 1:
            shapes = ", ".join(f"{n} {tuple(i.shape)}" for n, i in zip(self.level_names, indices))
            raise ValueError(f"the index maps ({shapes}) do not belong to one batch of one image size: level l of "
                             f"an H x W image is (B, H / s_l, W / s_l) with strides {self.strides}")
        with evaluation_mode(self):
            out = [self._decode_codes([q.get_codes_from_indices(idx[sl]) for q, idx in zip(self.quantizers, indices)])
                   for sl in _batch_slices(indices[0].shape[0], batch_size)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _as_index_tensor(self, idx) -> torch.Tensor:
        # int64 on the codebook's device: unsigned token dtypes (numpy uint16/uint32) have no embedding kernel.
        # Anything not integer is passed on unchanged for get_codes_from_indices to name its dtype.
        if not isinstance(idx, torch.Tensor):
            arr = np.asarray(idx)
            idx = torch.from_numpy(arr.astype(np.int64)) if arr.dtype.kind in "iu" else torch.as_tensor(arr)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            return idx
        return idx.to(device=self.quantizers[0].codebook.device, dtype=torch.long)


class VQVAE(_VQModelBase):
    """The CIFAR-10 VQ-VAE of the paper (latent 8x8 for 32x32 images, stride 4).

    Encoder: Conv 3->64 k4 s2 p1, ReLU; Conv 64->128 k4 s2 p1, ReLU; Conv 128->128 k3 p1;
    2 ResBlocks (no bias); ReLU. Pre-quantiser Conv1x1 128->64. Decoder: Conv3x3 64->128; 2 ResBlocks;
    ReLU; ConvT 128->64 k4 s2 p1, ReLU; ConvT 64->3 k4 s2 p1.

    ``quantizer_factory(dim) -> quantiser`` builds the (single) quantiser, in ``accept_image_fmap`` mode.
    """

    level_names = ("bottom",)
    strides = (4,)

    def __init__(self, quantizer_factory, in_channels: int = 3, channels: int = 128, res_channels: int = 32,
                 num_res_blocks: int = 2, embed_dim: int = 64):
        super().__init__()
        self.encoder = encoder_stride4(in_channels, channels, res_channels, num_res_blocks, bias=False)
        self.pre_quantizer = nn.Conv2d(channels, embed_dim, 1)
        self.quantizers = nn.ModuleList([quantizer_factory(embed_dim)])
        self.decoder = decoder_stride4(embed_dim, in_channels, channels, res_channels, num_res_blocks, bias=False)

    def _forward_levels(self, images, decode: bool = True):
        out = self.quantizers[0](self.pre_quantizer(self.encoder(images)))
        recon = self.decoder(out.quantized) if decode else None
        return recon, [out]

    def _decode_codes(self, codes):
        return self.decoder(codes[0])


class VQVAE2(_VQModelBase):
    """Two-level VQ-VAE-2 (spec section 5); ``quantizers`` order is ``[top, bottom]``.

    Bottom encoder (stride 4) -> top encoder (stride 2) -> Conv1x1 128->64 -> quantise top;
    dec_t (Conv3x3 64->128, 2 ResBlocks, ReLU, ConvT 128->64) of the top code, concatenated with the bottom
    encoding -> Conv1x1 192->64 -> quantise bottom. Decoder: ConvT 64->64 (upsample the top code), concat
    with the bottom code -> Conv3x3 128->128, 2 ResBlocks, ReLU, ConvT 128->64, ReLU, ConvT 64->3.
    At 256x256 the latents are 32x32 (top) and 64x64 (bottom); at 64x64 they are 8x8 and 16x16.
    """

    level_names = ("top", "bottom")
    strides = (8, 4)
    min_image_size = 64

    def __init__(self, quantizer_factory, in_channels: int = 3, channels: int = 128, res_channels: int = 32,
                 num_res_blocks: int = 2, embed_dim: int = 64):
        super().__init__()
        self.enc_b = encoder_stride4(in_channels, channels, res_channels, num_res_blocks)
        self.enc_t = encoder_stride2(channels, channels, res_channels, num_res_blocks)
        self.quantize_conv_t = nn.Conv2d(channels, embed_dim, 1)
        self.dec_t = decoder_stride2(embed_dim, embed_dim, channels, res_channels, num_res_blocks)
        self.quantize_conv_b = nn.Conv2d(embed_dim + channels, embed_dim, 1)
        self.upsample_t = nn.ConvTranspose2d(embed_dim, embed_dim, 4, stride=2, padding=1)
        self.decoder = decoder_stride4(2 * embed_dim, in_channels, channels, res_channels, num_res_blocks)
        self.quantizers = nn.ModuleList([quantizer_factory(embed_dim), quantizer_factory(embed_dim)])

    def _forward_levels(self, images, decode: bool = True):
        enc_b = self.enc_b(images)
        enc_t = self.enc_t(enc_b)
        out_t = self.quantizers[0](self.quantize_conv_t(enc_t))
        dec_t = self.dec_t(out_t.quantized)
        out_b = self.quantizers[1](self.quantize_conv_b(torch.cat([dec_t, enc_b], 1)))
        recon = self._decode_codes([out_t.quantized, out_b.quantized]) if decode else None
        return recon, [out_t, out_b]

    def _decode_codes(self, codes):
        quant_t, quant_b = codes
        return self.decoder(torch.cat([self.upsample_t(quant_t), quant_b], 1))
