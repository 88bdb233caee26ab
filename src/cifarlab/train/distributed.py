"""Distributed data parallel on PyTorch's own engine, started by ``torchrun``.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL is used on CUDA and gloo
on the CPU. A single process (no WORLD_SIZE) takes none of these paths.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as tdist


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> None:
    if _env_world() > 1 and not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend=backend)


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def device_for_rank(device: torch.device) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if not is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def max_over_ranks(value: int | bool | torch.Tensor) -> int:
    """The largest ``value`` of all ranks, on every rank. Ranks must take the same branch before a
    collective (a skipped batch, a stop on NaN or on a signal), or the next all-reduce waits forever."""
    if not is_dist():
        return int(value)
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    t = torch.as_tensor(value, device=device).to(torch.int64).reshape(1)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    return bool(max_over_ranks(flag))


def broadcast_object(obj):
    """Rank 0's ``obj`` (anything picklable) on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def lr_scale(rule: str) -> float:
    """Learning-rate multiplier for the global batch (batch_size x world size): Goyal et al., 2017 (linear)."""
    n = world_size()
    return {"none": 1.0, "linear": float(n), "sqrt": math.sqrt(n)}[rule]


def cleanup() -> None:
    if is_dist():
        tdist.destroy_process_group()
