"""CPU cost of transient capture buffers (issue #15 item 4): persistent vs transient gᵏ.

Per step, as under DDP: the capture hooks of every parameter copy its gradient (persistent:
into the buffer kept since the last step; transient: into a freshly allocated one), then
``ExtrapSGD(momentum=0.9, nesterov=True).step()`` reads them and releases them (transient).
The two modes are interleaved (A, B, A, B, ...) in one process after a warm-up, on
step_overhead.py's parameter sets; the table reports the median time of hooks + step, the
ratio transient / persistent, and the capture bytes per parameter held between steps.

    python benchmarks/capture_transient.py --repeats 30
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from step_overhead import resnet20_shapes, transformer_shapes

from extrap_accel import ExtrapSGD
from extrap_accel.capture import CaptureMode


def build(shapes, transient: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    opt = ExtrapSGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt.bind(capture=CaptureMode(always=True, transient=transient))
    hooks = [opt._capture._hook(p) for p in params]  # what the tensor hooks run
    return params, grads, opt, hooks


def one_step(params, grads, opt, hooks) -> tuple[float, int]:
    """Seconds and minor page faults of the hooks and the step."""
    for p, g in zip(params, grads):
        p.grad = g.clone()  # (outside the timed region)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for hook, g in zip(hooks, grads):
        hook(g)
    opt.step()
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| set | params | persistent ms | transient ms | ratio | page faults/step persistent "
          "→ transient | held B/param persistent → transient | at the step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shapes in (("resnet20", resnet20_shapes()), ("transformer", transformer_shapes())):
        runs = {mode: build(shapes, mode) for mode in (False, True)}
        times, faults = {False: [], True: []}, {False: [], True: []}
        for i in range(args.warmup + args.repeats):
            for mode, run in runs.items():
                t, f = one_step(*run)
                if i >= args.warmup:
                    times[mode].append(t)
                    faults[mode].append(f)
        numel = sum(p.numel() for p in runs[False][0])
        med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
        held = {m: runs[m][2].local_grad_nbytes() / numel for m in runs}
        at_step = runs[True][2].local_grad_nbytes(at_step=True) / numel
        print(f"| {name} | {numel:,} | {med[False]:.2f} | {med[True]:.2f} | "
              f"{med[True] / med[False]:.3f} | {statistics.median(faults[False]):.0f} → "
              f"{statistics.median(faults[True]):.0f} | {held[False]:.1f} → {held[True]:.1f} | "
              f"{at_step:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
