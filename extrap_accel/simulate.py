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
from .capture import CaptureMode
from .optim.base import ExtrapOptimizer
from .optim.core import Core


def _find_extrap(optimizer) -> ExtrapOptimizer | None:
    """The extrap_accel optimizer under wrappers (LARS, accelerate's), or None."""
    while optimizer is not None and not isinstance(optimizer, ExtrapOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class VirtualWorkers:
    """Simulate ``num_workers`` data-parallel workers around ``model`` and ``optimizer``.

    ``optimizer`` is an extrap_accel optimizer (built on ``model.parameters()``), one wrapped by
    LARS, or any torch optimizer (the mini-batch baseline: every worker computes at the anchor).

    The model always holds the anchor (the optimizer is bound with ``base_update_only`` and an
    empty core). Each worker is a core in eval mode over the model's parameters: it keeps its x̃
    and its local state, places x̃ with the direction function every backend uses, and points
    the parameters at its x̃ for its own forward and backward (``Core.at_points``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, num_workers: int):
        if not (isinstance(num_workers, int) and num_workers >= 1):
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        self.model = model
        self.optimizer = optimizer
        self.num_workers = num_workers
        self.extrap = _find_extrap(optimizer)
        groups = (self.extrap or optimizer).param_groups
        self.params = [p for g in groups for p in g["params"] if p.requires_grad]
        if self.extrap is not None:
            if any(g["extrapolation"] == "fresh" for g in groups):
                raise NotImplementedError(
                    "extrapolation='fresh' is not simulated (it needs each worker's closure at "
                    "the anchor): use past, gaussian, uniform or stochastic"
                )
            if any(s for s in self.extrap.state.values()):
                raise ValueError("build VirtualWorkers before the optimizer's first step")
            self.extrap.bind(backend="simulator", core=Core(), base_update_only=True,
                             world_size=num_workers, capture=CaptureMode(off=True))  # fmt: skip
        self.workers = [Core() for _ in range(num_workers)]
        for worker in self.workers:
            worker.training = False  # the slots (the model's parameters) hold the anchor
        self._generators: list[dict[torch.device, torch.Generator]] = [
            {} for _ in range(num_workers)
        ]

    @property
    def points(self) -> list[list[Tensor]]:
        """Each worker's x̃, per parameter (live tensors: do not modify)."""
        return [[worker.point(p) for p in self.params] for worker in self.workers]

    @property
    def local_state(self) -> list[dict[Tensor, dict]]:
        """Each worker's local state (its x̃ under "extrapolated", its local moments)."""
        return [worker.state for worker in self.workers]

    def _generator(self, k: int, device: torch.device) -> torch.Generator:
        gen = self._generators[k].get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(_dist.generator_seed(self.extrap._seed, k, device))
            self._generators[k][device] = gen
        return gen

    # ------------------------------------------------------------ the step
    def step(self, closure: Callable[[int], Tensor]) -> list[Tensor]:
        """One data-parallel step: ``closure(k)`` returns worker k's loss on its own batch.

        Each loss is computed with the parameters at x̃ᵏ and backpropagated here. Returns the
        K losses (detached).
        """
        K = self.num_workers
        local_grads, losses = [], []
        for k, worker in enumerate(self.workers):
            for p in self.params:
                p.grad = None
            with worker.at_points(), torch.enable_grad():
                loss = closure(k)
                loss.backward()
            local_grads.append([None if p.grad is None else p.grad.detach() for p in self.params])
            losses.append(loss.detach())
        with torch.no_grad():
            for i, p in enumerate(self.params):
                grads = [g[i] for g in local_grads]
                if all(g is None for g in grads):  # no worker used it: no gradient, as in DDP
                    p.grad = None
                    continue
                grads = [torch.zeros_like(p) if g is None else g for g in grads]
                for worker, g in zip(local_grads, grads):
                    worker[i] = g
                p.grad = torch.stack([g / K for g in grads]).sum(0)  # DDP: each / K, summed
        groups = (self.extrap or self.optimizer).param_groups
        lrs = [float(g["lr"]) for g in groups]
        self.optimizer.step()
        if self.extrap is not None:
            with torch.no_grad():
                for k in range(K):
                    self._extrapolate(k, local_grads[k], lrs)
        return losses

    def _extrapolate(self, k: int, local: list[Tensor | None], lrs: list[float]) -> None:
        opt, worker = self.extrap, self.workers[k]
        index = {p: i for i, p in enumerate(self.params)}
        norm = None
        for group, lr in zip(opt.param_groups, lrs):
            params = [p for p in group["params"] if p in index and local[index[p]] is not None]
            if not params:
                continue
            coef = 1.0
            if group["extrap_max_norm"] is not None:
                if norm is None:  # worker k's own total norm
                    norm = float(torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(g.double()) for g in local if g is not None])))
                coef = min(1.0, float(group["extrap_max_norm"]) / (norm + 1e-6))
            opt.place_next_(
                group, params, outs=[worker.ensure_point(p) for p in params],
                anchors=[p.detach() for p in params], local_grads=[local[index[p]] for p in params],
                states=[worker.state[p] for p in params], lr=lr, local_coef=coef,
                generator=lambda device: self._generator(k, device),
            )  # fmt: skip
