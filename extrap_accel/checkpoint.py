"""Each rank's own extrapolation state beside a checkpoint: one file name, one policy.

Frameworks save the optimizer from the main process only, but x̃, the local moments and the
noise generators differ per rank. Every backend (accelerate's ``save_state``, the Trainer's
checkpoints, DeepSpeed's ``save_checkpoint``) writes ``extrap_accel_rank<r>.pt`` into the
checkpoint folder on every rank, holding the local state of each extrap_accel optimizer, and
restores it with one policy, decided alike on every rank by one all-reduce:

- every rank finds its own file, saved with this number of processes: each rank continues
  bit for bit from its own x̃;
- no rank finds one (a checkpoint saved without extrap_accel, a DeepSpeed universal
  checkpoint): a warning, and every rank restarts its local state from the loaded anchor
  (d = 0, as at t = 0; the anchor and the base optimizer state are intact);
- anything else (some files missing, or saved with another number of processes) raises the
  same error on every rank, never a hang.

Files written by extrap_accel 0.1 (``extrap_accel_local_<i>_rank<r>.pt`` from accelerate and
the Trainer, format-1 ``extrap_accel_rank<r>.pt`` from DeepSpeed) are read too.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from . import _dist

FORMAT = 2


def path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"extrap_accel_rank{rank}.pt")


def save(folder: str, optimizers: list, rank: int | None = None) -> str:
    """Write this rank's local state of ``optimizers`` into ``folder``; returns the path."""
    rank = _dist.rank() if rank is None else rank
    states = [opt.local_state_dict() for opt in optimizers]
    world = next((s["world_size"] for s in states if s.get("world_size")), None)
    os.makedirs(folder, exist_ok=True)  # this rank may get here before the main one
    target = path(folder, rank)
    torch.save({"format": FORMAT, "rank": rank, "world_size": world, "optimizers": states}, target)
    return target


def read(folder: str, rank: int, count: int = 1) -> list[dict[str, Any]] | None:
    """This rank's saved local states (one per optimizer) in ``folder``, or None if it has no
    file. A damaged file raises, naming it."""
    target = path(folder, rank)
    if os.path.isfile(target):
        saved = _load(target)
        if "optimizers" in saved:
            return saved["optimizers"]
        if "state" in saved:  # 0.1's DeepSpeed adapter: one optimizer's state
            return [saved]
        raise ValueError(f"{target} is not an extrap_accel local-state file (unknown format)")
    legacy = [os.path.join(folder, f"extrap_accel_local_{i}_rank{rank}.pt") for i in range(count)]
    if all(os.path.isfile(p) for p in legacy):  # 0.1's accelerate and Trainer files
        return [_load(p) for p in legacy]
    return None


def _load(target: str) -> dict[str, Any]:
    try:
        saved = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unpickling failure means a damaged file)
        raise ValueError(
            f"could not read {target} ({type(e).__name__}): the file is damaged. Copy it "
            "again from where it was saved, or remove every rank's extrap_accel_rank*.pt from "
            "that folder to restart the local extrapolation state from the anchor"
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(f"{target} is not an extrap_accel local-state file")
    return saved


def agree(states: list[dict] | None, where: str, *, found: bool = True, optional: bool = False,
          device: torch.device | None = None) -> str:  # fmt: skip
    """Decide, identically on every rank (one all-reduce), what to do with this rank's
    ``states`` (None: it has no file) after the framework loaded the checkpoint in ``where``
    (``found``: it did find one). Returns "load" (every rank has its file), "restart" (no rank
    has one: warned), "none" (no rank found a checkpoint: nothing was loaded) or, where the
    files are ``optional`` (one process whose optimizer state dict holds x̃ and its local
    state), "skip" when there are none; raises on every rank otherwise."""
    world = _dist.world_size()
    saved_k = None
    if states is not None:
        saved_k = next((s.get("world_size") for s in states if s.get("world_size")), None)
    other_k = saved_k is not None and saved_k != world
    n_found, with_file, n_other = _dist.all_reduce_ints(
        [int(found), int(states is not None), int(other_k)], device=device)  # fmt: skip
    if n_found == 0:
        return "none"
    if n_found < world:
        raise ValueError(
            f"the framework found the checkpoint in {where} on {n_found} of {world} ranks only: "
            "every rank must load it (copy the checkpoint folder to every node's disk, or load "
            "from a shared file system)"
        )
    if n_other or 0 < with_file < world:
        raise ValueError(
            f"{where} holds extrap_accel's per-rank state for {with_file} of {world} ranks"
            + (f" (saved with {saved_k} processes)" if other_k else "")
            + "; each rank's x̃ and local moments belong to one data-parallel worker: resume "
            "with the number of processes that saved it, with every rank's "
            "extrap_accel_rank<r>.pt in that folder (copy them from each node's disk), or "
            "remove them all to restart the local extrapolation state from the anchor"
        )
    if with_file == 0 and optional:
        return "skip"
    if with_file == 0:
        warnings.warn(
            f"extrap_accel: {where} has no per-rank extrapolation state (saved without "
            "extrap_accel, or a universal checkpoint); every rank restarts its local state "
            "from the anchor (d = 0) with fresh local moments",
            stacklevel=3,
        )
        return "restart"
    return "load"


def apply(decision: str, optimizers: list, states: list[dict] | None, *,
          staged: bool = False) -> None:  # fmt: skip
    """Carry out ``agree``'s ``decision`` on each of ``optimizers``: "load" puts this rank's
    state back, "restart" restarts its local state from the anchor; at once, or ``staged`` for
    the optimizer's next ``load_state_dict`` (a hook that runs before the framework loads it)."""
    for i, optimizer in enumerate(optimizers):
        if decision == "load":
            if staged:
                optimizer.stage_local_state(states[i])
            else:
                optimizer.load_local_state_dict(states[i])
        elif decision == "restart":
            if staged:
                optimizer.stage_local_state(None, restart=True)
            else:
                optimizer.reset_local_state(warn=False)
