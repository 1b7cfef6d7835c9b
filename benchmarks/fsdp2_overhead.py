"""Overhead of extrap-SGD under FSDP2 (``fully_shard``) against FSDP2 + torch's SGD (2 processes).

One ``torchrun`` launch; per ``param_dtype`` (fp32, and bf16 through a
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``) both models are built in
the same processes, ``fully_shard`` per block and on the root, and stepped interleaved (SGD,
extrap-SGD, SGD, ...) after a warm-up, so the ratios share the machine's conditions:

* time per training step (``zero_grad``, forward, backward, ``step``): median over ``--steps``
  steps, the slower rank's; ratio extrap / SGD;
* extra bytes on each rank: the adapter's own state (anchor copy, local momentum, captured
  rows of the local gradient; torch's momentum buffer, which both keep, not counted), per
  parameter of the model and per element of the rank's shards;
* collectives per step: ``gloo:`` events under ``torch.profiler`` (calls and elements).

Model: an MLP of ``--layers`` Linear(``--width``) + GELU blocks and a Linear(``--width``, 10)
head, local batch 32. On CPU the ranks talk over gloo; on a GPU machine the same script uses
NCCL (the collective count then reads 0: the profiler sees only gloo calls).

    python benchmarks/fsdp2_overhead.py --steps 20 --json outputs/fsdp2_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from _multiprocess import free_port, interleaved_times, report, run_ranks  # noqa: E402
from torch import nn  # noqa: E402

DTYPES = ("fp32", "bf16")


def make_model(width: int, layers: int, dtype: str, device) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(layers)]
    model = nn.Sequential(*blocks, nn.Linear(width, 10)).to(device)
    kw = {}
    if dtype == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)  # fmt: skip
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def extra_bytes(adapter) -> int:
    """The adapter's own tensors on this rank: anchor copies and local moments (its core's
    state), the captured rows of the local gradient and, with extrap_max_norm, their norms."""
    tensors = [t for entry in adapter.core.state.values() for t in entry.values()
               if torch.is_tensor(t)]  # fmt: skip
    tensors += list(adapter.capture.buffers.values()) + list(adapter.capture.norms.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(args) -> None:
    import torch.distributed as dist

    import extrap_accel
    from extrap_accel.diagnostics import count_collectives

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    out = {"world_size": dist.get_world_size(), "dtypes": {}}
    for dtype in DTYPES:
        models = {}
        for name in ("sgd", "extrap_sgd"):
            model = make_model(args.width, args.layers, dtype, device)
            if name == "sgd":
                opt, adapter = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), None
            else:
                opt = extrap_accel.ExtrapSGD(model.parameters(), lr=0.01, momentum=0.9)
                adapter = extrap_accel.attach(model, opt)
            models[name] = (model, opt, adapter)

        def one_step(name, t):
            model, opt = models[name][:2]
            g = torch.Generator().manual_seed(1000 * t + rank)
            x = torch.randn(32, args.width, generator=g).to(device)
            y = torch.randint(0, 10, (32,), generator=g).to(device)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x).float(), y).backward()
            opt.step()

        # (the warm-up covers FSDP2's lazy initialisation in the first forward)
        times = interleaved_times(one_step, models, args.steps, cuda=cuda)
        model = models["sgd"][0]
        res = {"numel": sum(p.numel() for p in model.parameters()),
               "local_numel": sum(p.to_local().numel() for p in model.parameters())}
        for name, (model, opt, adapter) in models.items():
            res[name] = {
                "median_s": statistics.median(times[name]),
                "collectives": count_collectives(lambda: one_step(name, 999)),
                "extra_bytes": extra_bytes(adapter) if adapter is not None else 0,
            }
        out["dtypes"][dtype] = res
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def table(ranks: list[dict], steps: int) -> str:
    lines = ["| param_dtype | params | FSDP2 + SGD s/step | extrap-SGD s/step | time ratio "
             "| extra B/param (rank 0) | extra B/shard element (rank 0) "
             "| collectives/step SGD → extrap (elements) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for dtype in ranks[0]["dtypes"]:
        per = [r["dtypes"][dtype] for r in ranks]
        n, local = per[0]["numel"], per[0]["local_numel"]
        s = max(p["sgd"]["median_s"] for p in per)
        e = max(p["extrap_sgd"]["median_s"] for p in per)
        cs, ce = per[0]["sgd"]["collectives"], per[0]["extrap_sgd"]["collectives"]
        extra = per[0]["extrap_sgd"]["extra_bytes"]
        lines.append(
            f"| {dtype} | {n:,} | {s * 1e3:.1f} ms | {e * 1e3:.1f} ms | {e / s:.3f} "
            f"| {extra / n:.2f} | {extra / local:.2f} "
            f"| {cs['calls']} ({cs['elements']:,}) → {ce['calls']} ({ce['elements']:,}) |"
        )
    return "\n".join(lines) + (f"\n\nMedian of {steps} interleaved steps per rank, the slower "
                               f"rank's median; {len(ranks)} processes.\n")


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), os.path.abspath(__file__), "--worker",
           "--steps", str(args.steps), "--width", str(args.width),
           "--layers", str(args.layers)]  # fmt: skip
    ranks = run_ranks(cmd, dict(os.environ, OMP_NUM_THREADS="1"), quiet=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
    return report(ranks, table(ranks, args.steps), args.json, device)


if __name__ == "__main__":
    main()
