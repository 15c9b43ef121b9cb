"""Deterministic, resumable, rank-sharded batches over an in-memory training set.

Epoch ``e`` visits the images in the order ``permutation(seed, e)`` (numpy's PCG64 seeded with the
sequence ``[seed, e]``, identical on every machine); global batch ``b`` of the epoch is positions
``[b B, (b + 1) B)`` of it, the incomplete tail is dropped. With ``world_size`` ranks, rank ``r`` takes
the ``r``-th of ``world_size`` equal slices of every global batch, so the union over ranks is exactly the
single-process batch. The whole state is ``(epoch, position)``; restoring it replays the same batches.
"""
from __future__ import annotations

import numpy as np
import torch


class ShardedBatchSampler:
    """Yields this rank's index slice of every global batch (see module docstring).

    Args:
        num_items: size N of the training set.
        batch_size: global batch size B (over all ranks); must be divisible by ``world_size`` and <= N.
        seed: the run seed.
        rank, world_size: data-parallel position.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} data-parallel ranks; "
                             f"choose a multiple of {world_size}")
        if num_items < batch_size:
            raise ValueError(f"the training set has {num_items} images, fewer than one batch of {batch_size}; "
                             "lower train.batch_size")
        self.num_items, self.batch_size, self.seed = int(num_items), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch_size = self.batch_size // self.world_size
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The visiting order of ``epoch``: a permutation of ``range(N)`` determined by ``(seed, epoch)``."""
        if self._perm_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm = torch.from_numpy(rng.permutation(self.num_items).astype(np.int64))
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> torch.Tensor:
        """Indices (int64, length B / world_size) of this rank's part of the next global batch."""
        if self.position + self.batch_size > self.num_items:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.local_batch_size
        out = self.permutation(self.epoch)[start:start + self.local_batch_size]
        self.position += self.batch_size
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": self.num_items,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "num_items", "batch_size"):
            if int(state[k]) != getattr(self, k):
                raise ValueError(f"sampler state was saved with {k}={state[k]}, this run has {getattr(self, k)}; "
                                 "resume with the same data and batch size")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
