"""Reproduce the paper's large-batch comparison on the embedded data sets, with one command.

Lin, Kong, Stich, Jaggi (ICML 2020), "Extrapolation for Large-batch Training in Deep Learning":
mini-batch SGD against extrap-SGD and the variants of the unified framework, with K = 8 data-parallel
workers simulated in one process by ``extrap_accel.VirtualWorkers``.

Tasks (both on data that ships with the environment, nothing is downloaded):

* ``vision``: ResNet-20 at width 0.5 (8/16/32 channels, 68k parameters) on scikit-learn's digits
  (the recipe's 1497/300 train/test split; 300 of the 1497 held out for validation), images
  average-pooled to 16×16 (the originals are 8×8), random-crop augmentation (pad 2, no flip).
  Local batch b = 32, global batch B = 256 = 21% of the 1197 training images (4 steps/epoch).
* ``lm``: 2-layer LSTM (128 units, dropout 0.2) on CPython's pydoc topics (the recipe's 90/5/5
  split), word level, 2000-word vocabulary; the first 20 000 training tokens. Each worker has
  4 of the 32 rows of the stream, BPTT 25: 800 tokens per global batch (4% of the training
  tokens, 25 steps/epoch). The averaged gradient is clipped at norm 0.5 and so is extrap-SGD's
  local direction (``extrap_max_norm``).

Methods (Nesterov momentum 0.9; weight decay 5e-4 on the weights, none on 1-D tensors (vision),
none for the LM; learning rate γ = K·γ₀ (linear scaling from the local batch), warmed up linearly
from γ₀ over the first 10% of the steps, then ×0.1 at 50% and 75% of the steps, or constant for the
``*_nodecay`` rows):

* ``sgd`` / ``sgd_nodecay``: mini-batch SGD (``torch.optim.SGD``), every worker at the anchor;
* ``extrap_sgd`` / ``extrap_sgd_nodecay``: extrap-SGD (Algorithm 1), γ̃ = c·γ/K, c = extrap_scale;
* ``extrap_sgd_gaussian``: x̃ = x + N(0, σ²); ``extrap_sgd_filterwise``: uniform filter-wise noise
  (adaptive SmoothOut), a = noise_scale·‖Wᵢ‖/√nᵢ; ``extrap_sgd_stochastic``: x̃ = x − γ̃(gᵏ − g);
* ``extrap_sgd_postlocal``: Algorithm 2, simulated: extrap-SGD until the first LR decay (50% of the
  steps); from then on every virtual worker owns a copy of the model and of the optimizer state
  (its anchor, its momentum buffer copied from the global one, its own x̃ and local extrapolation
  momentum carried over) and an ``ExtrapSGD(world_size=1, extrap_scale=c/K)`` — so γ̃ stays c·γ/K —
  takes local steps on its own batches; every H = 4 local steps (and after the last step) the
  anchors are averaged (x̃ moves with its anchor, ``move_anchor_``) together with the BatchNorm
  running statistics. The anchor average is what is evaluated.

Tuning: every grid point of every method is trained with the first seed; the point with the best
*validation* metric (accuracy, perplexity) is selected and trained with the other seeds; the tables
report the test metric of the selected points (mean ± std over seeds) and the whole grid.

Output (``--output_dir``, default ``outputs/reproduce``): ``runs/*.json`` (one per finished run:
the resume cache — finished runs are never trained again), ``results.json``, ``results.md`` (the
tables) and ``plots/{task}_curves.png``, ``plots/{task}_smoothness.png``.

    PYTHONPATH=. python benchmarks/reproduce.py                       # full: 2 seeds, the grids below
    PYTHONPATH=. python benchmarks/reproduce.py --quick               # a few minutes
    PYTHONPATH=. python benchmarks/reproduce.py --tasks vision --seeds 0 1 2 --steps 100
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The recipes import their helpers as a top-level ``common`` module: put recipes/ on the path
# (and benchmarks/, for _cached_runs, also when this file is imported from elsewhere).
for _path in (REPO, os.path.join(REPO, "recipes"), os.path.join(REPO, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import extrap_accel  # noqa: E402
from _cached_runs import run_cached  # noqa: E402  (benchmarks/_cached_runs.py)
import common  # noqa: E402  (recipes/common.py)
import language_model as lm_recipe  # noqa: E402  (recipes/language_model.py)
import vision as vision_recipe  # noqa: E402  (recipes/vision.py)

K = 8
MOMENTUM = 0.9
POST_LOCAL_H = 4

# ------------------------------------------------------------------------------ the experiment

TASKS = {
    "vision": {"steps": 60, "quick_steps": 12, "lr0": [0.0125, 0.025, 0.05, 0.1], "metric": "accuracy",
               "weight_decay": 5e-4, "clip": None},
    "lm": {"steps": 100, "quick_steps": 16, "lr0": [0.25, 0.5, 1.0], "metric": "perplexity",
           "weight_decay": 0.0, "clip": 0.5},
}  # fmt: skip

EXTRAP_SCALES = [1.0, 2.0]
NOISE = {"extrap_sgd_gaussian": [0.005, 0.02], "extrap_sgd_filterwise": [0.02, 0.1]}

# name: (registry optimizer, LR decay, the extra hyper-parameter tuned and its grid, post-local)
METHODS = {
    "sgd": ("sgd", True, None, None, False),
    "sgd_nodecay": ("sgd", False, None, None, False),
    "extrap_sgd": ("extrap_sgd", True, "extrap_scale", EXTRAP_SCALES, False),
    "extrap_sgd_nodecay": ("extrap_sgd", False, "extrap_scale", EXTRAP_SCALES, False),
    "extrap_sgd_gaussian": ("extrap_sgd_gaussian", True, "noise_scale", NOISE["extrap_sgd_gaussian"], False),
    "extrap_sgd_filterwise": ("extrap_sgd_filterwise", True, "noise_scale", NOISE["extrap_sgd_filterwise"], False),
    "extrap_sgd_stochastic": ("extrap_sgd_stochastic", True, "extrap_scale", EXTRAP_SCALES, False),
    "extrap_sgd_postlocal": ("extrap_sgd", True, "extrap_scale", [1.0], True),
}  # fmt: skip


def grid(task: str, method: str, quick: bool) -> list[dict]:
    """The grid points of ``method`` on ``task``: dicts of lr0 and the extra hyper-parameter."""
    _, _, key, values, _ = METHODS[method]
    lrs = TASKS[task]["lr0"]
    if quick:  # the middle LR and the first value of the extra grid
        lrs, values = [lrs[len(lrs) // 2]], (values[:1] if values else values)
    points = []
    for lr0 in lrs:
        for v in values or [None]:
            points.append({"lr0": lr0, **({key: v} if key else {})})
    return points


def run_id(task: str, method: str, point: dict, seed: int, steps: int) -> str:
    extra = "".join(f"-{k}{v:g}" for k, v in sorted(point.items()) if k != "lr0")
    return f"{task}-{method}-lr{point['lr0']:g}{extra}-s{seed}-n{steps}"


# ------------------------------------------------------------------------------ data

_DATA: dict[str, dict] = {}


def vision_data() -> dict:
    if "vision" not in _DATA:
        x, y, test_x, test_y, _ = vision_recipe._digits()  # the recipe's fixed 1497/300 split
        x, test_x = (F.avg_pool2d(t.float(), 2).round().to(torch.uint8) for t in (x, test_x))
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
        val, train = perm[:300], perm[300:]
        mean = x[train].float().div(255).mean((0, 2, 3))
        std = x[train].float().div(255).std((0, 2, 3))
        _DATA["vision"] = {
            "train": (x[train], y[train]), "val": (x[val], y[val]), "test": (test_x, test_y),
            "pre": vision_recipe.Preprocess(mean, std, pad=2, hflip=False),
        }  # fmt: skip
    return _DATA["vision"]


LM_TRAIN_TOKENS, LM_VOCAB, LM_ROWS, LM_BPTT, LM_HIDDEN = 20_000, 2000, 4, 25, 128


def lm_data() -> dict:
    if "lm" not in _DATA:
        splits = lm_recipe._pydoc_topics()
        vocab = lm_recipe.Vocabulary.build(splits["train"], "word", max_vocab=LM_VOCAB)
        train = vocab.encode(splits["train"])[:LM_TRAIN_TOKENS]
        _DATA["lm"] = {
            "vocab": len(vocab),
            "train": [lm_recipe.batchify(train, LM_ROWS, k, K) for k in range(K)],
            "train_eval": lm_recipe.batchify(train, K * LM_ROWS, 0, 1),
            "val": lm_recipe.batchify(vocab.encode(splits["validation"]), 8, 0, 1),
            "test": lm_recipe.batchify(vocab.encode(splits["test"]), 8, 0, 1),
        }
    return _DATA["lm"]


# ------------------------------------------------------------------------------ task adapters


class VisionTask:
    def __init__(self, seed: int):
        self.d = vision_data()
        self.n = len(self.d["train"][1])
        self.b = 32
        self.steps_per_epoch = self.n // (K * self.b)
        self.seed = seed

    def model(self):
        return vision_recipe.ResNetCifar(20, 10, width=0.5)

    def loss(self, model, k: int, t: int, slot=None):
        epoch, i = divmod(t, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        idx = perm[(i * K + k) * self.b : (i * K + k + 1) * self.b]
        x, y = self.d["train"]
        images = self.d["pre"](x[idx], common.step_generator(self.seed, t, k))
        return F.cross_entropy(model(images), y[idx])

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict:
        model.eval()
        x, y = self.d[split]
        loss = correct = 0.0
        for i in range(0, len(y), 256):
            logits = model(self.d["pre"](x[i : i + 256]))
            loss += float(F.cross_entropy(logits, y[i : i + 256], reduction="sum"))
            correct += float((logits.argmax(-1) == y[i : i + 256]).sum())
        model.train()
        return {"loss": loss / len(y), "accuracy": correct / len(y)}


class LMTask:
    def __init__(self, seed: int):
        self.d = lm_data()
        self.windows = (self.d["train"][0].shape[1] - 1) // LM_BPTT
        self.hidden: dict = {}
        self.seed = seed

    def model(self):
        return lm_recipe.LSTMLanguageModel(self.d["vocab"], LM_HIDDEN, LM_HIDDEN, 2, dropout=0.2)

    def loss(self, model, k: int, t: int, slot=None):
        i = (t % self.windows) * LM_BPTT
        key = (k, slot)
        if i == 0:
            self.hidden.pop(key, None)  # a new pass over the stream
        inputs, targets = lm_recipe._window(self.d["train"][k], i, LM_BPTT)
        logits, hidden = model(inputs, self.hidden.get(key))
        self.hidden[key] = tuple(h.detach() for h in hidden)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict:
        model.eval()
        data = self.d["train_eval" if split == "train" else split]
        hidden, total, count = None, 0.0, 0
        for i in range(0, data.shape[1] - 1, LM_BPTT):
            inputs, targets = lm_recipe._window(data, i, LM_BPTT)
            logits, hidden = model(inputs, hidden)
            total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            count += targets.numel()
        model.train()
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# ------------------------------------------------------------------------------ one run


class Smoothness:
    """‖gᵏ_t − gᵏ_{t−1}‖ / ‖x̃ᵏ_t − x̃ᵏ_{t−1}‖ per worker k (its own gradient at its own point)."""

    def __init__(self):
        self.prev: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, k: int, grad: torch.Tensor, point: torch.Tensor) -> float | None:
        out = None
        if k in self.prev:
            dx = float((point - self.prev[k][1]).norm())
            out = float((grad - self.prev[k][0]).norm()) / dx if dx > 0 else None
        self.prev[k] = (grad, point)
        return out


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _with_clipping(optimizer, params, max_norm):
    """Clip the averaged gradient (what the base update sees) right before ``optimizer.step``."""
    if max_norm is None:
        return
    step = optimizer.step

    def clipped_step(*args, **kwargs):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return step(*args, **kwargs)

    optimizer.step = clipped_step


def build_optimizer(task: str, method: str, point: dict, model, seed: int, peak: float, **extra):
    cfg = TASKS[task]
    name = METHODS[method][0]
    groups = common.param_groups_weight_decay(model, cfg["weight_decay"])
    kwargs = {"lr": peak, "momentum": MOMENTUM, "nesterov": True, **extra}
    if name != "sgd":
        kwargs["seed"] = seed
        for key in ("extrap_scale", "noise_scale"):
            if key in point:
                kwargs[key] = point[key]
        if name == "extrap_sgd" and cfg["clip"] is not None:
            kwargs["extrap_max_norm"] = cfg["clip"]
        if "extrap_scale" in extra:  # post-local phase 2 overrides
            kwargs["extrap_scale"] = extra["extrap_scale"]
    return extrap_accel.create_optimizer(name, groups, **kwargs)


def train_one(spec: dict) -> dict:
    """Train one (task, method, grid point, seed) and return its record (also written to disk)."""
    torch.set_num_threads(spec.get("threads", 1))
    task, method, point, seed, steps = (spec[k] for k in ("task", "method", "point", "seed", "steps"))
    cfg = TASKS[task]
    _, decay, _, _, post_local = METHODS[method]
    torch.manual_seed(seed)
    adapter = VisionTask(seed) if task == "vision" else LMTask(seed)
    model = adapter.model()
    peak = K * point["lr0"]
    warmup = max(1, steps // 10)
    milestones = (0.5, 0.75) if decay else ()
    lr_at = lambda t: common.warmup_step_decay_lr(  # noqa: E731
        t, peak_lr=peak, total_steps=steps, warmup_steps=warmup, warmup_init_lr=point["lr0"],
        milestones=milestones)  # fmt: skip
    switch = round(0.5 * steps) if post_local else None

    opt = build_optimizer(task, method, point, model, seed, peak)
    params = [p for g in opt.param_groups for p in g["params"]]
    _with_clipping(opt, params, cfg["clip"])
    workers = extrap_accel.VirtualWorkers(model, opt, num_workers=K)

    # per-worker gradients (hooks) and points (read when the closure runs: p holds x̃ᵏ)
    current = {"k": 0}
    grads: dict[int, list] = {}
    points: dict[int, torch.Tensor] = {}
    index = {p: i for i, p in enumerate(params)}

    def hook(p):
        grads.setdefault(current["k"], [None] * len(params))[index[p]] = p.grad.detach().clone()

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params]

    def closure(k, t):
        current["k"] = k
        points[k] = _flat(params)
        return adapter.loss(model, k, t)

    meter = Smoothness()
    history = {"loss": [], "lr": [], "smoothness": []}
    local: list[tuple] = []  # post-local phase 2: (model, optimizer, params) per worker
    start = time.perf_counter()
    for t in range(steps):
        lr = lr_at(t)
        if switch is not None and t == switch:
            for h in handles:
                h.remove()
            local = _start_local_phase(task, method, point, model, opt, workers, seed, lr)
        values, losses = [], []
        if not local:
            common.set_lr(opt, lr)
            losses = [float(v) for v in workers.step(lambda k: closure(k, t))]
            for k in range(K):
                values.append(meter.update(k, _flat(grads[k]), points[k]))
        else:
            for k, (m_k, o_k, p_k) in enumerate(local):
                common.set_lr(o_k, lr)
                o_k.zero_grad()
                point_k = _flat(p_k)
                loss = adapter.loss(m_k, k, t, slot="local")
                loss.backward()
                values.append(meter.update(k, _flat([p.grad for p in p_k]), point_k))
                if cfg["clip"] is not None:
                    torch.nn.utils.clip_grad_norm_(p_k, cfg["clip"])
                o_k.step()
                losses.append(float(loss.detach()))
            if (t - switch + 1) % POST_LOCAL_H == 0 or t == steps - 1:
                _average_anchors(local)
        history["loss"].append(sum(losses) / K)
        history["lr"].append(lr)
        ok = [v for v in values if v is not None and math.isfinite(v)]
        history["smoothness"].append(sum(ok) / len(ok) if len(ok) == len(values) and ok else None)
        if not math.isfinite(history["loss"][-1]):
            break  # diverged
    seconds_per_step = (time.perf_counter() - start) / max(1, len(history["loss"]))
    if local:  # the model to evaluate: the averaged anchors (equal on all workers after averaging)
        m0, o0, p0 = local[0]
        with torch.no_grad():
            for p, q in zip(params, p0):
                p.copy_(o0.anchor(q))
            for b, b0 in zip(model.buffers(), m0.buffers()):
                b.copy_(b0)
    result = {"id": spec["id"], "task": task, "method": method, "point": point, "seed": seed,
              "steps": steps, "seconds_per_step": seconds_per_step, "history": history,
              "diverged": not all(math.isfinite(v) for v in history["loss"]) or
                          len(history["loss"]) < steps}  # fmt: skip
    for split in ("train", "val", "test"):
        metrics = adapter.evaluate(model, split) if not result["diverged"] else {}
        for key in ("loss", cfg["metric"]):
            value = metrics.get(key, float("nan"))
            result[f"{split}_{key}"] = value if math.isfinite(value) else None
    path = spec["path"]
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    return result


def _start_local_phase(task, method, point, model, opt, workers, seed, lr):
    """Algorithm 2, phase 2: a model + ExtrapSGD(world_size=1) per worker, state carried over."""
    params = [p for g in opt.param_groups for p in g["params"]]
    c = point.get("extrap_scale", 1.0)
    local = []
    for k in range(K):
        m_k = copy.deepcopy(model)  # holds the anchor x
        o_k = build_optimizer(task, method, point, m_k, seed * 1000 + k, lr,
                              extrap_scale=c / K, world_size=1)  # γ̃ = (c/K)·γ/1 = c·γ/K
        p_k = [p for g in o_k.param_groups for p in g["params"]]
        with torch.no_grad():
            for p_old, p_new, x_tilde in zip(params, p_k, workers.points[k]):
                state = o_k.state[p_new]
                buf = opt.state.get(p_old, {}).get("momentum_buffer")
                if buf is not None:
                    state["momentum_buffer"] = buf.clone()
                ubuf = workers.local_state[k].get(p_old, {}).get("extrap_momentum_buffer")
                if ubuf is not None:
                    state["extrap_momentum_buffer"] = ubuf.clone()
                o_k.core.ensure_anchor(p_new)  # the model holds the anchor x now
                p_new.copy_(x_tilde)  # train mode: the parameters hold x̃ᵏ
        _with_clipping(o_k, p_k, None)
        local.append((m_k, o_k, p_k))
    return local


@torch.no_grad()
def _average_anchors(local) -> None:
    """The anchors (never x̃) averaged over the workers; each x̃ moves with its anchor."""
    for i in range(len(local[0][2])):
        avg = torch.stack([o.anchor(p[i]) for _, o, p in local]).mean(0)
        for _, o, p in local:
            p[i].copy_(o.move_anchor_(p[i], avg))
    buffers = [list(m.buffers()) for m, _, _ in local]
    for j in range(len(buffers[0])):
        if buffers[0][j].is_floating_point():
            avg = torch.stack([b[j] for b in buffers]).mean(0)
            for b in buffers:
                b[j].copy_(avg)


# ------------------------------------------------------------------------------ orchestration


def run_all(specs: list[dict], jobs: int, log) -> dict[str, dict]:
    """Train the specs whose JSON is not in the cache yet; return all records by id."""

    def describe(r: dict) -> str:
        metric = TASKS[r["task"]]["metric"]
        return f"val {metric} {_fmt(r['val_' + metric])}, {r['seconds_per_step']:.3f} s/step"

    return run_cached(specs, train_one, jobs, log, describe)


def _better(task: str, a: dict, b: dict | None) -> bool:
    if b is None:
        return True
    metric = TASKS[task]["metric"]
    va, vb = a[f"val_{metric}"], b[f"val_{metric}"]
    if va is None:
        return False
    if vb is None:
        return True
    if metric == "accuracy":
        return (va, -a["val_loss"]) > (vb, -b["val_loss"])
    return va < vb


def _fmt(v, digits=3):
    return "—" if v is None else f"{v:.{digits}f}"


def smoothed(losses: list[float], window: int = 5) -> list[float]:
    return [sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(losses))]  # fmt: skip


def steps_to(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(task: str, selected: dict[str, list[dict]]) -> dict:
    metric = TASKS[task]["metric"]
    best = {m: [min(smoothed(r["history"]["loss"])) for r in runs] for m, runs in selected.items()}
    finite = [mean_std(v)[0] for v in best.values() if mean_std(v)[0] is not None]
    target = 1.1 * max(finite) if finite else None  # a loss every tuned method reaches
    rows = {}
    for method, runs in selected.items():
        reach = [steps_to(smoothed(r["history"]["loss"]), target) for r in runs]
        rows[method] = {
            "point": runs[0]["point"],
            "seeds": [r["seed"] for r in runs],
            "final_train_loss": mean_std([r["train_loss"] for r in runs]),
            "final_minibatch_loss": mean_std([smoothed(r["history"]["loss"])[-1] for r in runs]),
            "best_minibatch_loss": mean_std(best[method]),
            f"test_{metric}": mean_std([r[f"test_{metric}"] for r in runs]),
            f"val_{metric}": mean_std([r[f"val_{metric}"] for r in runs]),
            "steps_to_target": mean_std(reach),
            "reached": sum(s is not None for s in reach),
            "seconds_per_step": mean_std([r["seconds_per_step"] for r in runs]),
            "smoothness_mean": mean_std([statistics.fmean(v for v in r["history"]["smoothness"]
                                                          if v is not None)
                                         if any(v is not None for v in r["history"]["smoothness"])
                                         else None for r in runs]),  # fmt: skip
        }
    return {"target_loss": target, "rows": rows}


def _ms(pair, digits=3, pct=False):
    m, s = pair
    if m is None:
        return "—"
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(summary: dict, all_runs: dict[str, list[dict]], args) -> str:
    lines = []
    for task, s in summary.items():
        metric = TASKS[task]["metric"]
        lines += [f"### {task}: selected configurations, test {metric} (mean ± std over seeds)", "",
                  f"Target loss for 'steps to target' (5-step running mean of the workers' "
                  f"mini-batch loss): {_fmt(s['target_loss'])}.", "",
                  f"| method | selected (γ₀; γ = {K}·γ₀) | seeds | final train loss (anchor, full set) "
                  f"| final mini-batch loss | best mini-batch loss | test {metric}"
                  f"{' %' if metric == 'accuracy' else ''} | steps to target (reached) "
                  f"| mean smoothness L̂ | s/step |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for method, row in s["rows"].items():
            point = ", ".join(f"{k}={v:g}" for k, v in row["point"].items())
            lines.append(
                f"| {method} | {point} | {len(row['seeds'])} | {_ms(row['final_train_loss'])} "
                f"| {_ms(row['final_minibatch_loss'])} | {_ms(row['best_minibatch_loss'])} "
                f"| {_ms(row[f'test_{metric}'], 2, pct=metric == 'accuracy')} "
                f"| {_ms(row['steps_to_target'], 1)} ({row['reached']}/{len(row['seeds'])}) "
                f"| {_ms(row['smoothness_mean'], 2)} | {_ms(row['seconds_per_step'], 3)} |"
            )
        lines += ["", f"<details><summary>{task}: the whole tuning grid (first seed), validation "
                  f"{metric}</summary>", "", f"| method | grid point | val {metric} | val loss "
                  "| final train loss |", "|---|---|---|---|---|"]  # fmt: skip
        for run in all_runs[task]:
            point = ", ".join(f"{k}={v:g}" for k, v in run["point"].items())
            lines.append(f"| {run['method']} | {point} | {_fmt(run[f'val_{metric}'], 4)} "
                         f"| {_fmt(run['val_loss'])} | {_fmt(run['train_loss'])} |")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def plot(task: str, selected: dict[str, list[dict]], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_curve(runs, key, smooth):
        curves = [r["history"][key] for r in runs]
        n = min(len(c) for c in curves)
        out = []
        for i in range(n):
            vals = [c[i] for c in curves if c[i] is not None and math.isfinite(c[i])]
            out.append(statistics.fmean(vals) if vals else float("nan"))
        return smoothed(out) if smooth else out

    paths = []
    panels = [("with LR decay", [m for m in selected if not m.endswith("nodecay")]),
              ("SGD vs extrap-SGD, with and without LR decay",
               [m for m in selected if m in ("sgd", "sgd_nodecay", "extrap_sgd", "extrap_sgd_nodecay")])]  # fmt: skip
    for key, ylabel, name in (("loss", "mini-batch training loss (5-step mean)", "curves"),
                              ("smoothness", "‖gᵏ_t − gᵏ_{t−1}‖ / ‖x̃ᵏ_t − x̃ᵏ_{t−1}‖ (mean over k)",
                               "smoothness")):  # fmt: skip
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, (title, methods) in zip(axes, panels):
            for method in methods:
                curve = mean_curve(selected[method], key, smooth=key == "loss")
                style = "--" if method.endswith("nodecay") else "-"
                ax.plot(range(1, len(curve) + 1), curve, style, label=method)
            ax.set_title(f"{task}: {title}")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{task}_{name}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one grid point per method (middle LR), one seed, few steps")
    parser.add_argument("--output_dir", default=os.path.join("outputs", "reproduce"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="default 0 1 (quick: 0); the first seed tunes")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run (default per task: vision 60, lm 100)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained in parallel, one thread each")
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    runs_dir = os.path.join(args.output_dir, "runs")
    plots_dir = os.path.join(args.output_dir, "plots")
    os.makedirs(runs_dir, exist_ok=True)
    os.makedirs(plots_dir, exist_ok=True)
    log = lambda msg: print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    def spec(task, method, point, seed, steps):
        rid = run_id(task, method, point, seed, steps)
        return {"id": rid, "task": task, "method": method, "point": point, "seed": seed,
                "steps": steps, "path": os.path.join(runs_dir, rid + ".json")}

    start = time.perf_counter()
    steps = {t: args.steps or TASKS[t]["quick_steps" if args.quick else "steps"] for t in args.tasks}
    # stage 1: the grids with the first seed; stage 2: the selected points with the other seeds
    stage1 = [spec(t, m, p, seeds[0], steps[t]) for t in args.tasks for m in args.methods
              for p in grid(t, m, args.quick)]  # fmt: skip
    results = run_all(stage1, args.jobs, log)
    chosen: dict[tuple[str, str], dict] = {}
    for s in stage1:
        r = results[s["id"]]
        if _better(s["task"], r, chosen.get((s["task"], s["method"]))):
            chosen[(s["task"], s["method"])] = r
    stage2 = [spec(t, m, chosen[(t, m)]["point"], seed, steps[t])
              for (t, m) in chosen for seed in seeds[1:]]  # fmt: skip
    results.update(run_all(stage2, args.jobs, log))

    summary, grids, plots = {}, {}, []
    for task in args.tasks:
        selected = {m: [results[spec(task, m, chosen[(task, m)]["point"], seed, steps[task])["id"]]
                        for seed in seeds] for m in args.methods}  # fmt: skip
        summary[task] = summarize(task, selected)
        grids[task] = [results[s["id"]] for s in stage1 if s["task"] == task]
        plots += plot(task, selected, plots_dir)
    machine = (f"{platform.node()}: {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, torch {torch.__version__}, python {platform.python_version()}")
    command = "python benchmarks/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [f"Command: `{command.strip()}`", "", f"Machine: {machine}; {args.jobs} runs in "
              f"parallel, 1 thread each.", "", f"K = {K} virtual workers; steps: "
              + ", ".join(f"{t} {n}" for t, n in steps.items()) + f"; seeds {seeds}; "
              f"{'quick grids' if args.quick else 'full grids'}.", ""]  # fmt: skip
    text = "\n".join(header) + markdown(summary, grids, args)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"command": command, "machine": machine, "seeds": seeds, "steps": steps,
                   "summary": summary}, f, indent=1)  # fmt: skip
    log(f"done in {time.perf_counter() - start:.0f} s: {args.output_dir}/results.md, {plots}")
    print(text)
    return {"summary": summary, "plots": plots, "results_md": os.path.join(args.output_dir, "results.md")}


if __name__ == "__main__":
    main()
