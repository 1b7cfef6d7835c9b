"""The few facts about the process group the optimizers need (torch.distributed only)."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The data-parallel world size, or 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def generator_seed(seed: int, rank: int, device: torch.device) -> int:
    """A 63-bit seed derived from (seed, rank, device): distinct streams per rank and device."""
    key = f"extrap_accel:{seed}:{rank}:{device.type}:{device.index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def all_reduce_ints(values: list[int], device: torch.device | None = None) -> list[int]:
    """Sum ``values`` over all ranks (one all-reduce; returned as is without a process group).
    ``device``: where the collective runs (default: the current CUDA device for NCCL, else CPU)."""
    if not is_initialized():
        return list(values)
    if device is None:
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
    flags = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(flags)
    return [int(v) for v in flags.tolist()]
