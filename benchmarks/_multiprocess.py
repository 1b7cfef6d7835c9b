"""What the 2-process benchmarks share: launch the workers, collect their JSON, report."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cmd: list[str], env: dict[str, str], world_size: int = 2,
              quiet: bool = False) -> list[dict]:  # fmt: skip
    """Run ``cmd + ["--out", DIR]`` from the repo root; return each rank's ``DIR/rank<r>.json``."""
    env = dict(env, PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([*cmd, "--out", out], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL if quiet else None)  # fmt: skip
        ranks = []
        for r in range(world_size):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    return ranks


def report(ranks: list[dict], text: str, json_path: str | None, device: str = "") -> dict:
    """Print the table under a machine line; also write everything to ``json_path``."""
    device = f", {device}" if device else ""
    machine = f"{platform.node()}: {os.cpu_count()} CPUs{device}, torch {torch.__version__}"
    print(f"Machine: {machine}\n\n{text}")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"machine": machine, "ranks": ranks, "table": text}, f, indent=1)
    return {"ranks": ranks, "table": text}


def interleaved_times(one_step: Callable[[str, int], None], names: Iterable[str], steps: int,
                      warmup: int = 3, cuda: bool = False) -> dict[str, list[float]]:  # fmt: skip
    """Seconds of ``one_step(name, t)`` for each name, interleaved (A, B, A, B, ...) after
    ``warmup`` untimed rounds; every rank waits for the others before each timed step."""
    import torch.distributed as dist

    names = list(names)
    for t in range(warmup):
        for name in names:
            one_step(name, t)
    times: dict[str, list[float]] = {name: [] for name in names}
    for t in range(warmup, warmup + steps):
        for name in names:
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            one_step(name, t)
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times
