"""Capture of this rank's local gradient gᵏ before any data-parallel reduction.

A tensor hook on each parameter fires before DDP's reducer (which runs in post-accumulate
hooks) with this rank's gradient of the current backward. The sum over the micro-steps since
the last step is gᵏ: the same accumulation convention as ``.grad``, so that mean_k gᵏ equals
the averaged ``.grad`` (invariant I6). A new accumulation starts after ``optimizer.step()``,
after ``optimizer.zero_grad()``, and when the hook finds ``p.grad`` cleared (``model.zero_grad``,
as the HF Trainer does, or after a step skipped for fp16 overflow). The capture switches itself on at the
first backward when a process group of more than one rank exists; with one process it
removes its hooks and gᵏ is ``.grad``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from . import _dist


@dataclasses.dataclass(frozen=True)
class CaptureMode:
    """How a backend wants this rank's local gradient captured (``optimizer.bind(capture=...)``).

    - ``dtype``: accumulate in this dtype (None: the gradient's).
    - ``follow_grad``: a cleared ``p.grad`` starts a new accumulation. Off where the backend
      keeps no ``.grad`` (DeepSpeed ZeRO), whose adapter restarts at every boundary instead.
    - ``missing_is_zero``: a parameter with no gradient yet reads as zeros, where the backend's
      update feeds it zeros (DeepSpeed's flat partitions); else None (torch skips it).
    - ``always``: capture even with one process (a backend that leaves no gradient in ``.grad``).
    - ``off``: never capture (the backend computes each worker's gradient itself: simulator).
    """

    dtype: torch.dtype | None = None
    follow_grad: bool = True
    missing_is_zero: bool = False
    always: bool = False
    off: bool = False


class LocalGradCapture:
    def __init__(self, params: list[Tensor]):
        self.mode = CaptureMode()
        self.active: bool | None = None  # decided at the first backward
        self.buffers: dict[Tensor, Tensor] = {}
        self._fresh: set[Tensor] = set()
        self._hooked: set[Tensor] = set()
        self._all: list[Tensor] = []
        self._known: set[Tensor] = set()
        self._handles = []
        self.add(params)

    def add(self, params) -> None:
        """Hook new parameters (a param group added later). A parameter frozen now is hooked
        when it is unfrozen, at the next ``reset`` (zero_grad / step)."""
        for p in params:
            if p not in self._known:
                self._known.add(p)
                self._all.append(p)
        self._hook_unfrozen()

    def _hook_unfrozen(self) -> None:
        if self.active is False or self.mode.off:
            return
        for p in self._all:
            if p.requires_grad and p not in self._hooked:
                self._hooked.add(p)
                self._handles.append(p.register_hook(self._hook(p)))

    def configure(self, mode: CaptureMode) -> None:
        self.mode = mode
        if mode.off:
            self.active = False
            self.remove()
        elif mode.always:
            self.active = True
            self._hook_unfrozen()  # (hooks removed by an earlier one-process decision)

    def _decide(self) -> bool:
        if self.active is None:
            self.active = _dist.world_size() > 1
            if not self.active:
                self.remove()
        return self.active

    def _hook(self, p: Tensor):
        def hook(grad: Tensor) -> None:
            if not self._decide():
                return
            with torch.no_grad():
                buf = self.buffers.get(p)
                if buf is None:
                    buf = grad.detach().to(self.mode.dtype or grad.dtype, copy=True)
                    self.buffers[p] = buf
                elif p in self._fresh and not (self.mode.follow_grad and p.grad is None):
                    buf.add_(grad)
                else:
                    buf.copy_(grad)
            self._fresh.add(p)

        return hook

    def get(self, p: Tensor) -> Tensor | None:
        """gᵏ for ``p``: the captured sum, zeros if ``p`` got no gradient on this rank."""
        if not self.active:
            return None
        if p not in self._hooked:  # unfrozen since the last step: not captured this time
            return None
        buf = self.buffers.get(p)
        if buf is None:
            if p.grad is not None:
                buf = torch.zeros_like(p.grad)
            elif self.mode.missing_is_zero and p.requires_grad:  # ZeRO-3's full shape: ds_shape
                buf = torch.zeros(getattr(p, "ds_shape", p.shape), device=p.device,
                                  dtype=self.mode.dtype or p.dtype)  # fmt: skip
            else:
                return None
            self.buffers[p] = buf
        elif p not in self._fresh:
            buf.zero_()
        self._fresh.add(p)
        return buf

    def reset(self) -> None:
        """Start a new accumulation (called by ``optimizer.zero_grad`` and after a step)."""
        self._fresh.clear()
        self._hook_unfrozen()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hooked.clear()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
