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

import torch
from torch import Tensor

from . import _dist


class LocalGradCapture:
    def __init__(self, params: list[Tensor]):
        self.params = [p for p in params if p.requires_grad]
        self.active: bool | None = None  # decided at the first backward
        self.dtype: torch.dtype | None = None  # accumulate in this dtype (default: the grad's)
        # Follow p.grad: None means a new accumulation. Off where the backend keeps no .grad
        # (DeepSpeed ZeRO), whose adapter resets at every accumulation boundary instead.
        self.follow_grad = True
        # A parameter with no gradient yet: zeros where the backend's update feeds it zeros
        # (DeepSpeed's flat gradient partitions), else None (torch's optimizers skip it).
        self.missing_is_zero = False
        self.buffers: dict[Tensor, Tensor] = {}
        self._fresh: set[Tensor] = set()
        self._handles = [p.register_hook(self._hook(p)) for p in self.params]

    def force_active(self) -> None:
        """Capture even with one process (a backend that leaves no gradient in ``p.grad``)."""
        self.active = True

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
                    buf = grad.detach().to(self.dtype or grad.dtype, copy=True)
                    self.buffers[p] = buf
                elif p in self._fresh and not (self.follow_grad and p.grad is None):
                    buf.add_(grad)
                else:
                    buf.copy_(grad)
            self._fresh.add(p)

        return hook

    def get(self, p: Tensor) -> Tensor | None:
        """gᵏ for ``p``: the captured sum, zeros if ``p`` got no gradient on this rank."""
        if not self.active:
            return None
        buf = self.buffers.get(p)
        if buf is None:
            if p.grad is not None:
                buf = torch.zeros_like(p.grad)
            elif self.missing_is_zero and p.requires_grad:  # ZeRO-3's full shape: ds_shape
                buf = torch.zeros(getattr(p, "ds_shape", p.shape), device=p.device,
                                  dtype=self.dtype or p.dtype)  # fmt: skip
            else:
                return None
            self.buffers[p] = buf
        elif p not in self._fresh:
            buf.zero_()
        self._fresh.add(p)
        return buf

    def reset(self) -> None:
        """Start a new accumulation (called by ``optimizer.zero_grad``)."""
        self._fresh.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
