"""``extrap_accel.prepare`` with accelerate's FSDP2 plugin, on each rank of one real launch.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/fsdp2_bf16.yaml \\
        --num_processes 2 tests/distributed/accelerate_fsdp2_worker.py --out /tmp/results

accelerate (1.16) ignores an FSDP config on CPU: it sets up MULTI_CPU (DDP). ``force_fsdp2``
(the CPU workaround, tests only) puts the FSDP2 plugin that accelerate built from the launch's
config (the yaml's fsdp_config and mixed_precision) into accelerate's shared state, so that
``prepare`` applies ``fully_shard`` and ``save_state``/``load_state``/``save_model`` take their
FSDP paths, as they do on GPUs. Each check writes its results into
``<out>/accelerate_fsdp2_rank<r>.json``; tests/test_fsdp2.py asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import extrap_accel  # noqa: E402

SGD = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)


def force_fsdp2(accelerator, state_dict_type: str | None = None):
    """The CPU workaround: accelerate's FSDP2 path on a MULTI_CPU launch. Both shared states
    must say FSDP: every later ``AcceleratorState()`` (prepare creates some) copies
    ``PartialState``'s distributed_type back, and save_state would then take the DDP path."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    kwargs = {} if state_dict_type is None else {"state_dict_type": state_dict_type}
    plugin = FullyShardedDataParallelPlugin(**kwargs)  # the rest from the launch's environment
    assert plugin.fsdp_version == 2, plugin.fsdp_version
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = AcceleratorState()
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    assert accelerator.is_fsdp2
    return accelerator


def new_accelerator(state_dict_type=None):
    from accelerate import Accelerator

    return force_fsdp2(Accelerator(cpu=True), state_dict_type)


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class Net(nn.Module):
    """Two blocks (own FSDP2 units through the yaml's TRANSFORMER_BASED_WRAP and
    ``_no_split_modules``) and a head whose weight has dim 0 = 1 < K (an empty shard)."""

    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(6, 16), Block(16, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.blocks(x))


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


def batch(t, rank):
    g = torch.Generator().manual_seed(1000 * t + rank)
    return torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)


def step(accelerator, model, opt, t):
    x, y = batch(t, accelerator.process_index)
    accelerator.backward(nn.functional.mse_loss(model(x).float(), y))
    opt.step()
    opt.zero_grad()


def local(p):
    return p.to_local() if isinstance(p, DTensor) else p


def trace(accelerator, model, opt, steps):
    """Per step: this rank's shard of every parameter (x̃) and of every anchor."""
    adapter = model._extrap_accel_adapter
    out = []
    for t in steps:
        step(accelerator, model, opt, t)
        params = list(model.parameters())
        out.append([local(p.detach()).clone() for p in params]
                   + [adapter.anchor(p).clone() for p in params])
    return out


def prepared(accelerator, seed=0, **kwargs):
    model = make(seed)
    opt = extrap_accel.ExtrapSGD(model.parameters(), **{**SGD, **kwargs})
    return extrap_accel.prepare(accelerator, model, opt)


def check_prepare(results):
    acc = new_accelerator()
    model, opt = prepared(acc)
    from torch.distributed.fsdp import FSDPModule

    adapter = getattr(model, "_extrap_accel_adapter", None)
    step(acc, model, opt, 0)
    results["prepare"] = {
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "adapter": type(adapter).__name__,
        "params_are_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
        "displaced": any(not torch.equal(local(p.detach()), adapter.anchor(p))
                         for p in model.parameters() if local(p).numel()),
        "param_dtype": str(adapter._read_param_dtypes()[next(model.parameters())]),
        "state_dict_type": str(acc.state.fsdp_plugin.state_dict_type),
    }


def check_resume(results, tmp, state_dict_type, key):
    """save_state / load_state: a fresh run from other weights continues bit for bit."""
    acc1 = new_accelerator(state_dict_type)
    model, opt = prepared(acc1)
    trace(acc1, model, opt, range(3))
    ckpt = os.path.join(tmp, key)
    acc1.save_state(ckpt)
    acc1.wait_for_everyone()
    expected = trace(acc1, model, opt, range(3, 6))

    acc2 = new_accelerator(state_dict_type)
    model2, opt2 = prepared(acc2, seed=123)
    acc2.load_state(ckpt)
    got = trace(acc2, model2, opt2, range(3, 6))
    rank = acc1.process_index
    results[key] = {
        "bit_identical": all(torch.equal(a, b) for e, g in zip(expected, got)
                             for a, b in zip(e, g)),
        "files": sorted(os.listdir(ckpt)),
        "local_file": os.path.exists(os.path.join(ckpt, f"extrap_accel_rank{rank}.pt")),
    }
    return ckpt


def check_resume_without_local_files(results, ckpt):
    """No rank has its extrap_accel_rank<r>.pt: a warning, and every rank restarts x̃ = x from
    the loaded anchor."""
    copy = ckpt + "_no_local_files"
    if dist.get_rank() == 0:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(ckpt, copy)
        for r in range(dist.get_world_size()):
            os.remove(os.path.join(copy, f"extrap_accel_rank{r}.pt"))
    dist.barrier()
    acc = new_accelerator()
    model, opt = prepared(acc, seed=123)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc.load_state(copy)
    adapter = model._extrap_accel_adapter
    results["resume_without_local_files"] = {
        "warned": any("no per-rank extrapolation state" in str(w.message) for w in caught),
        "at_anchor": all(torch.equal(local(p.detach()), adapter.anchor(p))
                         for p in model.parameters()),
    }


def check_saving(results, tmp):
    """get_state_dict and save_model (safetensors and pickle) hold the anchor, not x̃."""
    from safetensors.torch import load_file

    acc = new_accelerator()
    model, opt = prepared(acc)
    for t in range(3):
        step(acc, model, opt, t)
    adapter = model._extrap_accel_adapter
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    anchors = {n: DTensor.from_local(adapter.anchor(p), p.device_mesh, p.placements,
                                     run_check=False, shape=p.shape, stride=p.stride()
                                     ).full_tensor()
               for n, p in zip(names, params)}  # fmt: skip
    points = {n: p.detach().full_tensor() for n, p in zip(names, params)}
    sd = acc.get_state_dict(model)  # (the full state dict on rank 0 only)
    out = os.path.join(tmp, "saved_model")
    acc.save_model(model, out)
    acc.save_model(model, out + "_bin", safe_serialization=False)
    acc.wait_for_everyone()
    r = {"displaced": any(not torch.equal(points[n], anchors[n]) for n in names)}
    if acc.is_main_process:
        saved = load_file(os.path.join(out, "model.safetensors"))
        saved_bin = torch.load(os.path.join(out + "_bin", "pytorch_model.bin"),
                               weights_only=True)
        r["get_state_dict_is_anchor"] = all(torch.equal(sd[n], anchors[n]) for n in names)
        r["save_model_is_anchor"] = all(torch.equal(saved[n], anchors[n]) for n in names)
        r["save_model_bin_is_anchor"] = all(torch.equal(saved_bin[n], anchors[n])
                                             for n in names)
    r["params_still_points"] = all(torch.equal(p.detach().full_tensor(), points[n])
                                   for n, p in zip(names, model.parameters()))
    results["saving"] = r


def check_i1(results):
    """extrap_scale=0 through extrap_accel.prepare equals FSDP2 + torch SGD through
    accelerator.prepare, bit for bit."""
    acc_a = new_accelerator()
    a, oa = prepared(acc_a, extrap_scale=0.0)
    acc_b = new_accelerator()
    b = make()
    ob = torch.optim.SGD(b.parameters(), **SGD)
    b, ob = acc_b.prepare(b, ob)
    for t in range(5):
        step(acc_a, a, oa, t)
        step(acc_b, b, ob, t)
    results["i1"] = {"bit_identical": all(torch.equal(local(p.detach()), local(q.detach()))
                                          for p, q in zip(a.parameters(), b.parameters()))}


def check_refusals(results):
    """FSDP1 through accelerate is refused, naming fsdp_version: 2."""
    from accelerate.state import AcceleratorState

    acc = new_accelerator()
    plugin = AcceleratorState().fsdp_plugin
    plugin.fsdp_version = 1
    try:
        model = make()
        extrap_accel.prepare(acc, model, extrap_accel.ExtrapSGD(model.parameters(), lr=0.1))
        results["fsdp1"] = ""
    except NotImplementedError as e:
        results["fsdp1"] = str(e)
    finally:
        plugin.fsdp_version = 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--checks", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--name", default="accelerate_fsdp2", help="the results' file prefix")
    args = parser.parse_args()
    acc = new_accelerator()
    results: dict = {"world_size": acc.num_processes, "mixed_precision": acc.mixed_precision}
    shared = [tempfile.mkdtemp() if acc.is_main_process else None]
    dist.broadcast_object_list(shared, src=0)
    tmp = shared[0]
    checks = [
        ("prepare", check_prepare),
        ("resume", lambda r: check_resume_without_local_files(
            r, check_resume(r, tmp, None, "resume"))),
        ("resume_full", lambda r: check_resume(r, tmp, "FULL_STATE_DICT", "resume_full")),
        ("saving", lambda r: check_saving(r, tmp)),
        ("i1", check_i1),
        ("refusals", check_refusals),
    ]
    if args.checks:
        checks = [(n, c) for n, c in checks if n in args.checks.split(",")]
    for name, check in checks:
        try:
            check(results)
        except Exception:  # noqa: BLE001 (reported per check, asserted by the test)
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr, flush=True)  # (a hang follows)
        dist.barrier()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}_rank{acc.process_index}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
