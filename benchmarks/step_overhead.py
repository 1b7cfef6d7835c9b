"""Optimizer-step overhead of extrap_accel against the torch.optim baseline.

Times one ``optimizer.step()`` — for ours this includes writing x̃ = x − γ̃·d into the
parameters (the "swap"; the anchor x lives in the optimizer state) — for

* ``ExtrapSGD(momentum=0.9, nesterov=True, weight_decay=λ)`` vs
  ``torch.optim.SGD(momentum=0.9, nesterov=True, weight_decay=λ, foreach=True)``, λ ∈ {5e-4, 0};
* ``ExtrapAdam(weight_decay=0.01)`` vs ``torch.optim.AdamW(weight_decay=0.01, foreach=True)``;

ours both with ``foreach=True`` and ``foreach=False`` (the baseline is always foreach=True),
on two parameter sets:

* ``transformer``: a Transformer-shaped set, d_model 512, d_ff 2048: 6 attention blocks
  (fused in-projection 1536×512 + bias, out-projection 512×512 + bias) and 6 FFN blocks
  (2048×512 + bias, 512×2048 + bias), 12 + 1 LayerNorms (weight + bias) and a 10 000 × 512
  embedding: 24 035 328 parameters in 75 tensors;
* ``resnet20``: ResNet-20 (CIFAR, option-A shortcuts) parameter shapes, written out below:
  269 722 parameters in 59 tensors.

Gradients are fixed random tensors (copied back into ``.grad`` before every step, outside the
timed region, since torch's foreach SGD with λ = 0 and Nesterov updates ``.grad`` in place).
Ours and the baseline are interleaved in one process (A, B, A, B, ...) after a warm-up; the
table reports the median of ``--repeats`` timed steps each, the ratio ours / baseline, and the
extra optimizer state of ours (sum of the bytes of all state tensors, ours minus baseline) per
parameter, also expressed as a number of parameter-sized buffers. ``--json`` also keeps the
minimum and every timing. On a shared machine other processes inflate the medians (and with
two or more threads an OpenMP barrier waits for a descheduled thread): ``--threads 1`` with
``--clock cpu`` (this thread's CPU time) is the contention-robust variant.

Run (about 30 s on an idle 2-core CPU)::

    python benchmarks/step_overhead.py --repeats 30 --json benchmarks/step_overhead.json

Smoke test: ``python benchmarks/step_overhead.py --quick`` (the script finds the package in its
checkout when it is not installed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

try:
    import extrap_accel
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import extrap_accel

from extrap_accel import ExtrapAdam, ExtrapSGD


# ----------------------------------------------------------------------------- parameter sets
def transformer_shapes(d_model: int = 512, d_ff: int = 2048, layers: int = 6, vocab: int = 10_000):
    """One 6-layer Transformer stack's weights (attention + FFN + norms) and an embedding."""
    shapes = [(vocab, d_model)]  # token embedding (tied output projection)
    for _ in range(layers):
        shapes += [
            (3 * d_model, d_model), (3 * d_model,),  # self-attention in-projection (q, k, v)
            (d_model, d_model), (d_model,),  # self-attention out-projection
            (d_ff, d_model), (d_ff,),  # FFN up
            (d_model, d_ff), (d_model,),  # FFN down
            (d_model,), (d_model,),  # LayerNorm after attention (weight, bias)
            (d_model,), (d_model,),  # LayerNorm after FFN
        ]  # fmt: skip
    shapes += [(d_model,), (d_model,)]  # final LayerNorm
    return shapes


def resnet20_shapes(num_classes: int = 10):
    """ResNet-20 for CIFAR (He et al. 2016, option-A identity shortcuts: no projection weights)."""
    shapes = [(16, 3, 3, 3), (16,), (16,)]  # conv1, bn1 weight/bias
    in_planes = 16
    for planes in (16, 32, 64):
        for _ in range(3):  # 3 BasicBlocks per stage
            shapes += [
                (planes, in_planes, 3, 3), (planes,), (planes,),  # conv1, bn1
                (planes, planes, 3, 3), (planes,), (planes,),  # conv2, bn2
            ]  # fmt: skip
            in_planes = planes
    shapes += [(num_classes, 64), (num_classes,)]  # fc
    return shapes


WORKLOADS = {"transformer": transformer_shapes, "resnet20": resnet20_shapes}
_clock = time.perf_counter


# ----------------------------------------------------------------------------- optimizer pairs
def pairs(compile_direction: bool = False):
    """(name, build ours(params, foreach), build baseline(params)); with ``compile_direction``
    the SGD pairs only, ours with ExtrapSGD(compile_direction=True)."""
    out = []
    for wd in (5e-4, 0.0):
        out.append((
            f"SGD nesterov wd={wd:g}",
            lambda ps, fe, wd=wd: ExtrapSGD(
                ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd, world_size=1, foreach=fe,
                compile_direction=compile_direction,
            ),
            lambda ps, wd=wd: torch.optim.SGD(
                ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd, foreach=True
            ),
        ))  # fmt: skip
    if compile_direction:
        return out
    out.append((
        "AdamW wd=0.01",
        lambda ps, fe: ExtrapAdam(ps, lr=1e-3, weight_decay=0.01, world_size=1, foreach=fe),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True),
    ))  # fmt: skip
    return out


def cpu_pressure() -> str | None:
    """Linux PSI: the share of time some runnable task waited for a CPU (other processes)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return None


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )


class Runner:
    """One optimizer on its own copy of the parameters, with fixed gradients."""

    def __init__(self, init: list[torch.Tensor], grads: list[torch.Tensor], build):
        self.params = [torch.nn.Parameter(t.clone()) for t in init]
        self.grads = grads
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.opt = build(self.params)
        self.times: list[float] = []

    def step(self, timed: bool = True) -> None:
        torch._foreach_copy_([p.grad for p in self.params], self.grads)  # untimed
        t0 = _clock()
        self.opt.step()
        t1 = _clock()
        if timed:
            self.times.append(t1 - t0)


def bench_pair(shapes, build_ours, build_base, repeats: int, warmup: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    n = sum(t.numel() for t in init)
    a = Runner(init, grads, build_ours)
    b = Runner(init, grads, build_base)
    t0 = time.perf_counter()
    a.step(timed=False)  # the first two steps of ours include any torch.compile
    a.step(timed=False)
    first_steps_s = time.perf_counter() - t0
    for _ in range(warmup):
        a.step(timed=False)
        b.step(timed=False)
    for _ in range(repeats):  # interleaved: A, B, A, B, ...
        a.step()
        b.step()
    extra = state_bytes(a.opt) - state_bytes(b.opt)
    elem = init[0].element_size()
    res = dict(
        ms_ours=1e3 * statistics.median(a.times),
        ms_base=1e3 * statistics.median(b.times),
        min_ms_ours=1e3 * min(a.times),
        min_ms_base=1e3 * min(b.times),
        times_ms_ours=[1e3 * t for t in a.times],
        times_ms_base=[1e3 * t for t in b.times],
        extra_state_bytes=extra,
        extra_bytes_per_param=extra / n,
        extra_buffers=extra / (n * elem),
        n_params=n,
        n_tensors=len(shapes),
        first_two_steps_s_ours=first_steps_s,
    )
    res["ratio"] = res["ms_ours"] / res["ms_base"]
    del a, b, init, grads
    gc.collect()
    return res


def count_ops(shapes, build, seed: int = 0) -> dict:
    """Operator calls per step, counted under torch.profiler over 2 steps (run after all
    timing: a profiler that ran leaves the process's later steps slower)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    runner = Runner(init, grads, build)
    for _ in range(3):
        runner.step(timed=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            runner.step(timed=False)
    calls: dict[str, int] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            calls[event.key] = event.count // 2
    calls["aten::copy_"] = calls.get("aten::copy_", 0) - len(shapes)  # the untimed grad reset
    if not calls["aten::copy_"]:
        del calls["aten::copy_"]
    foreach = sum(n for k, n in calls.items() if k.startswith("aten::_foreach_"))
    return {"foreach_calls": foreach, "aten_calls": sum(calls.values()), "calls": calls}


def ab_rounds(args, repeats: int, warmup: int) -> int:
    """Eager vs compiled direction: rounds of (eager SGD pairs, compiled SGD pairs)."""
    print(f"# PSI before: {cpu_pressure()}")
    ratios: dict[tuple, list[float]] = {}
    for wl in args.workloads.split(","):
        for rnd in range(args.ab_rounds):
            for compiled in (False, True):
                for name, build_ours, build_base in pairs(compiled)[:2]:
                    r = bench_pair(WORKLOADS[wl](), lambda ps, f=build_ours: f(ps, True),
                                   build_base, repeats, warmup)  # fmt: skip
                    ratios.setdefault((wl, name, compiled), []).append(r["ratio"])
                    print(f"# round {rnd} {wl} {name} compile_direction={compiled}: ratio "
                          f"{r['ratio']:.3f} (ours {r['ms_ours']:.3f} ms, torch "
                          f"{r['ms_base']:.3f} ms, ours' first two steps "
                          f"{r['first_two_steps_s_ours']:.2f} s)", flush=True)  # fmt: skip
    print(f"# PSI after: {cpu_pressure()}")
    print("| workload | pair | compile_direction | median ratio (range) |")
    print("|---|---|---|---|")
    for (wl, name, compiled), rs in ratios.items():
        print(f"| {wl} | {name} | {compiled} | {statistics.median(rs):.2f} "
              f"({min(rs):.2f}–{max(rs):.2f}) |")  # fmt: skip
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed steps per optimizer (>= 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up: a smoke test")
    ap.add_argument("--workloads", default="transformer,resnet20", help="comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    ap.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall: perf_counter; cpu: this thread's CPU time (meaningful with --threads 1)",
    )  # fmt: skip
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--profile", action="store_true",
                    help="foreach=True only: the timed pairs, then the operator calls of one "
                         "step of each (torch.profiler), and the time per extra call")  # fmt: skip
    ap.add_argument("--compile_direction", action="store_true",
                    help="ours with ExtrapSGD(compile_direction=True), foreach=True, SGD pairs "
                         "only; reports the first two steps' time (the compile)")  # fmt: skip
    ap.add_argument("--ab_rounds", type=int, default=0, metavar="N",
                    help="with --compile_direction: N rounds of (eager pair, compiled pair), "
                         "interleaved; prints the median ratio and range of each")  # fmt: skip
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    torch.set_default_dtype(torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _clock
    _clock = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.compile_direction and args.ab_rounds:
        return ab_rounds(args, repeats, warmup)
    if args.profile:
        rows = []
        for wl in args.workloads.split(","):  # all timing first, then the counting
            for name, build_ours, build_base in pairs(args.compile_direction):
                r = bench_pair(WORKLOADS[wl](), lambda ps, f=build_ours: f(ps, True), build_base,
                               repeats, warmup)  # fmt: skip
                rows.append({**r, "workload": wl, "pair": name})
        print("| workload | pair | ours ms | torch ms | ratio | foreach calls ours / torch "
              "| aten calls ours / torch | µs per extra aten call |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            shapes = WORKLOADS[r["workload"]]()
            _, build_ours, build_base = next(
                p for p in pairs(args.compile_direction) if p[0] == r["pair"]
            )
            r["ours_ops"] = count_ops(shapes, lambda ps, f=build_ours: f(ps, True))
            r["torch_ops"] = count_ops(shapes, build_base)
            extra = r["ours_ops"]["aten_calls"] - r["torch_ops"]["aten_calls"]
            per_call = 1e3 * (r["ms_ours"] - r["ms_base"]) / max(1, extra)
            print(f"| {r['workload']} ({len(shapes)} tensors) | {r['pair']} | {r['ms_ours']:.2f} "
                  f"| {r['ms_base']:.2f} | {r['ratio']:.2f} | {r['ours_ops']['foreach_calls']} / "
                  f"{r['torch_ops']['foreach_calls']} | {r['ours_ops']['aten_calls']} / "
                  f"{r['torch_ops']['aten_calls']} | {per_call:.2f} |", flush=True)  # fmt: skip
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0

    env = dict(
        torch=torch.__version__,
        extrap_accel=extrap_accel.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        repeats=repeats,
        warmup=warmup,
        clock=args.clock,
        cpu_pressure_before=cpu_pressure(),
    )
    print(
        f"# torch {env['torch']}, {env['threads']} threads, {env['cpus']} CPUs, float32, "
        f"median of {repeats} interleaved steps after {warmup} warm-up ({args.clock} clock)"
    )
    rows = []
    for wl in args.workloads.split(","):
        shapes = WORKLOADS[wl]()
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"# {wl}: {n:,} parameters in {len(shapes)} tensors", flush=True)
        for name, build_ours, build_base in pairs(args.compile_direction):
            for foreach in (True,) if args.compile_direction else (True, False):
                r = bench_pair(
                    shapes,
                    lambda ps, fe=foreach, f=build_ours: f(ps, fe),
                    build_base,
                    repeats,
                    warmup,
                )
                r.update(workload=wl, pair=name, foreach=foreach)
                rows.append(r)
                print(
                    f"#   {name:24s} foreach={foreach!s:5s} ours {r['ms_ours']:8.2f} ms  "
                    f"base {r['ms_base']:8.2f} ms  ratio {r['ratio']:.2f}  "
                    f"(ours' first two steps {r['first_two_steps_s_ours']:.2f} s)",
                    flush=True,
                )

    env["cpu_pressure_after"] = cpu_pressure()
    if env["cpu_pressure_after"]:
        print(f"# CPU pressure (PSI) before: {env['cpu_pressure_before']}")
        print(f"#                    after:  {env['cpu_pressure_after']}")
    print()
    print(
        "| workload | optimizer pair (ours vs torch, foreach=True) | ours foreach | "
        "median ms ours | median ms baseline | ratio | extra state B/param (buffers) |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        base = "SGD" if r["pair"].startswith("SGD") else "AdamW"
        ours = "ExtrapSGD" if base == "SGD" else "ExtrapAdam"
        label = f"{ours} vs {base} ({r['pair'].split(' ', 1)[1]})"
        print(
            f"| {r['workload']} ({r['n_params']:,}) | {label} | {r['foreach']} | "
            f"{r['ms_ours']:.2f} | {r['ms_base']:.2f} | {r['ratio']:.2f} | "
            f"{r['extra_bytes_per_param']:.2f} ({r['extra_buffers']:.2f}) |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, results=rows), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
