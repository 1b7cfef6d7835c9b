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
