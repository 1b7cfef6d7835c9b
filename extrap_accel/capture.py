"""Capture of this rank's local gradient gᵏ before any data-parallel reduction.

A tensor hook on each parameter fires before DDP's reducer (which runs in post-accumulate
hooks) with this rank's gradient of the current backward. The sum over the micro-steps since
the last step is gᵏ: the same accumulation convention as ``.grad``, so that mean_k gᵏ equals
the averaged ``.grad`` (invariant I6). A new accumulation starts after ``optimizer.step()``,
after ``optimizer.zero_grad()``, and when the hook finds ``p.grad`` cleared (``model.zero_grad``,
as the HF Trainer does, or after a step skipped for fp16 overflow). The capture switches itself on at the
first backward when a process group of more than one rank exists; with one process it
removes its hooks and gᵏ is ``.grad``.

Transient buffers: where the capture is transient (by default for parameters on a CUDA device,
whose caching allocator serves the per-step allocation; persistent on a CPU, where large
allocations come back from ``mmap`` with page faults), a buffer is allocated by the first hook
of an accumulation and released when the accumulation is over (after the step that used it, at
``zero_grad`` or ``reset_local_grads``), never between micro-steps. Same values; the memory held
between steps and during the forward drops by one gradient-sized buffer.
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
    - ``transient``: release the buffers once a step has used them and allocate them again at
      the next backward; None (auto): transient for parameters on a CUDA device, persistent
      elsewhere (a CPU pays page faults for every large allocation).
    """

    dtype: torch.dtype | None = None
    follow_grad: bool = True
    missing_is_zero: bool = False
    always: bool = False
    off: bool = False
    transient: bool | None = None

    def transient_on(self, device: torch.device) -> bool:
        """Whether a buffer on ``device`` is released between steps."""
        if self.transient is not None:
            return self.transient
        return device.type == "cuda"


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
        self._peak = 0  # the most bytes held at once (at a step, before a transient release)
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
        """Start a new accumulation (called by ``optimizer.zero_grad`` and after a step);
        transient buffers are released (the next backward allocates them again)."""
        self._fresh.clear()
        if self.buffers:
            self._peak = max(self._peak, self.nbytes())
            transient = self.mode.transient_on
            self.buffers = {p: b for p, b in self.buffers.items() if not transient(b.device)}
        self._hook_unfrozen()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hooked.clear()

    def nbytes(self, at_step: bool = False) -> int:
        """Bytes of captured gradients held now (between steps: the persistent buffers only);
        ``at_step``: the most held at once so far, i.e. at a step, before transient buffers
        are released."""
        now = sum(b.numel() * b.element_size() for b in self.buffers.values())
        return max(now, self._peak) if at_step else now
