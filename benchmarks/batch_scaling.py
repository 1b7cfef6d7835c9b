"""Where does mini-batch SGD stop scaling, and does extrapolation move that point? (issue #16)

Steps to reach a fixed loss against the global batch B = K·b, at a fixed local batch b, with K
data-parallel workers simulated in one process by ``extrap_accel.VirtualWorkers``.

Task: a byte-level language model on CPython's own standard library (``sysconfig.get_paths()
["stdlib"]``, every ``*.py`` below it except site-packages/dist-packages), split by file (10% of
the files for validation, ``random.Random(SPLIT_SEED)``). The model is an MLP over the previous
CONTEXT bytes (embedding → one hidden layer → 256 logits) that predicts the next byte; an example
is one position of the concatenated training files, drawn uniformly at random.

Methods (``extrap_accel.create_optimizer``): ``sgd`` (no momentum), ``nesterov`` (momentum 0.9),
``extrap_sgd`` and ``extrap_sgd_stochastic`` (both on Nesterov 0.9; γ̃ = c·γ/K, c = extrap_scale).
No weight decay, no clipping.

Schedule: γ warmed up linearly over the first WARMUP steps (γ·(t+1)/WARMUP), then constant.

Target: the loss of the ANCHOR (the model the optimizer holds; never a worker's x̃) on a fixed
subset of EVAL_EXAMPLES training positions, evaluated every ``eval_every(K)`` steps; "steps to
target" is the first evaluated step at which it is ≤ TRAIN_TARGET. The same anchor is evaluated
on a fixed subset of validation positions (the held-out files) against VAL_TARGET. A run stops
once both targets are reached, at its step cap, or when it diverges.

Tuning, at each rung K (seed 0): γ on a grid around linear scaling, γ = K·γ₀·{1/4, 1/2, 1, 2}
(γ₀ per study and method, ``STUDIES``), extended by ×2 (or ×½) up to MAX_EXTEND = 3 times while
the best point is on the edge of the grid (extrap methods with c = 1); then, at that γ, c on the
study's grid for the extrap methods, extended the same way while the edge value is strictly better
than its neighbour. "Best" = fewest steps to the training target (ties: lower
training-subset loss at the end of the run); runs that do not reach it rank after those that do
(by final loss), diverged runs last. The selected point is also trained with the other seeds
(data order, initialization and the extrapolation generators change with the seed; at one seed
every method sees the same batches).

Studies (``--study``): ``main`` (docs/scaling.md: training target 2.30 nats, validation 2.35),
``early`` (an easier target, 2.90 / 2.98, the first study that ran) and ``quick`` (the test's).

Output (``--output_dir``, default ``outputs/batch_scaling``): ``runs/*.json`` (one per finished
run: the resume cache), ``data.json`` (Python version, the file list with sizes and split, its
sha256), ``results.json``, ``results.md`` (the tables) and ``plots/steps_vs_batch.png``.

    nice -n 10 env PYTHONPATH=. python benchmarks/batch_scaling.py --jobs 2        # the main study
    nice -n 10 env PYTHONPATH=. python benchmarks/batch_scaling.py --study early --output_dir outputs/batch_scaling_early
    PYTHONPATH=. python benchmarks/batch_scaling.py --quick --output_dir /tmp/bs   # seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import sysconfig
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, "benchmarks")):  # (_cached_runs, also when imported)
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import extrap_accel  # noqa: E402
from _cached_runs import run_cached  # noqa: E402  (benchmarks/_cached_runs.py)

# ------------------------------------------------------------------------------ the study

SPLIT_SEED = 0
VAL_FRACTION = 0.1
CONTEXT, EMBED, HIDDEN = 16, 16, 256
LOCAL_BATCH = 16
WARMUP = 10
EVAL_EXAMPLES = 4096
MOMENTUM = 0.9
MAX_EXTEND = 3
LR_MULTS = [0.25, 0.5, 1.0, 2.0]

# name: (registry optimizer, momentum, extrap knob tuned)
METHODS = {
    "sgd": ("sgd", 0.0, False),
    "nesterov": ("sgd", MOMENTUM, False),
    "extrap_sgd": ("extrap_sgd", MOMENTUM, True),
    "extrap_sgd_stochastic": ("extrap_sgd_stochastic", MOMENTUM, True),
}
_LR0 = {"sgd": 0.2, "nesterov": 0.02, "extrap_sgd": 0.02, "extrap_sgd_stochastic": 0.02}

# The studies. lr0: γ₀ at K = 1 (γ = K·γ₀ is the centre of the LR grid); scales: the grid of c.
# "main" is the study of docs/scaling.md; "early" is the first, easier target (run first, kept: a
# second data point on how the target moves the scaling limit); "quick" is for the tests.
STUDIES = {
    "main": {
        "rungs": [1, 2, 4, 8, 16, 32, 64],
        "seeds": [0, 1, 2, 3, 4],
        "train_target": 2.30,
        "val_target": 2.35,
        "cap_samples": 120_000,
        "min_cap": 150,
        "lr0": _LR0,
        "scales": [0.5, 1.0, 2.0, 4.0, 8.0],
    },
    "early": {
        "rungs": [1, 2, 4, 8, 16, 32],
        "seeds": [0, 1, 2],
        "train_target": 2.90,
        "val_target": 2.98,
        "cap_samples": 40_000,
        "min_cap": 150,
        "lr0": {m: 4 * v for m, v in _LR0.items()},
        "scales": [0.5, 1.0, 2.0, 4.0],
    },
    "quick": {
        "rungs": [1, 2],
        "seeds": [0],
        "train_target": 3.60,
        "val_target": 3.70,
        "cap_samples": 960,
        "min_cap": 40,
        "lr0": {m: 4 * v for m, v in _LR0.items()},
        "scales": [1.0],
    },
}
FULL, QUICK = STUDIES["main"], STUDIES["quick"]


def step_cap(K: int, cfg: dict) -> int:
    """The step cap at rung K: CAP_SAMPLES examples (the budget of B = b at K = 1), at least min_cap."""
    return max(cfg["min_cap"], math.ceil(cfg["cap_samples"] / (K * LOCAL_BATCH)))


def eval_every(K: int, cfg: dict) -> int:
    return max(1, step_cap(K, cfg) // 100)


def config_tag(cfg: dict) -> str:
    """A hash of everything a cached run depends on (so a changed setup never reuses a run)."""
    blob = json.dumps(
        [
            CONTEXT,
            EMBED,
            HIDDEN,
            LOCAL_BATCH,
            WARMUP,
            EVAL_EXAMPLES,
            SPLIT_SEED,
            VAL_FRACTION,
            cfg["train_target"],
            cfg["val_target"],
            cfg["cap_samples"],
            cfg["min_cap"],
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_id(method: str, K: int, lr: float, c: float | None, seed: int, tag: str) -> str:
    knob = "" if c is None else f"-c{c:g}"
    return f"{method}-K{K}-lr{lr:.6g}{knob}-s{seed}-{tag}"


# ------------------------------------------------------------------------------ data


def stdlib_files() -> tuple[str, list[tuple[str, int]]]:
    """(stdlib root, sorted [(relative path, size)]) of the *.py sources, no site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                if os.path.isfile(path):
                    out.append((os.path.relpath(path, root), os.path.getsize(path)))
    return root, sorted(out)


def manifest() -> dict:
    """The split by file (fixed seed), with the Python version and the file list's sha256."""
    root, files = stdlib_files()
    names = [f for f, _ in files]
    shuffled = names[:]
    random.Random(SPLIT_SEED).shuffle(shuffled)
    val = set(shuffled[: round(VAL_FRACTION * len(names))])
    listing = "".join(f"{f}\t{s}\t{'val' if f in val else 'train'}\n" for f, s in files)
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "stdlib": root,
        "split_seed": SPLIT_SEED,
        "val_fraction": VAL_FRACTION,
        "files": len(files),
        "bytes": sum(s for _, s in files),
        "train_files": len(files) - len(val),
        "val_files": len(val),
        "train_bytes": sum(s for f, s in files if f not in val),
        "val_bytes": sum(s for f, s in files if f in val),
        "sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "listing": [[f, s, "val" if f in val else "train"] for f, s in files],
    }


_DATA: dict = {}


def data() -> dict:
    """The concatenated train and validation byte streams and the fixed evaluation subsets."""
    if not _DATA:
        m = manifest()
        streams = {"train": bytearray(), "val": bytearray()}
        for name, _, split in m["listing"]:
            with open(os.path.join(m["stdlib"], name), "rb") as f:
                streams[split] += f.read() + b"\n"
        gen = torch.Generator().manual_seed(1234)
        for split, raw in streams.items():
            stream = torch.frombuffer(raw, dtype=torch.uint8)
            _DATA[split] = stream
            pos = torch.randint(0, len(stream) - CONTEXT - 1, (EVAL_EXAMPLES,), generator=gen)
            _DATA[f"{split}_eval"] = windows(stream, pos)
        _DATA["manifest"] = m
    return _DATA


_OFFSETS = torch.arange(CONTEXT + 1)


def windows(stream: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = stream[pos[:, None] + _OFFSETS].long()
    return w[:, :CONTEXT], w[:, CONTEXT]


class ByteMLP(nn.Module):
    """Next byte from the previous CONTEXT bytes: embedding, one GELU hidden layer, 256 logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, EMBED)
        self.hidden = nn.Linear(CONTEXT * EMBED, HIDDEN)
        self.out = nn.Linear(HIDDEN, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.hidden(self.embed(x).flatten(1))))


@torch.no_grad()
def anchor_loss(model: nn.Module, split: str) -> float:
    x, y = data()[f"{split}_eval"]
    return float(F.cross_entropy(model(x), y))


# ------------------------------------------------------------------------------ one run


def train_one(spec: dict) -> dict:
    """Train one (method, K, γ, c, seed) until both targets are reached or the cap; save it."""
    torch.set_num_threads(1)
    method, K, lr, c, seed = (spec[k] for k in ("method", "K", "lr", "c", "seed"))
    cfg = spec["cfg"]
    name, momentum, _ = METHODS[method]
    d = data()
    torch.manual_seed(seed)
    model = ByteMLP()
    kwargs = {"lr": lr, "momentum": momentum, "nesterov": momentum > 0}
    if name != "sgd":
        kwargs.update(seed=seed, extrap_scale=c)
    opt = extrap_accel.create_optimizer(name, model.parameters(), **kwargs)
    workers = extrap_accel.VirtualWorkers(model, opt, num_workers=K)
    gen = torch.Generator().manual_seed(seed)  # the same batches for every method at this seed
    high = len(d["train"]) - CONTEXT - 1
    cap, every = step_cap(K, cfg), eval_every(K, cfg)

    def closure(k):
        x, y = windows(d["train"], torch.randint(0, high, (LOCAL_BATCH,), generator=gen))
        return F.cross_entropy(model(x), y)

    evals = [[0, anchor_loss(model, "train"), anchor_loss(model, "val")]]
    reached = {"train": None, "val": None}
    status, start = "cap", time.perf_counter()
    for t in range(cap):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (t + 1) / WARMUP)
        losses = workers.step(closure)
        step = t + 1
        if not all(math.isfinite(float(v)) for v in losses):
            status = "diverged"
            break
        if step % every == 0 or step == cap:
            tr, va = anchor_loss(model, "train"), anchor_loss(model, "val")
            evals.append([step, tr, va])
            if not (math.isfinite(tr) and tr < 20):
                status = "diverged"
                break
            for split, value in (("train", tr), ("val", va)):
                if reached[split] is None and value <= cfg[f"{split}_target"]:
                    reached[split] = step
            if reached["train"] is not None and reached["val"] is not None:
                status = "reached"
                break
    seconds = time.perf_counter() - start
    result = {
        "id": spec["id"],
        "method": method,
        "K": K,
        "B": K * LOCAL_BATCH,
        "lr": lr,
        "c": c,
        "seed": seed,
        "cap": cap,
        "eval_every": every,
        "status": status,
        "steps_to_train": reached["train"],
        "steps_to_val": reached["val"],
        "steps_run": evals[-1][0] if status != "diverged" else step,
        "final_train": evals[-1][1],
        "final_val": evals[-1][2],
        "evals": evals,
        "seconds": seconds,
    }
    for key in ("final_train", "final_val"):
        if not math.isfinite(result[key]):
            result[key] = None
    path = spec["path"]
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    return result


# ------------------------------------------------------------------------------ orchestration


def run_all(specs: list[dict], jobs: int, log) -> dict[str, dict]:
    """Train the specs whose JSON is not cached yet (largest K first); return all records by id."""

    def describe(r: dict) -> str:
        return (f"{r['status']}, train target at {r['steps_to_train']}, "
                f"val at {r['steps_to_val']}, {r['seconds']:.1f} s")

    return run_cached(specs, train_one, jobs, log, describe, order=lambda s: -s["K"])


def rank(r: dict) -> tuple:
    """Smaller is better: reached (fewer steps, then lower final training-subset loss) before
    not reached (lower final loss first) before diverged."""
    if r["status"] == "diverged" or r["final_train"] is None:
        return (2, math.inf, math.inf)
    if r["steps_to_train"] is None:
        return (1, math.inf, r["final_train"])
    return (0, r["steps_to_train"], r["final_train"])


def mean_std(values: list) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return (
        statistics.fmean(values),
        (statistics.stdev(values) if len(values) > 1 else 0.0),
        len(values),
    )


def study(args, cfg: dict, log) -> dict:
    tag = config_tag(cfg)
    runs_dir = os.path.join(args.output_dir, "runs")
    seeds = cfg["seeds"]
    mults = [1.0] if args.study == "quick" else LR_MULTS
    scales = cfg["scales"]
    max_extend = 0 if args.study == "quick" else MAX_EXTEND

    def spec(method, K, lr, c, seed):
        rid = run_id(method, K, lr, c, seed, tag)
        return {
            "id": rid,
            "method": method,
            "K": K,
            "lr": lr,
            "c": c,
            "seed": seed,
            "cfg": cfg,
            "path": os.path.join(runs_dir, rid + ".json"),
        }

    cells = [(m, K) for K in cfg["rungs"] for m in args.methods]
    knob = {m: (1.0 if METHODS[m][2] else None) for m in args.methods}
    lin = {(m, K): K * cfg["lr0"][m] for m, K in cells}
    lrs = {cell: [lin[cell] * x for x in mults] for cell in cells}
    results: dict[str, dict] = {}
    # stage 1: the LR grids (seed 0), extended while the best point sits on an edge
    for round_ in range(max_extend + 1):
        specs = [spec(m, K, lr, knob[m], seeds[0]) for (m, K) in cells for lr in lrs[(m, K)]]
        results.update(run_all(specs, args.jobs, log))
        grown = False
        for m, K in cells:
            grid = sorted(lrs[(m, K)])
            runs = [results[spec(m, K, lr, knob[m], seeds[0])["id"]] for lr in grid]
            best = min(range(len(grid)), key=lambda i: rank(runs[i]))
            if round_ == max_extend:
                continue
            if best == len(grid) - 1:
                lrs[(m, K)] = grid + [grid[-1] * 2]
                grown = True
            elif best == 0:
                lrs[(m, K)] = [grid[0] / 2] + grid
                grown = True
        if not grown:
            break
    chosen = {}
    for m, K in cells:
        grid = sorted(lrs[(m, K)])
        runs = [results[spec(m, K, lr, knob[m], seeds[0])["id"]] for lr in grid]
        best = min(range(len(grid)), key=lambda i: rank(runs[i]))
        edge = "" if len(grid) < 2 or 0 < best < len(grid) - 1 else ("low" if best == 0 else "high")
        chosen[(m, K)] = {"lr": grid[best], "c": knob[m], "lr_edge": edge, "lr_grid": grid}
    # stage 2: the extrapolation knob at the selected γ, extended (×2 or ×½) while the edge value
    # is strictly better than its neighbour (a tie, e.g. c has no effect at K = 1, extends nothing)
    knobs = {cell: list(scales) for cell in cells if METHODS[cell[0]][2]}
    for round_ in range(max_extend + 1):
        specs = [
            spec(m, K, chosen[(m, K)]["lr"], c, seeds[0]) for (m, K) in knobs for c in knobs[(m, K)]
        ]
        results.update(run_all(specs, args.jobs, log))
        grown = False
        for (m, K), grid in knobs.items():
            grid = sorted(grid)
            ranks = [
                rank(results[spec(m, K, chosen[(m, K)]["lr"], c, seeds[0])["id"]]) for c in grid
            ]
            best = min(range(len(grid)), key=lambda i: ranks[i])
            if round_ == max_extend or len(grid) < 2:
                continue
            if best == len(grid) - 1 and ranks[-1] < ranks[-2]:
                knobs[(m, K)] = grid + [grid[-1] * 2]
                grown = True
            elif best == 0 and ranks[0] < ranks[1]:
                knobs[(m, K)] = [grid[0] / 2] + grid
                grown = True
        if not grown:
            break
    for (m, K), grid in knobs.items():
        grid = sorted(grid)
        ranks = [rank(results[spec(m, K, chosen[(m, K)]["lr"], c, seeds[0])["id"]]) for c in grid]
        best = min(range(len(grid)), key=lambda i: ranks[i])
        chosen[(m, K)]["c"] = grid[best]
        chosen[(m, K)]["c_grid"] = grid
        chosen[(m, K)]["c_edge"] = (
            "" if len(grid) < 2 or 0 < best < len(grid) - 1 else ("low" if best == 0 else "high")
        )
    # stage 3: the other seeds at the selected point
    specs = [
        spec(m, K, chosen[(m, K)]["lr"], chosen[(m, K)]["c"], s) for (m, K) in cells for s in seeds
    ]
    results.update(run_all(specs, args.jobs, log))
    rows = {}
    for m, K in cells:
        ch = chosen[(m, K)]
        runs = [results[spec(m, K, ch["lr"], ch["c"], s)["id"]] for s in seeds]
        rows[f"{m}|{K}"] = {
            "method": m,
            "K": K,
            "B": K * LOCAL_BATCH,
            "cap": step_cap(K, cfg),
            **ch,
            "lr_over_linear": ch["lr"] / lin[(m, K)],
            "train": mean_std([r["steps_to_train"] for r in runs]),
            "val": mean_std([r["steps_to_val"] for r in runs]),
            "train_steps_by_seed": [r["steps_to_train"] for r in runs],
            "val_steps_by_seed": [r["steps_to_val"] for r in runs],
            "seeds": seeds,
        }
    tuning = [r for r in results.values() if r["id"].endswith(tag)]
    cpu_seconds = sum(r["seconds"] for r in tuning)
    return {
        "rows": rows,
        "tag": tag,
        "runs": len(tuning),
        "train_seconds": cpu_seconds,
        "all_runs": sorted(
            tuning, key=lambda r: (r["method"], r["K"], r["lr"], r["c"] or 0, r["seed"])
        ),
    }


# ------------------------------------------------------------------------------ report


def _ms(stat, digits=0) -> str:
    mean, std, n = stat
    if mean is None:
        return "not reached"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _c(c) -> str:
    return "—" if c is None else f"{c:g}"


def markdown(res: dict, cfg: dict, args, methods: list[str]) -> str:
    rows = res["rows"]
    lines = []
    for split, label in (
        ("train", f"training-subset loss ≤ {cfg['train_target']}"),
        ("val", f"validation-subset loss ≤ {cfg['val_target']}"),
    ):
        lines += [
            f"### Steps to target: anchor {label} (mean ± std over seeds; reached/seeds)",
            "",
            "| K | B | cap | " + " | ".join(methods) + " |",
            "|---|---|---|" + "---|" * len(methods),
        ]
        for K in cfg["rungs"]:
            cells = []
            for m in methods:
                row = rows[f"{m}|{K}"]
                cells.append(f"{_ms(row[split])} ({row[split][2]}/{len(row['seeds'])})")
            lines.append(
                f"| {K} | {K * LOCAL_BATCH} | {step_cap(K, cfg)} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    lines += [
        "### Scaling efficiency on the training target: steps(K=1) / (K · steps(K)) (1 = perfect)",
        "",
        "| K | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for K in cfg["rungs"]:
        cells = []
        for m in methods:
            s1, sk = rows[f"{m}|{cfg['rungs'][0]}"]["train"][0], rows[f"{m}|{K}"]["train"][0]
            base = cfg["rungs"][0]
            cells.append("—" if s1 is None or sk is None else f"{s1 * base / (K * sk):.2f}")
        lines.append(f"| {K} | " + " | ".join(cells) + " |")
    if "nesterov" in methods:
        lines += [
            "",
            "### Paired with Nesterov at the same seed (same initialization and batches): "
            "steps(method) / steps(nesterov), training target, mean ± std over seeds "
            "(< 1: fewer steps than Nesterov)",
            "",
            "| K | " + " | ".join(m for m in methods if m != "nesterov") + " |",
            "|---|" + "---|" * (len(methods) - 1),
        ]
        for K in cfg["rungs"]:
            ref = rows[f"nesterov|{K}"]["train_steps_by_seed"]
            cells = []
            for m in methods:
                if m != "nesterov":
                    own = rows[f"{m}|{K}"]["train_steps_by_seed"]
                    ratios = [a / b for a, b in zip(own, ref) if a is not None and b is not None]
                    cells.append(_ms(mean_std(ratios), 2) + f" ({len(ratios)})")
            lines.append(f"| {K} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Selected points (tuned on seed 0 for the training target)",
        "",
        "| method | K | γ | γ / (K·γ₀) | LR grid tried | LR on edge | extrap_scale c | c grid tried | c on edge |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        for K in cfg["rungs"]:
            row = rows[f"{m}|{K}"]
            grid = ", ".join(f"{x:.4g}" for x in row["lr_grid"])
            lines.append(
                f"| {m} | {K} | {row['lr']:.4g} | {row['lr_over_linear']:.3g} | {grid} "
                f"| {row['lr_edge'] or 'interior'} | {_c(row['c'])} "
                f"| {', '.join(_c(c) for c in row.get('c_grid', [])) or '—'} "
                f"| {'—' if row['c'] is None else (row.get('c_edge') or 'interior')} |"
            )
    lines += [
        "",
        "<details><summary>Every run (steps to the training / validation target, "
        "status, final anchor losses)</summary>",
        "",
        "| method | K | γ | c | seed | train target at | val target at | status | steps run "
        "| final train | final val | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["all_runs"]:
        ft = "—" if r["final_train"] is None else f"{r['final_train']:.3f}"
        fv = "—" if r["final_val"] is None else f"{r['final_val']:.3f}"
        lines.append(
            f"| {r['method']} | {r['K']} | {r['lr']:.4g} | {_c(r['c'])} "
            f"| {r['seed']} | {r['steps_to_train'] or '—'} | {r['steps_to_val'] or '—'} "
            f"| {r['status']} | {r['steps_run']} | {ft} | {fv} | {r['seconds']:.1f} |"
        )
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def plot(res: dict, cfg: dict, methods: list[str], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, split in zip(axes, ("train", "val")):
        for i, m in enumerate(methods):
            pts = [
                (rows[f"{m}|{K}"]["B"] * (1 + 0.03 * (i - 1.5)), rows[f"{m}|{K}"][split])
                for K in cfg["rungs"]
                if rows[f"{m}|{K}"][split][0] is not None
            ]
            if pts:  # open markers: the mean of the seeds that reached the target, not all did
                full = [
                    rows[f"{m}|{K}"][split][2] == len(cfg["seeds"])
                    for K in cfg["rungs"]
                    if rows[f"{m}|{K}"][split][0] is not None
                ]
                ax.scatter(
                    [p[0] for p, f in zip(pts, full) if not f],
                    [p[1][0] for p, f in zip(pts, full) if not f],
                    s=60,
                    facecolors="none",
                    edgecolors="k",
                    zorder=3,
                )
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1][0] for p in pts],
                    yerr=[p[1][1] for p in pts],
                    marker="o",
                    ms=4,
                    capsize=3,
                    label=m,
                )
        ref = rows.get(f"nesterov|{cfg['rungs'][0]}", rows[f"{methods[0]}|{cfg['rungs'][0]}"])
        if ref[split][0] is not None:
            bs = [K * LOCAL_BATCH for K in cfg["rungs"]]
            ax.plot(
                bs,
                [ref[split][0] * bs[0] / b for b in bs],
                "k:",
                lw=1,
                label="perfect scaling from Nesterov at K=1",
            )
        caps = [step_cap(K, cfg) for K in cfg["rungs"]]
        ax.plot(
            [K * LOCAL_BATCH for K in cfg["rungs"]],
            caps,
            color="0.7",
            lw=1,
            ls="--",
            label="step cap",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"global batch B = K·{LOCAL_BATCH}")
        ax.set_ylabel(
            "steps to target (mean ± std over seeds;\ncircled: not every seed reached it)"
        )
        ax.set_title(
            f"anchor {'training' if split == 'train' else 'validation'}-subset loss ≤ "
            f"{cfg[split + '_target']}"
        )
        ax.legend(fontsize=7)
    fig.suptitle(
        "byte-level MLP LM on the CPython stdlib: steps to target vs global batch", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="= --study quick: K = 1, 2; one γ and c; 1 seed"
    )
    parser.add_argument(
        "--study",
        default="main",
        choices=list(STUDIES),
        help="main (docs/scaling.md), early (an easier target), quick",
    )
    parser.add_argument("--output_dir", default=os.path.join("outputs", "batch_scaling"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--rungs", nargs="+", type=int, default=None, help="the K ladder (default: the study's)"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="default: the study's (main: 0..4); the first tunes",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs trained in parallel, one thread each",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.study = "quick"
    cfg = dict(STUDIES[args.study])
    if args.rungs:
        cfg["rungs"] = sorted(args.rungs)
    if args.seeds:
        cfg["seeds"] = args.seeds
    os.makedirs(os.path.join(args.output_dir, "runs"), exist_ok=True)
    os.makedirs(os.path.join(args.output_dir, "plots"), exist_ok=True)
    log = lambda msg: print(f"[batch_scaling {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    start = time.perf_counter()
    m = data()["manifest"]
    with open(os.path.join(args.output_dir, "data.json"), "w") as f:
        json.dump(m, f, indent=0)
    res = study(args, cfg, log)
    methods = args.methods
    png = plot(res, cfg, methods, os.path.join(args.output_dir, "plots", "steps_vs_batch.png"))
    params = sum(p.numel() for p in ByteMLP().parameters())
    machine = (
        f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}"
    )
    command = "python benchmarks/batch_scaling.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    header = [
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {machine}; {args.jobs} runs in parallel, 1 thread each.",
        "",
        f"Data: CPython {m['python']} stdlib, {m['files']} *.py files ({m['bytes']:,} bytes; sha256 of the "
        f"listing {m['sha256'][:16]}…), split by file (seed {SPLIT_SEED}): train {m['train_files']} files / "
        f"{m['train_bytes']:,} bytes, validation {m['val_files']} files / {m['val_bytes']:,} bytes.",
        "",
        f"Model: byte MLP, context {CONTEXT}, embedding {EMBED}, hidden {HIDDEN}: {params:,} parameters. "
        f"Local batch b = {LOCAL_BATCH}; warmup {WARMUP} steps then constant γ; anchor evaluated on "
        f"{EVAL_EXAMPLES} fixed training / validation positions every max(1, cap/100) steps; "
        f"cap = max({cfg['min_cap']}, {cfg['cap_samples']:,} / B) steps.",
        "",
        f"Rungs K = {cfg['rungs']}; seeds {cfg['seeds']}; {res['runs']} runs, "
        f"{res['train_seconds'] / 60:.1f} CPU-minutes of training (sum over runs).",
        "",
    ]
    text = "\n".join(header) + markdown(res, cfg, args, methods)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(
            {
                "command": command,
                "machine": machine,
                "cfg": cfg,
                "tag": res["tag"],
                "runs": res["runs"],
                "train_seconds": res["train_seconds"],
                "rows": res["rows"],
            },
            f,
            indent=1,
        )
    log(f"done in {time.perf_counter() - start:.0f} s: {args.output_dir}/results.md, {png}")
    print(text)
    return {
        "rows": res["rows"],
        "plot": png,
        "results_md": os.path.join(args.output_dir, "results.md"),
        "runs": res["runs"],
    }


if __name__ == "__main__":
    main()
