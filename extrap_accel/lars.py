"""LARS (You et al. 2017) with NVIDIA apex LARC semantics, for the base update only.

Per tensor W with gradient g (1-D tensors — biases, norms — excluded):
    a = η·‖W‖ / (‖g‖ + λ‖W‖ + eps);  with ``clip``: a = min(a/γ, 1)  (γ: the group's lr)
    the base update uses a·(g + λW) in place of g + λW.
The norms are of the anchor. With an extrap_accel optimizer only the averaged gradient of the
base update is rescaled: this rank's local gradient — and so the extrapolation direction —
is left as it is (on one process the optimizer reads the unscaled gradient).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .optim.base import ExtrapOptimizer


class LARS:
    """Wrap an optimizer (ExtrapSGD, torch.optim.SGD, ...) with layer-wise adaptive rates."""

    def __init__(self, optimizer, trust_coefficient: float = 0.02, clip: bool = True,
                 eps: float = 1e-8):  # fmt: skip
        if not trust_coefficient > 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if any("betas" in group for group in optimizer.param_groups):
            raise ValueError(
                "LARS rescales an SGD-type update (g + λW); Adam-type optimizers (AdamW, "
                "ExtrapAdam) normalize the step themselves and decay weights apart from the "
                "gradient: wrap SGD / ExtrapSGD"
            )
        self.optimizer = optimizer
        # the optimizer and what it wraps: accelerate's AcceleratedOptimizer, DeepSpeed's
        chain = []
        while optimizer is not None:
            chain.append(optimizer)
            optimizer = getattr(optimizer, "optimizer", None)
        self._extrap = next((o for o in chain if isinstance(o, ExtrapOptimizer)), None)
        if any(type(o).__name__ == "DeepSpeedOptimizerWrapper" for o in chain) or (
            self._extrap is not None and self._extrap.binding.backend == "deepspeed"
        ):
            raise NotImplementedError(
                "LARS under DeepSpeed: the engine steps the optimizer itself, so a LARS wrapper "
                "would never run (and ZeRO shards the per-tensor norms it needs). Use DDP for "
                "LARS (accelerate launch without a DeepSpeed config)"
            )
        if any(any(c.__name__ == "DTensor" for c in type(p).__mro__)
               for g in self.optimizer.param_groups for p in g["params"]):  # fmt: skip
            raise NotImplementedError(
                "LARS under FSDP2: its trust ratios need whole tensors (‖W‖, ‖g‖), and each rank "
                "holds a shard; use LARS with DDP"
            )
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps

    def __getattr__(self, name):  # param_groups, state, train, eval, step_was_skipped, ...
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"LARS({self.optimizer!r}, trust_coefficient={self.trust_coefficient})"

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _unscale_gradients(self) -> None:
        """fp16 loss scaling (accelerate's GradScaler): the norms and the λW term need the true
        gradient, so unscale ``.grad`` now; the scaler remembers it and does not unscale again
        in its own step (an overflow still skips the step)."""
        wrapper = self.optimizer
        while wrapper is not None:
            scaler = getattr(wrapper, "scaler", None)
            if scaler is not None and scaler.is_enabled():
                scaler.unscale_(wrapper.optimizer)
                return
            wrapper = getattr(wrapper, "optimizer", None)

    @torch.no_grad()
    def trust_ratios(self) -> dict[Tensor, float]:
        """The factor a of every LARS-scaled parameter that has a gradient."""
        out = {}
        for group in self.optimizer.param_groups:
            wd, lr = group.get("weight_decay", 0.0), float(group["lr"])
            for p in group["params"]:
                if p.grad is None or p.dim() < 2:
                    continue
                w = self._extrap.anchor(p) if self._extrap else p
                w_norm, g_norm = float(w.norm()), float(p.grad.norm())
                if w_norm == 0 or g_norm == 0:
                    continue
                ratio = self.trust_coefficient * w_norm / (g_norm + wd * w_norm + self.eps)
                if self.clip:
                    ratio = min(ratio / lr, 1.0) if lr > 0 else 1.0
                out[p] = ratio
        return out

    def step(self, closure=None):
        if closure is not None:
            raise RuntimeError("LARS.step does not take a closure: compute the loss first")
        self._unscale_gradients()
        ratios = self.trust_ratios()
        originals = {}
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                wd = group.get("weight_decay", 0.0)
                for p in group["params"]:
                    a = ratios.get(p)
                    if a is None:
                        continue
                    w = self._extrap.anchor(p) if self._extrap else p
                    originals[p] = p.grad
                    # g' = a·g + (a − 1)·λW, so that the optimizer's g' + λW = a·(g + λW)
                    scaled = p.grad.mul(a)
                    if wd != 0:
                        scaled.add_(w, alpha=(a - 1.0) * wd)
                    p.grad = scaled
        # the local direction keeps the unscaled gradient
        keep = self._extrap.direction_grads(originals) if self._extrap else contextlib.nullcontext()
        try:
            with keep:
                return self.optimizer.step()
        finally:
            for p, g in originals.items():
                p.grad = g
