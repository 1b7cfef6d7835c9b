"""Quickstart: extrap-SGD in a plain PyTorch loop on real data (scikit-learn's bundled digits).

    python examples/quickstart.py                      # extrap-SGD
    python examples/quickstart.py --optimizer sgd      # the mini-batch SGD baseline

Only two lines differ from a torch.optim.SGD loop: the optimizer, and ``attach`` so that
evaluation (a forward under no_grad) and ``state_dict`` see the anchor, never x̃.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import extrap_accel


def get_data(seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="extrap_sgd", choices=extrap_accel.list_optimizers())
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--noise_scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = get_data(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    kwargs = dict(lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    if args.noise_scale is not None:
        kwargs["noise_scale"] = args.noise_scale
    if args.optimizer.endswith("adam") or args.optimizer == "adamw":
        kwargs = dict(lr=args.lr / 100, weight_decay=1e-4)
    optimizer = extrap_accel.create_optimizer(args.optimizer, model.parameters(), **kwargs)
    if isinstance(optimizer, extrap_accel.ExtrapOptimizer):
        extrap_accel.attach(model, optimizer)

    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_train))
        total = 0.0
        for i in range(0, len(y_train), args.batch_size):
            idx = perm[i : i + args.batch_size]

            def closure(idx=idx):
                optimizer.zero_grad()
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                loss.backward()
                return loss.detach()

            total += float(optimizer.step(closure)) * len(idx)
        model.eval()
        with torch.no_grad():  # attached: this forward runs at the anchor
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1:2d}  train loss {total / len(y_train):.4f}  test acc {accuracy:.3f}")


if __name__ == "__main__":
    main()
