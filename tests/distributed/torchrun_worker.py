"""Plain PyTorch DDP under torchrun (no accelerate): attach(DDP model, optimizer).

    torchrun --nproc_per_node 2 tests/distributed/torchrun_worker.py --out /tmp/results
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

import extrap_accel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 16), nn.Tanh(),
                                                              nn.Linear(16, 3)))
    optimizer = extrap_accel.ExtrapSGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    extrap_accel.attach(model, optimizer)
    i6 = []
    for t in range(4):
        g = torch.Generator().manual_seed(100 * t + rank)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for p in model.parameters():
            local = optimizer.local_grad(p).clone()
            dist.all_reduce(local)
            i6.append(float((local / 2 - p.grad).abs().max()))
        optimizer.step()

    def gathered(t):
        out = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(out, t.contiguous())
        return out

    params = list(model.parameters())
    sd = model.module.state_dict()
    results = {
        "i6_err": max(i6),
        "anchors_equal": all(torch.equal(*gathered(optimizer.anchor(p))) for p in params),
        "points_differ": any(not torch.equal(*gathered(p.detach())) for p in params),
        "state_dict_is_anchor": all(torch.equal(sd[n], optimizer.anchor(p))
                                    for n, p in model.module.named_parameters()),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"torchrun_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
