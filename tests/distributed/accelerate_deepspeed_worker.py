"""extrap_accel.prepare under `accelerate launch` with a DeepSpeed config (ZeRO-2, bf16).

    accelerate launch --config_file accelerate_configs/cpu_2proc_deepspeed.yaml \
        tests/distributed/accelerate_deepspeed_worker.py --out /tmp/results
"""

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DummyOptim, InitProcessGroupKwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import extrap_accel


def setup(accelerator, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = extrap_accel.ExtrapSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    data = TensorDataset(torch.randn(64, 6), torch.randn(64, 3))
    loader = DataLoader(data, batch_size=4)
    return extrap_accel.prepare(accelerator, model, optimizer, loader)


def train(accelerator, model, optimizer, steps, rank):
    adapter = model._extrap_accel_adapter
    trace = []
    for t in steps:
        g = torch.Generator().manual_seed(100 * t + rank)
        x, y = torch.randn(4, 6, generator=g).bfloat16(), torch.randn(4, 3, generator=g)
        loss = nn.functional.mse_loss(model(x).float(), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        trace.append([adapter.point(p).clone() for p in model.module.parameters()])
    return trace


def check_config_named_optimizer(rank):
    """The DeepSpeed config names ExtrapSGD ("auto" lr and weight_decay from the DummyOptim,
    "auto" betas dropped: not SGD's); the script passes DummyOptim, as accelerate's docs say."""
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    spec = {"type": "ExtrapSGD", "params": {"lr": "auto", "weight_decay": "auto", "momentum": 0.9,
                                             "nesterov": True, "betas": "auto"}}  # fmt: skip
    config["optimizer"] = spec
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    out = {}
    try:  # an optimizer both in the config and in the code
        extrap_accel.prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1))
    except ValueError as e:
        out["real_optimizer_error"] = str(e)
    dummy = DummyOptim(model.parameters(), lr=0.05, weight_decay=1e-4)
    model, optimizer = extrap_accel.prepare(accelerator, model, dummy)
    out["config_kept"] = config.get("optimizer") == spec
    adapter = model._extrap_accel_adapter
    base = adapter.optimizer
    group = base.param_groups[0]
    out["built"] = [type(base).__name__, group["lr"], group["weight_decay"], group["momentum"],
                    group["nesterov"]]  # fmt: skip
    train(accelerator, model, optimizer, range(2), rank)
    params = list(model.module.parameters())
    out["displaced"] = any(not torch.equal(adapter.point(p), adapter.anchor(p)) for p in params)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank = accelerator.process_index
    model, optimizer, _ = setup(accelerator, 0)
    adapter = model._extrap_accel_adapter
    train(accelerator, model, optimizer, range(3), rank)
    params = list(model.module.parameters())
    points = [[torch.empty_like(p.data) for _ in range(2)] for p in params]
    for buf, p in zip(points, params):
        dist.all_gather(buf, p.data.contiguous())
    sd = accelerator.get_state_dict(model)
    results = {
        "distributed_type": str(accelerator.distributed_type),
        "stage": adapter.stage,
        "points_differ": any(not torch.equal(a, b) for a, b in points),
        "get_state_dict_is_anchor": all(torch.equal(sd[n].to(adapter.anchor(p).dtype),
                                                    adapter.anchor(p))
                                        for n, p in model.module.named_parameters()),
    }
    try:  # the engine steps the optimizer itself: a LARS wrapper would silently never run
        extrap_accel.LARS(optimizer)
        results["lars_refused"] = ""
    except NotImplementedError as e:
        results["lars_refused"] = str(e)
    ckpt = [tempfile.mkdtemp()]
    dist.broadcast_object_list(ckpt, src=0)
    accelerator.save_state(ckpt[0])
    expected = train(accelerator, model, optimizer, range(3, 6), rank)
    accelerator2 = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    model2, optimizer2, _ = setup(accelerator2, 1)
    accelerator2.load_state(ckpt[0])
    got = train(accelerator2, model2, optimizer2, range(3, 6), rank)
    results["resume_bit_identical"] = all(torch.equal(a, b) for e, g in zip(expected, got)
                                          for a, b in zip(e, g))
    results["config_named"] = check_config_named_optimizer(rank)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"accelerate_deepspeed_rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
