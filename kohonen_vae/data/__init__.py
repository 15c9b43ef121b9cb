"""Data layer: datasets as uint8 image tensors, the paper's fixed-seed train/val split, and per-batch normalisation.

    from kohonen_vae.data import load_splits
    splits = load_splits("cifar10")                 # train 40,000 / val 10,000 / test 10,000, uint8 (N, 3, 32, 32)
    x = splits.normalizer.normalize(splits.train.images[:256].to(device))   # float32 (x/255 - mean)/std on device

Images stay uint8 (decoded once, cached as verified .npy files); normalisation happens per batch on the training
device. ``splits.info["fingerprint"]`` identifies the decoded data (see :func:`load_splits`). Errors: a missing
dataset raises :class:`DatasetNotFoundError`, a truncated, damaged or crafted file :class:`DatasetCorruptError`.
"""
from .cache import cache_dir
from .cifar import ChecksumError
from .loader import (DATASETS, data_roots, evaluation_indices, evaluation_subset, load_splits, resize_uint8,
                     shared_data_dir, split_indices, splits_from_config, splits_key)
from .types import DatasetCorruptError, DatasetNotFoundError, DatasetSplits, ImageSet, Normalizer

__all__ = ["load_splits", "splits_from_config", "DATASETS", "DatasetNotFoundError", "DatasetCorruptError", "Normalizer",
           "ImageSet", "DatasetSplits",
           "ChecksumError", "cache_dir", "data_roots", "shared_data_dir", "resize_uint8", "split_indices",
           "evaluation_indices", "evaluation_subset", "splits_key"]
