"""Overhead of extrap-SGD against DeepSpeed with torch's SGD, at ZeRO-0/1/2/3 (2 processes).

One ``deepspeed`` launch; per stage both engines are built in the same processes and stepped
interleaved (SGD, extrap-SGD, SGD, ...) after a warm-up, so the ratios share the machine's
conditions:

* time per training step (forward, ``engine.backward``, ``engine.step``): median over
  ``--steps`` steps, the slower rank's; ratio extrap / SGD;
* extra bytes per parameter on each rank: extrap_accel's state (bit16 anchor copies, fp32 local
  moments, fp32 captured local gradients) over the model's parameter count;
* collectives per step: ``gloo:`` events under ``torch.profiler`` (calls and elements).

Model: an MLP of ``--layers`` Linear(``--width``) + GELU blocks (bf16 at every stage, local
batch 32). On CPU the ranks talk over gloo; on a GPU machine the same script uses NCCL (the
collective count then reads 0: the profiler sees only gloo calls).

    python benchmarks/deepspeed_overhead.py --steps 20 --json outputs/deepspeed_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from _multiprocess import free_port, interleaved_times, report, run_ranks  # noqa: E402
from torch import nn  # noqa: E402

STAGES = (0, 1, 2, 3)


def make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


def config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
        "steps_per_print": 10**9,
    }  # fmt: skip


def extra_bytes(adapter) -> int:
    opt = adapter.optimizer
    tensors = [opt.anchor(p) for p in opt.managed_params() if opt.core.is_displaced(p)]
    tensors += [v for p in opt.managed_params() for v in adapter.local_state(p).values()
                if torch.is_tensor(v)]  # fmt: skip
    # the captured gradient as held at the step (on CUDA it is released between steps)
    return sum(t.numel() * t.element_size() for t in tensors) + opt.local_grad_nbytes(True)


def worker(args) -> None:
    import deepspeed
    import torch.distributed as dist

    import extrap_accel
    from extrap_accel.diagnostics import count_collectives

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    out = {"world_size": dist.get_world_size(), "stages": {}}
    for stage in STAGES:
        engines = {}
        for name in ("sgd", "extrap_sgd"):
            model = make_model(args.width, args.layers)
            opt = extrap_accel.create_optimizer(name, model.parameters(), lr=0.01, momentum=0.9)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage))
            adapter = extrap_accel.attach(engine, opt) if name != "sgd" else None
            engines[name] = (engine, adapter)

        def one_step(name, t):
            engine = engines[name][0]
            g = torch.Generator().manual_seed(1000 * t + rank)
            x = torch.randn(32, args.width, generator=g).to(device, torch.bfloat16)
            y = torch.randint(0, 10, (32,), generator=g).to(device)
            engine.backward(nn.functional.cross_entropy(engine(x).float(), y))
            engine.step()

        # (the warm-up covers ZeRO-3 tracing its first iterations)
        times = interleaved_times(one_step, engines, args.steps, cuda=cuda)
        numel = sum(getattr(p, "ds_numel", p.numel())
                    for p in engines["sgd"][0].module.parameters())  # fmt: skip
        res = {"numel": numel}
        for name, (engine, adapter) in engines.items():
            res[name] = {
                "median_s": statistics.median(times[name]),
                "collectives": count_collectives(lambda: one_step(name, 999)),
                "extra_bytes": extra_bytes(adapter) if adapter is not None else 0,
            }
        out["stages"][stage] = res
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def table(ranks: list[dict], steps: int) -> str:
    lines = ["| ZeRO stage (bf16) | params | SGD s/step | extrap-SGD s/step | time ratio "
             "| extra B/param (rank 0) | collectives/step SGD → extrap (elements) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for stage in ranks[0]["stages"]:
        per = [r["stages"][stage] for r in ranks]
        n = per[0]["numel"]
        s = max(p["sgd"]["median_s"] for p in per)
        e = max(p["extrap_sgd"]["median_s"] for p in per)
        cs, ce = per[0]["sgd"]["collectives"], per[0]["extrap_sgd"]["collectives"]
        lines.append(
            f"| {stage} | {n:,} | {s * 1e3:.1f} ms | {e * 1e3:.1f} ms | {e / s:.3f} "
            f"| {per[0]['extrap_sgd']['extra_bytes'] / n:.1f} "
            f"| {cs['calls']} ({cs['elements']:,}) → {ce['calls']} ({ce['elements']:,}) |"
        )
    return "\n".join(lines) + (f"\n\nMedian of {steps} interleaved steps per rank, the slower "
                               "rank's median; 2 processes.\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the per-rank results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable),
                                                          "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
           os.path.abspath(__file__), "--worker", "--steps", str(args.steps),
           "--width", str(args.width), "--layers", str(args.layers)]  # fmt: skip
    ranks = run_ranks(cmd, dict(os.environ, OMP_NUM_THREADS="1"), quiet=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
    return report(ranks, table(ranks, args.steps), args.json, device)

if __name__ == "__main__":
    main()
