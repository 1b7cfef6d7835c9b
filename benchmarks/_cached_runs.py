"""What the cached, resumable studies share (reproduce.py, batch_scaling.py): train the runs
whose result is not cached yet, in parallel processes, and return every result."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor


def run_cached(specs: list[dict], train_one: Callable[[dict], dict], jobs: int, log,
               describe: Callable[[dict], str], order=None) -> dict[str, dict]:  # fmt: skip
    """``train_one(spec)`` for every spec whose JSON (``spec["path"]``, written by train_one)
    does not exist yet, each id once, sorted by ``order`` if given, in ``jobs`` processes;
    returns every record by id, cached or new. ``describe(record)`` is logged per new run."""
    results, todo = {}, []
    for spec in specs:
        if os.path.exists(spec["path"]):
            with open(spec["path"]) as f:
                results[spec["id"]] = json.load(f)
        elif spec["id"] not in {s["id"] for s in todo}:
            todo.append(spec)
    log(f"{len(specs) - len(todo)} runs cached, {len(todo)} to train")
    if order is not None:
        todo.sort(key=order)
    if not todo:
        return results
    pool = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else None
    done = pool.map(train_one, todo) if pool else map(train_one, todo)
    for i, r in enumerate(done, 1):
        results[r["id"]] = r
        log(f"[{i}/{len(todo)}] {r['id']}: {describe(r)}")
    if pool:
        pool.shutdown()
    return results
