"""K data-parallel workers simulated in one process, for studying large K on one device.

Each virtual worker k has its own extrapolated point x̃ᵏ, its own local state (local moments,
noise generator) and its own mini-batch; the gradients are averaged as the all-reduce would
average them, and the base update is applied to the anchor, which the model's parameters hold.
The math is the optimizer's own (the same code the real data-parallel path runs); the result
matches a real K-process run up to float rounding (tests/test_ddp.py checks K = 2).

    model = make_model()
    optimizer = extrap_accel.ExtrapSGD(model.parameters(), lr=0.1 * K, momentum=0.9, nesterov=True)
    workers = extrap_accel.VirtualWorkers(model, optimizer, num_workers=K)
    for t in range(steps):
        losses = workers.step(lambda k: loss_fn(model(x[k]), y[k]))   # worker k's batch
    evaluate(model)                                                   # the anchor

Module buffers (BatchNorm statistics) are shared by the virtual workers. Costs K forward and
backward passes per step, run one after the other, and K copies of the extrapolation state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import _dist
from .optim.base import NOISE_EXTRAPOLATIONS, ExtrapOptimizer
from .optim.directions import place_noise_


class VirtualWorkers:
    """Simulate ``num_workers`` data-parallel workers around ``model`` and ``optimizer``.

    ``optimizer`` is an extrap_accel optimizer (built on ``model.parameters()``) or any torch
    optimizer (the mini-batch baseline: every worker computes at the anchor).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, num_workers: int):
        if not (isinstance(num_workers, int) and num_workers >= 1):
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        self.model = model
        self.optimizer = optimizer
        self.num_workers = num_workers
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.extrap = isinstance(optimizer, ExtrapOptimizer)
        if self.extrap:
            if any(g["extrapolation"] == "fresh" for g in optimizer.param_groups):
                raise NotImplementedError(
                    "extrapolation='fresh' is not simulated (it needs each worker's closure at "
                    "the anchor): use past, gaussian, uniform or stochastic"
                )
            if any(set(s) - {"anchor"} for s in optimizer.state.values()):
                raise ValueError("build VirtualWorkers before the optimizer's first step")
            with torch.no_grad():  # undo the noise variants' x̃₀: each worker draws its own
                for p, state in optimizer.state.items():
                    p.copy_(state.pop("anchor"))
            requested = optimizer._requested_world_size
            if requested not in (None, num_workers):
                raise ValueError(
                    f"the optimizer was built with world_size={requested} but simulates "
                    f"num_workers={num_workers}: give the same K (or leave world_size out)"
                )
            optimizer._requested_world_size = num_workers
            optimizer.base_update_only = True  # the parameters are the anchor
            optimizer.anchor_source = self
            optimizer._capture.remove()
        self.points = [[p.detach().clone() for p in self.params] for _ in range(num_workers)]
        self.local_state: list[dict[Tensor, dict]] = [{} for _ in range(num_workers)]
        self._generators: list[dict[torch.device, torch.Generator]] = [
            {} for _ in range(num_workers)
        ]
        if self.extrap:  # the noise variants perturb from t = 0
            for k in range(num_workers):
                self._place_initial_noise(k)

    # ------------------------------------------------------------ what the optimizer asks
    def set_mode(self, train: bool) -> None:
        """optimizer.eval()/train(): nothing to swap, the model always holds the anchor."""

    def _generator(self, k: int, device: torch.device) -> torch.Generator:
        gen = self._generators[k].get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(_dist.generator_seed(self.optimizer._seed, k, device))
            self._generators[k][device] = gen
        return gen

    # ------------------------------------------------------------ the step
    def step(self, closure: Callable[[int], Tensor]) -> list[Tensor]:
        """One data-parallel step: ``closure(k)`` returns worker k's loss on its own batch.

        Each loss is computed with the parameters at x̃ᵏ and backpropagated here. Returns the
        K losses (detached).
        """
        K = self.num_workers
        anchors = [p.data for p in self.params]
        local_grads, losses = [], []
        for k in range(K):
            for p, point in zip(self.params, self.points[k]):
                p.data = point
            try:
                for p in self.params:
                    p.grad = None
                with torch.enable_grad():
                    loss = closure(k)
                    loss.backward()
            finally:
                for p, anchor in zip(self.params, anchors):
                    p.data = anchor
            local_grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach()
                                for p in self.params])  # fmt: skip
            losses.append(loss.detach())
        with torch.no_grad():
            for i, p in enumerate(self.params):  # DDP's average: each gradient / K, then summed
                p.grad = torch.stack([g[i] / K for g in local_grads]).sum(0)
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        averaged = [p.grad for p in self.params]
        self.optimizer.step()
        if self.extrap:
            with torch.no_grad():
                for k in range(K):
                    self._extrapolate(k, local_grads[k], averaged, lrs)
        else:
            for points in self.points:
                for point, anchor in zip(points, anchors):
                    point.copy_(anchor)
        return losses

    def _extrapolate(self, k: int, local: list[Tensor], averaged: list[Tensor],
                     lrs: list[float]) -> None:  # fmt: skip
        opt = self.optimizer
        index = {p: i for i, p in enumerate(self.params)}
        norm = None
        for group, lr in zip(opt.param_groups, lrs):
            gamma = opt._extrap_lr(group, lr)
            variant = group["extrapolation"]
            coef = 1.0
            if group["extrap_max_norm"] is not None:
                if norm is None:
                    norm = float(torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g.double()) for g in local])))
                coef = min(1.0, float(group["extrap_max_norm"]) / (norm + 1e-6))
            for p in group["params"]:
                if p not in index:
                    continue
                i = index[p]
                out, anchor = self.points[k][i], p.detach()
                if variant == "past":
                    state = self.local_state[k].setdefault(p, {})
                    opt._extrapolate_into(group, out, anchor, local[i], state, local_coef=coef,
                                          extrap_lr=gamma)  # fmt: skip
                elif variant == "stochastic":
                    torch.add(anchor, local[i] - averaged[i], alpha=-gamma, out=out)
                elif variant in NOISE_EXTRAPOLATIONS:
                    place_noise_([out], [anchor], group=group,
                                 generator=lambda device: self._generator(k, device))

    def _place_initial_noise(self, k: int) -> None:
        index = {p: i for i, p in enumerate(self.params)}
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                if group["extrapolation"] not in NOISE_EXTRAPOLATIONS:
                    continue
                for p in group["params"]:
                    if p in index:
                        place_noise_([self.points[k][index[p]]], [p.detach()], group=group,
                                     generator=lambda device: self._generator(k, device))
