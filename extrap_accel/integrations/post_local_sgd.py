"""extrap-SGD with post-local SGD (Lin et al. 2020, Algorithm 2) on PyTorch's machinery.

Phase 1 (optimizer steps t < ``start_step``): ordinary data-parallel extrap-SGD.
Phase 2 (t ≥ ``start_step``): DDP's ``post_localSGD_hook`` stops the gradient all-reduce, each
worker takes ``period`` local steps with its own momentum and extrapolation, then the
**anchors** are averaged (one parameter all-reduce) and every x̃ is moved with its anchor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from ..handle import unwrap_optimizer
from ..optim.base import ExtrapOptimizer


class _AnchorAverager(PeriodicModelAverager):
    """PeriodicModelAverager's schedule (warmup, period, step counter); the averaging itself is
    ``_average_in_place`` over the anchors (plain tensors) or the parameters."""

    def due(self, step: int | None = None) -> bool:
        step = self.step if step is None else step
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.period == 0


def _average_in_place(tensors: list[torch.Tensor], group) -> None:
    """Average ``tensors`` across ranks with one all-reduce, writing into their own storage.

    (torch's ``average_parameters`` re-points each tensor at a slice of one flat buffer: an
    anchor then shares storage with every other one — safetensors savers drop all but the
    first as duplicates — and an alias such as ``p.data`` is re-pointed instead of ``p``.)
    """
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    flat /= dist.get_world_size(group)
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class PostLocalSGD:
    """Switch a DDP model + optimizer to post-local SGD after ``start_step`` optimizer steps.

    Anchors are averaged after every ``period`` local steps: after steps
    ``start_step + period − 1``, ``start_step + 2·period − 1``, … Works with any optimizer; with an
    extrap_accel optimizer the anchors (never x̃) are averaged and x̃ keeps its displacement.
    """

    def __init__(self, model: nn.Module, optimizer, *, start_step: int, period: int):
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState,
            post_localSGD_hook,
        )

        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "post-local SGD needs a DistributedDataParallel model (accelerate MULTI_GPU or "
                f"MULTI_CPU, or torchrun + DDP); got {type(model).__name__}. DeepSpeed and FSDP "
                "are not supported."
            )
        if not (isinstance(start_step, int) and start_step >= 0):
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if not (isinstance(period, int) and period >= 2):
            raise ValueError(
                f"period must be an int >= 2 (local steps between averagings), got {period!r}"
            )
        self.start_step = start_step
        self.period = period
        try:
            self.optimizer = unwrap_optimizer(optimizer)
        except TypeError:
            while hasattr(optimizer, "optimizer"):
                optimizer = optimizer.optimizer
            self.optimizer = optimizer
        # A subgroup of one rank per worker: PyTorch's default subgroup is the node (and needs
        # CUDA); phase 2 must not all-reduce gradients at all.
        self.subgroup, _ = dist.new_subgroups(group_size=1)
        self.state = PostLocalSGDState(
            process_group=None,
            subgroup=self.subgroup,
            start_localSGD_iter=start_step,
            post_local_gradient_allreduce=False,
        )
        model.register_comm_hook(self.state, post_localSGD_hook)
        self.averager = _AnchorAverager(period=period, warmup_steps=start_step + period - 1)
        self._averaged_last = False
        self._handle = self.optimizer.register_step_post_hook(self._after_step)
        if isinstance(self.optimizer, ExtrapOptimizer):  # anchors and momenta differ per rank
            self.optimizer.bind(per_rank_state=True)

    def resume_at(self, step: int) -> None:
        """Continue the switch and the averaging schedule from optimizer step ``step``."""
        self.state.iter = step
        self.averager.step = step
        self._averaged_last = step > 0 and self.averager.due(step - 1)

    @property
    def local(self) -> bool:
        """Whether the next step is a local one (phase 2)."""
        return self.averager.step >= self.start_step

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        self._averaged_last = self.averager.due()
        if not self._averaged_last:
            self.averager.step += 1
            return
        self.averager.step += 1
        self._average()

    @torch.no_grad()
    def finish(self) -> bool:
        """Average now if the last step was a local one (phase 2, not an averaging step), so
        that training ends on one model; call it after the last step, before the final
        evaluation and save. Returns whether it averaged (one all-reduce)."""
        if not self.local or self._averaged_last:
            return False
        self._average()
        self._averaged_last = True
        return True

    def _average(self) -> None:
        opt = self.optimizer
        if isinstance(opt, ExtrapOptimizer):  # the anchors, in either mode; x̃ moves with them
            # (every trainable parameter: the same list on every rank, displaced or not yet)
            params = [p for p in opt.managed_params() if p.requires_grad]
            anchors = [opt.anchor(p).clone() for p in params]
            _average_in_place(anchors, self.averager.process_group)
            for p, anchor in zip(params, anchors):
                held = opt.move_anchor_(p, anchor)  # x̃ = x̄ + (x̃ − x), or x̄ if not displaced
                p.data.copy_(anchor if held is None else held)
        else:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            _average_in_place(params, self.averager.process_group)

    def remove(self) -> None:
        self._handle.remove()


def enable_post_local_sgd(model, optimizer, *, start_step: int, period: int) -> PostLocalSGD:
    """Algorithm 2: data-parallel until ``start_step`` optimizer steps, then post-local SGD."""
    return PostLocalSGD(model, optimizer, start_step=start_step, period=period)

