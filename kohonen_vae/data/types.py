"""Plain containers of the data layer: image sets, splits, the pixel normaliser, and the data errors
(:class:`DatasetNotFoundError`, :class:`DatasetCorruptError`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

# their home is kohonen_vae.errors (one place for the errors a user meets); re-exported here
from ..errors import DatasetCorruptError, DatasetNotFoundError  # noqa: F401


def corrupt_file_error(path, what: str, exc: BaseException) -> "DatasetCorruptError":
    """A one-line :class:`DatasetCorruptError` for the file ``path`` that could not be read as ``what``
    because of ``exc`` (for ``raise ... from exc``)."""
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    err = DatasetCorruptError(f"{path}: not a readable {what} ({detail}); the file is truncated, damaged or not "
                              "what its name says. Replace it with an intact copy (or delete it and fetch the "
                              "dataset again)")
    err.filename = str(path)
    return err


@dataclass
class ImageSet:
    """A set of decoded images kept as uint8.

    images:  uint8 tensor (N, C, H, W), C-contiguous (possibly backed by a copy-on-write numpy memmap).
    labels:  int64 tensor (N,) or None when the source has no class labels.
    name:    e.g. ``"cifar10/train"``.
    indices: int64 tensor (N,) of the positions of these images in the source set they were split from
             (the full training set for train/val, ``arange(N)`` for test), or None.
    """

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    name: str
    indices: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"ImageSet {self.name!r}: images must be a uint8 (N, C, H, W) tensor, "
                             f"got {self.images.dtype} {tuple(self.images.shape)}")
        n = self.images.shape[0]
        for what, t in (("labels", self.labels), ("indices", self.indices)):
            if t is not None and tuple(t.shape) != (n,):
                raise ValueError(f"ImageSet {self.name!r}: {what} must have shape ({n},), got {tuple(t.shape)}")

    def __len__(self) -> int:
        """Number of images N."""
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return (f"ImageSet(name={self.name!r}, images={tuple(self.images.shape)} uint8, "
                f"labels={'None' if self.labels is None else tuple(self.labels.shape)})")


class Normalizer:
    """Per-channel affine pixel normalisation  y = (x / 255 - mean) / std,  x uint8 in [0, 255].

    ``mean`` and ``std`` are float32 tensors of shape (C,), in units of [0, 1] pixels. The CIFAR-10 protocol of the
    paper uses the training split's per-channel mean/std; the face datasets use mean = std = 0.5, i.e. [-1, 1].
    """

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                 kind: str = "custom") -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).detach().cpu().reshape(-1).clone()
        self.std = torch.as_tensor(std, dtype=torch.float32).detach().cpu().reshape(-1).clone()
        if self.mean.shape != self.std.shape or self.mean.numel() == 0:
            raise ValueError(f"Normalizer: mean and std must be non-empty and of equal shape (C,), "
                             f"got {tuple(self.mean.shape)} and {tuple(self.std.shape)}")
        if not bool(torch.all(self.std > 0)):
            raise ValueError(f"Normalizer: std must be > 0 per channel, got {self.std.tolist()} "
                             "(a constant channel cannot be standardised; use Normalizer.unit_range(C))")
        self.kind = kind
        self._per_device: Dict[Any, tuple] = {}

    # --- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def unit_range(cls, channels: int) -> "Normalizer":
        """Normaliser to [-1, 1]: mean = std = 0.5 for every channel, so 0 -> -1 and 255 -> 1."""
        return cls([0.5] * channels, [0.5] * channels, kind="minus_one_one")

    @classmethod
    def from_images(cls, images: torch.Tensor, chunk: int = 4096) -> "Normalizer":
        """Per-channel standardisation from uint8 images (N, C, H, W): mean_c = E[x/255], std_c = sqrt(Var[x/255]).

        Exact population statistics in float64, computed from per-channel 256-bin histograms (no float copy of
        the data is made).
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"Normalizer.from_images needs a non-empty uint8 (N, C, H, W) tensor, "
                             f"got {images.dtype} {tuple(images.shape)}")
        c = images.shape[1]
        counts = torch.zeros(c, 256, dtype=torch.float64)
        for start in range(0, images.shape[0], chunk):
            block = images[start:start + chunk]
            for ch in range(c):
                counts[ch] += torch.bincount(block[:, ch].reshape(-1), minlength=256).double()
        values = torch.arange(256, dtype=torch.float64) / 255.0
        n = counts.sum(1)
        mean = (counts * values).sum(1) / n
        var = (counts * (values[None, :] - mean[:, None]) ** 2).sum(1) / n
        return cls(mean.float(), var.sqrt().float(), kind="standardize")

    # --- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain-data form ``{"kind", "mean": [C floats], "std": [C floats]}`` for run configs."""
        return {"kind": self.kind, "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        """Inverse of :meth:`to_dict`."""
        return cls(d["mean"], d["std"], kind=d.get("kind", "custom"))

    # --- application -------------------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Number of channels C."""
        return int(self.mean.numel())

    def _stats_on(self, device: torch.device) -> tuple:
        # The (C,1,1) copies are cached per device so that normalising a batch costs no host->device copy.
        key = str(device)
        if key not in self._per_device:
            self._per_device[key] = (self.mean.to(device).view(-1, 1, 1), self.std.to(device).view(-1, 1, 1))
        return self._per_device[key]

    def _check_channels(self, x: torch.Tensor) -> None:
        if x.dim() < 3 or x.shape[-3] != self.channels:
            raise ValueError(f"Normalizer for {self.channels} channel(s) expects (..., {self.channels}, H, W), "
                             f"got shape {tuple(x.shape)}")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) on any device -> float32 on the same device: (x / 255 - mean) / std."""
        if x.dtype != torch.uint8:
            raise TypeError(f"Normalizer.normalize expects uint8 pixels, got {x.dtype}; "
                            "pass ImageSet.images batches (still uint8), not already-normalised floats")
        self._check_channels(x)
        mean, std = self._stats_on(x.device)
        return (x.to(torch.float32).div_(255.0) - mean).div_(std)

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """Float (B, C, H, W) -> float pixels in [0, 1]: clamp(y * std + mean, 0, 1) (the inverse of normalize)."""
        self._check_channels(y)
        mean, std = self._stats_on(y.device)
        return (y.to(torch.float32) * std + mean).clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4f}" for v in t.tolist()) + ")"  # noqa: E731
        return f"Normalizer(kind={self.kind!r}, mean={fmt(self.mean)}, std={fmt(self.std)})"


@dataclass
class DatasetSplits:
    """The three sets of a dataset plus how to normalise them.

    train/val: the fixed-seed split of the source training set; test: the source test set (None if it has none);
    normalizer: :class:`Normalizer` (statistics from ``train`` where the protocol standardises);
    info: plain dict (dataset, source path, layout, sizes, image shape, split seed, cache use, load time).
    """

    train: ImageSet
    val: ImageSet
    test: Optional[ImageSet]
    normalizer: Normalizer
    info: Dict[str, Any] = field(default_factory=dict)


def to_nchw_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 numpy (N, C, H, W) -> torch uint8 tensor sharing memory when already C-contiguous."""
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 (N, C, H, W) pixels, got {x.dtype} {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))
