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


_PORT_FLAGS = ("--main_process_port", "--master_port")
# A worker killed by a signal or a broken gloo connection before it could report: under a
# loaded machine a port picked by free_port() can be taken before the launcher binds it.
_TRANSIENT = ("Signal 6", "SIGABRT", "Connection reset by peer", "Address already in use",
              "EnforceNotMet", "connect() timed out")


def _with_fresh_ports(cmds: list[list[str]]) -> list[list[str]]:
    old = {cmd[i + 1] for cmd in cmds for i, a in enumerate(cmd[:-1]) if a in _PORT_FLAGS}
    new = {port: str(free_port()) for port in old}
    return [[new.get(a, a) if i and cmd[i - 1] in _PORT_FLAGS else a for i, a in enumerate(cmd)]
            for cmd in cmds]  # fmt: skip


def run(cmds: list[list[str]], timeout: int = 600, accelerate_use_cpu: bool = True,
        retries: int = 1) -> None:
    """Start every command at once (one per node), wait for all, fail with their output.

    A launch that died of a transient infrastructure failure (see _TRANSIENT) is retried once
    on fresh ports; its results are asserted like any other's.
    """
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
    if failed and retries > 0 and any(k in out for _, out in failed for k in _TRANSIENT):
        return run(_with_fresh_ports(cmds), timeout, accelerate_use_cpu, retries - 1)
    if failed:
        rc, out = failed[0]
        # the launcher's own traceback comes last: show the workers' errors first
        errors = [line for line in out.splitlines()
                  if any(k in line for k in ("Error", "error:", "what()", "Abort", "Traceback"))]
        raise AssertionError(f"launch failed with exit code {rc}; worker errors:\n"
                             + "\n".join(errors[:60]) + f"\n--- output tail ---\n{out[-6000:]}")


def load_results(out_dir: str, config: str, world_size: int) -> list[dict]:
    results = []
    for rank in range(world_size):
        with open(os.path.join(out_dir, f"{config}_rank{rank}.json")) as f:
            results.append(json.load(f))
    return results
