"""torch.distributed helpers. Every collective here is called unconditionally by all ranks in a training
step (never in eval mode, never in a data-dependent branch), which is what keeps data-parallel runs from
hanging."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group, 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group, 0 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def is_main_process() -> bool:
    return rank() == 0


def should_sync(sync: bool | None) -> bool:
    """Whether statistics are summed across ranks now: ``sync`` None means "whenever a process group with
    more than one rank exists" (decided at call time, so the group may be created after the model)."""
    if sync is False:
        return False
    return world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum of ``tensor`` over all ranks (one collective)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def collective_device() -> torch.device:
    """Where a tensor for a collective of the default group must live: the current CUDA device for NCCL,
    the CPU otherwise (gloo)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
