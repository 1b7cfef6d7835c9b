"""Run a worker script under a real multi-process launcher and collect its JSON results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "accelerate_configs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(config_file: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(CONFIGS, config_file), *args]


def cpu_env(accelerate_use_cpu: bool = True) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if accelerate_use_cpu:  # DDP configs; a DeepSpeed config must not set it
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def run(cmds: list[list[str]], timeout: int = 600, accelerate_use_cpu: bool = True) -> None:
    """Start every command at once (one per node), wait for all, fail with their output."""
    env = cpu_env(accelerate_use_cpu)
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in cmds]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append((proc.returncode, out))
    failed = [(rc, out) for rc, out in outputs if rc != 0]
    if failed:
        rc, out = failed[0]
        raise AssertionError(f"launch failed with exit code {rc}:\n{out[-6000:]}")


def load_results(out_dir: str, config: str, world_size: int) -> list[dict]:
    results = []
    for rank in range(world_size):
        with open(os.path.join(out_dir, f"{config}_rank{rank}.json")) as f:
            results.append(json.load(f))
    return results
