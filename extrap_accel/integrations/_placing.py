"""What the adapters that place x̃ themselves share (DeepSpeed ZeRO, FSDP2): reading the core
they bound, and counting the displacement that rounding to the forward's dtype erases."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class PlacingAdapter:
    """Base of an adapter with ``self.optimizer`` and the core it bound as ``self.core``."""

    def _init_rounding(self) -> None:
        # elements of δ ≠ 0 that rounded to nothing / elements of δ ≠ 0, counted on the device
        # (no host sync) at every ``rounding_sample_every``-th placement, the first included
        self.rounded: list[Tensor | int] = [0, 0]
        self.rounding_sample_every = 16
        self._placements = 0

    def _sample_rounding(self) -> bool:
        """Whether this placement counts the rounding (call once per placement)."""
        sample = self._placements % self.rounding_sample_every == 0
        self._placements += 1
        return sample

    @torch.no_grad()
    def _count_rounding(self, x: Tensor, out: Tensor, dtype: torch.dtype) -> None:
        """x̃ = ``out`` computed from the anchor ``x`` (fp32), rounded to ``dtype``: count the
        elements it moved and those the rounding put back on the anchor."""
        moved = out != x
        self.rounded[0] += (moved & (out.to(dtype) == x.to(dtype))).sum()
        self.rounded[1] += moved.sum()

    @property
    def rounded_to_zero_fraction(self) -> float:
        """Fraction of the displacement's nonzero elements that rounding to the forward's dtype
        erased (sampled: every ``rounding_sample_every``-th step, the first included; set it to
        1 to count every step; 0 where the forward reads fp32)."""
        gone, moved = (int(n) for n in self.rounded)
        return gone / moved if moved else 0.0

    @property
    def training(self) -> bool:
        return self.core.training

    def anchor(self, p: Tensor) -> Tensor:
        """The anchor this rank holds for ``p`` (its slot's: whole, or its shard)."""
        return self.core.anchor(p)

    def point(self, p: Tensor) -> Tensor:
        """This rank's x̃ of ``p`` as its forward reads it (whole, or its shard)."""
        return self.core.point(p)

    def local_state(self, p: Tensor) -> dict[str, Any]:
        """This rank's local extrapolation state of ``p`` (local moments)."""
        keys = type(self.optimizer)._local_state_keys
        return {k: v for k, v in self.core.state.get(p, {}).items() if k in keys}
